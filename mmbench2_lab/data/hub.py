"""Getting MMBench2 from the Hugging Face Hub (dataset ``nicklashansen/mmbench2``, CC-BY-4.0).

The dataset repo holds one directory per partition (``expert``, ``mixed-large``, ``mixed-small``, ``zeros``,
``collected``, ``val``) in the raw layout of ``raw.py``. ``download_dataset`` fetches whole partitions or
just some tasks of them, and works offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) from a local
copy or the Hugging Face cache.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from mmbench2_lab.tasks import get_task

REPO_ID = "nicklashansen/mmbench2"
PARTITIONS = ("expert", "mixed-large", "mixed-small", "zeros", "collected", "val")


def allow_patterns(partitions: Sequence[str] | None, tasks: Sequence[str] | None) -> list[str] | None:
    """Hub file patterns for the requested partitions and tasks (None = the whole repo)."""
    parts = [p.strip("/") for p in partitions] if partitions else ["*"]
    if not tasks:
        return None if parts == ["*"] else [f"{p}/*" for p in parts]
    return [pat for p in parts for t in tasks for pat in (f"{p}/{t}.pt", f"{p}/{t}-*.png")]


def missing_files(root: str | Path, partitions: Sequence[str] | None, tasks: Sequence[str] | None) -> list[str]:
    """What of the request is absent under ``root``: a partition directory, or a task's .pt / first strip
    (in each requested partition; in at least one partition when none is named)."""
    root = Path(root)
    if partitions:
        missing = [f"{root / p}/" for p in partitions if not (root / p).is_dir()]
        return missing + [str(root / p / f) for p in partitions if (root / p).is_dir() for t in tasks or ()
                          for f in (f"{t}.pt", f"{t}-0.png") if not (root / p / f).exists()]
    parts = [p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    if not parts:
        return [f"{root}/<partition>/"]
    return [f"{root}/*/{t}.pt" for t in tasks or ()
            if not any((p / f"{t}.pt").exists() and (p / f"{t}-0.png").exists() for p in parts)]


def _offline(local_files_only: bool) -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(local_files_only or env or constants.HF_HUB_OFFLINE)


def _command(partitions, tasks) -> str:
    cmd = "mmbench2-lab download"
    if partitions:
        cmd += " --partitions " + " ".join(partitions)
    if tasks:
        cmd += " --tasks " + " ".join(tasks)
    return cmd


def download_dataset(partitions: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                     local_dir: str | Path | None = "data", *, repo_id: str = REPO_ID, revision: str | None = None,
                     cache_dir: str | Path | None = None, local_files_only: bool = False,
                     max_workers: int = 8) -> Path:
    """Fetch MMBench2 partitions (default: all) and optionally only some tasks; return the dataset root.

    The root holds ``<partition>/<task>.pt`` and ``<partition>/<task>-<i>.png``. With ``local_dir`` the
    files land there (the returned root); with ``local_dir=None`` they stay in the Hugging Face cache and the
    cached snapshot is returned. Offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``), files already in
    ``local_dir`` or the cache are used and anything missing is an error saying how to get it.
    """
    partitions = [p.strip("/") for p in partitions] if partitions else None
    tasks = [get_task(t).name for t in tasks] if tasks else None
    offline = _offline(local_files_only)
    if offline and local_dir is not None and not missing_files(local_dir, partitions, tasks):
        return Path(local_dir)

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(
            repo_id=repo_id, repo_type="dataset", revision=revision, local_dir=local_dir, cache_dir=cache_dir,
            allow_patterns=allow_patterns(partitions, tasks), local_files_only=offline, max_workers=max_workers))
    except LocalEntryNotFoundError as err:
        root, cause = None, err
    else:
        cause = None
    if root is None:
        missing = (missing_files(local_dir, partitions, tasks) if local_dir is not None
                   else allow_patterns(partitions, tasks) or [f"{repo_id} (all files)"])
    else:
        missing = missing_files(root, partitions, tasks)
    if missing:
        where = local_dir if local_dir is not None else "the Hugging Face cache"
        how = ("offline (HF_HUB_OFFLINE / local_files_only)" if offline
               else "the Hub could not be reached or lacks them")
        raise FileNotFoundError(
            f"MMBench2 files missing in {where}, {how}: {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}. Run `{_command(partitions, tasks)} --local-dir DIR` on a "
            f"machine with network and copy DIR here, or pass --local-dir pointing at an existing copy") from cause
    return root
