"""Frame shards: the preprocessed form of a raw partition that training reads.

``<out>/<task>/<task>_shard%04d.<ext>`` hold consecutive frame ranges of a task, in one of two formats:

- ``.pt``: ``{"frames": uint8 (n, 3, H, W)}`` via ``torch.save`` (fast to read, 150 KB/frame at 224 px).
- ``.chunks``: ``b"WMCHUNK1" | uint32-LE header length | JSON header | blobs``. The header is
  ``{"format": "wm-chunked", "version": 1, "codec": "webp", "num_frames", "H", "W", "chunk_frames",
  "chunks": [[offset, nbytes, n_frames], ...], "crc32": [...]}`` with offsets relative to the first blob.
  Each blob is a lossless WebP of the horizontal strip (H, n * W, 3) of n frames, RGB as any decoder reads
  it (the reference encodes with OpenCV from a BGR array, which stores the same RGB image). Bit-identical
  to ``.pt`` and 10-30x smaller; a reader decodes only the chunks a window overlaps.

``<task>_index.json`` (``{shard file name: n_frames}``) is written last: its presence means the task is
complete, so a preprocess killed midway leaves nothing that a loader accepts.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import struct
import zlib
from collections import OrderedDict
from io import BytesIO
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmbench2_lab.data.raw import (StripFrames, atomic_write, frames_to_strip, list_raw_tasks, read_blocks,
                                   read_raw)

MAGIC = b"WMCHUNK1"
CODECS = {"webp": ".chunks", "raw": ".pt"}  # codec -> file extension
DEFAULT_SHARD_SIZE = 4096
DEFAULT_CHUNK_FRAMES = 16
WEBP_MAX_WIDTH = 16383  # libwebp's limit: 73 frames per chunk at 224 px


class CorruptShardError(ValueError):
    """A shard file whose bytes do not match its header (truncated or altered)."""


def shard_name(task: str, index: int, codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown shard codec {codec!r}; choose one of {', '.join(CODECS)}")
    return f"{task}_shard{index:04d}{CODECS[codec]}"


def index_path(task_dir: str | Path) -> Path:
    task_dir = Path(task_dir)
    return task_dir / f"{task_dir.name}_index.json"


# -- writing ----------------------------------------------------------------------------------------------
def _encode_webp(frames: torch.Tensor) -> bytes:
    """(n, 3, H, W) uint8 -> lossless WebP bytes of their (H, n * W, 3) RGB strip."""
    buf = BytesIO()
    Image.fromarray(frames_to_strip(frames), "RGB").save(buf, format="WEBP", lossless=True, quality=80, method=4)
    return buf.getvalue()


def _decode_webp(blob: bytes, n: int, h: int, w: int, where: str) -> np.ndarray:
    """WebP bytes -> (n, 3, H, W) uint8 (a strided view)."""
    try:
        strip = np.asarray(Image.open(BytesIO(blob)).convert("RGB"))
    except (OSError, ValueError) as err:
        raise CorruptShardError(f"{where}: does not decode as WebP ({err})") from err
    if strip.shape != (h, n * w, 3):
        raise CorruptShardError(f"{where}: decoded to {strip.shape}, header says {(h, n * w, 3)}")
    return strip.reshape(h, n, w, 3).transpose(1, 3, 0, 2)


def write_shard(frames: torch.Tensor, path: str | Path, codec: str = "webp",
                chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> int:
    """Write (n, 3, H, W) uint8 frames to ``path`` (whose extension names the codec), atomically."""
    path = Path(path)
    if codec not in CODECS or path.suffix != CODECS[codec]:
        raise ValueError(f"{path.name}: codec {codec!r} writes {CODECS.get(codec, '?')} files")
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"write_shard expects (n, 3, H, W) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
    if codec == "raw":
        # clone(): torch.save writes a view's whole backing storage.
        atomic_write(path, lambda tmp: torch.save({"frames": frames.clone()}, tmp))
        return int(frames.shape[0])
    n, _, h, w = frames.shape
    if chunk_frames < 1 or chunk_frames * w > WEBP_MAX_WIDTH:
        raise ValueError(f"chunk_frames={chunk_frames} at {w} px makes a {chunk_frames * w} px strip; WebP allows "
                         f"1 to {WEBP_MAX_WIDTH // w} frames per chunk at this size")
    blobs = [_encode_webp(frames[s:s + chunk_frames]) for s in range(0, n, chunk_frames)]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])[:-1]]).tolist() if blobs else []
    header = {"format": "wm-chunked", "version": 1, "codec": "webp", "num_frames": int(n), "H": int(h),
              "W": int(w), "chunk_frames": int(chunk_frames),
              "chunks": [[int(o), len(b), min(chunk_frames, n - i * chunk_frames)]
                         for i, (o, b) in enumerate(zip(offsets, blobs))],
              "crc32": [zlib.crc32(b) for b in blobs]}
    head = json.dumps(header, separators=(",", ":")).encode()

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(head)) + head)
            for b in blobs:
                f.write(b)
    atomic_write(path, write)
    return int(n)


# -- reading ----------------------------------------------------------------------------------------------
class ChunkedShard:
    """Lazy reader of a ``.chunks`` shard: ``read(start, end) -> (n, 3, H, W) uint8``, also ``shard[a:b]``.

    Holds only the header; each read opens the file, ``pread``s the overlapping chunks, checks their CRC32
    (lossless WebP often still decodes after a bit flip, to wrong pixels) and decodes them.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise CorruptShardError(f"{self.path}: not a chunked shard (starts {magic!r}, expected {MAGIC!r})")
            try:
                (hlen,) = struct.unpack("<I", f.read(4))
                header = json.loads(f.read(hlen).decode())
                kind = (header["format"], header["codec"], header["version"])
                self.num_frames, self.H, self.W = int(header["num_frames"]), int(header["H"]), int(header["W"])
                self.chunk_frames = int(header["chunk_frames"])
                self.chunks = [(int(o), int(nb), int(n)) for o, nb, n in header["chunks"]]
                crcs = header.get("crc32")  # optional: the first chunked files had none
            except (struct.error, ValueError, KeyError, TypeError) as err:
                raise CorruptShardError(f"{self.path}: unreadable header ({type(err).__name__}: {err}); the file is "
                                        f"truncated or corrupt: delete its task directory and rerun preprocess") from err
            size = os.fstat(f.fileno()).st_size
        if kind != ("wm-chunked", "webp", 1):
            raise CorruptShardError(f"{self.path}: unsupported (format, codec, version) {kind}")
        self.crc32 = None if crcs is None else [int(c) for c in crcs]
        self._blob_start = len(MAGIC) + 4 + hlen
        self._starts = np.concatenate([[0], np.cumsum([c[2] for c in self.chunks])]).astype(np.int64)
        if int(self._starts[-1]) != self.num_frames:
            raise CorruptShardError(f"{self.path}: chunk frame counts sum to {self._starts[-1]}, header says "
                                    f"{self.num_frames}")
        if self.crc32 is not None and len(self.crc32) != len(self.chunks):
            raise CorruptShardError(f"{self.path}: {len(self.crc32)} checksums for {len(self.chunks)} chunks")
        need = self._blob_start + max((o + nb for o, nb, _ in self.chunks), default=0)
        if size < need:
            raise CorruptShardError(f"{self.path}: truncated ({size} bytes on disk, header needs {need}); delete "
                                    f"its task directory and rerun preprocess")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, 3, self.H, self.W)

    def __len__(self) -> int:
        return self.num_frames

    def read(self, start: int, end: int) -> torch.Tensor:
        """Frames [start, end) -> (end - start, 3, H, W) uint8, decoding only the chunks they touch."""
        if not 0 <= start <= end <= self.num_frames:
            raise IndexError(f"frames [{start}, {end}) out of range for {self.num_frames} frames in {self.path}")
        if start == end:
            return torch.empty((0, 3, self.H, self.W), dtype=torch.uint8)
        c0 = int(np.searchsorted(self._starts, start, side="right")) - 1
        c1 = int(np.searchsorted(self._starts, end - 1, side="right")) - 1
        parts = []
        fd = os.open(self.path, os.O_RDONLY)  # opened per read: readers are cached by the thousand
        try:
            for ci in range(c0, c1 + 1):
                off, nb, n = self.chunks[ci]
                blob = os.pread(fd, nb, self._blob_start + off)
                if len(blob) != nb:
                    raise CorruptShardError(f"{self.path}: chunk {ci} is short ({len(blob)} of {nb} bytes)")
                if self.crc32 is not None and zlib.crc32(blob) != self.crc32[ci]:
                    raise CorruptShardError(f"{self.path}: chunk {ci} fails its CRC32 check (the file is corrupt); "
                                            f"delete its task directory and rerun preprocess")
                frames = _decode_webp(blob, n, self.H, self.W, f"{self.path} chunk {ci}")
                first = int(self._starts[ci])
                parts.append(frames[max(start - first, 0):min(end - first, n)])
        finally:
            os.close(fd)
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0]))

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.num_frames)
            if step != 1:
                raise IndexError("ChunkedShard supports unit-step slices only")
            return self.read(start, max(start, stop))
        i = int(key) + (self.num_frames if int(key) < 0 else 0)
        return self.read(i, i + 1)[0]


def load_shard(path: str | Path) -> torch.Tensor | ChunkedShard:
    """Open a shard of either format: ``.pt`` loads fully to (n, 3, H, W) uint8, ``.chunks`` lazily."""
    path = Path(path)
    if path.suffix == ".chunks":
        return ChunkedShard(path)
    if path.suffix == ".pt":
        try:
            frames = torch.load(path, map_location="cpu", weights_only=True)["frames"]
        except (RuntimeError, EOFError, KeyError, OSError) as err:
            raise CorruptShardError(f"{path}: cannot be loaded ({type(err).__name__}: {err}); delete its task "
                                    f"directory and rerun preprocess") from err
        if frames.ndim != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
            raise CorruptShardError(f"{path}: frames are {tuple(frames.shape)} {frames.dtype}, expected "
                                    f"(n, 3, H, W) uint8")
        return frames
    raise ValueError(f"{path}: not a shard (expected a .pt or .chunks file)")


def read_index(task_dir: str | Path) -> dict[str, int]:
    """``{shard file name: n_frames}`` of a completely preprocessed task, in frame order."""
    path = index_path(task_dir)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: preprocessing of task {Path(task_dir).name!r} did not finish. "
                                f"Rerun `mmbench2-lab preprocess` for it (finished tasks are skipped)")
    index = json.loads(path.read_text())
    return {name: int(index[name]) for name in sorted(index)}


def list_shards(task_dir: str | Path) -> list[Path]:
    """Shard paths of a completely preprocessed task, in frame order (the index is authoritative)."""
    task_dir = Path(task_dir)
    paths = [task_dir / name for name in read_index(task_dir)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{task_dir}: shards listed in the index are missing ({', '.join(missing[:3])}); "
                                f"delete the directory and rerun preprocess")
    return paths


class ShardFrames:
    """Random access to a task's frames across its shards: ``read(start, end) -> (n, 3, H, W) uint8``.

    ``.pt`` shards are loaded whole and the last ``cache_shards`` are kept; ``.chunks`` shards keep only
    their headers and decode per read.
    """

    def __init__(self, task_dir: str | Path, cache_shards: int = 2):
        self.task_dir = Path(task_dir)
        index = read_index(self.task_dir)
        self.paths = list_shards(self.task_dir)
        self._ends = np.cumsum(list(index.values())).astype(np.int64)
        self._open: dict[int, ChunkedShard] = {}
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cache_shards = max(1, cache_shards)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def size(self) -> int:
        """Frame side length in pixels (opens the first shard)."""
        return int(self._shard(0).shape[-1])

    @property
    def block_ends(self) -> list[int]:
        """Cumulative frame count at the end of each shard (the unit of I/O locality)."""
        return [int(e) for e in self._ends]

    def _shard(self, i: int):
        if self.paths[i].suffix == ".chunks":
            if i not in self._open:
                self._open[i] = ChunkedShard(self.paths[i])
            return self._open[i]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        frames = load_shard(self.paths[i])
        self._cache[i] = frames
        while len(self._cache) > self._cache_shards:
            self._cache.popitem(last=False)
        return frames

    def read(self, start: int, end: int) -> torch.Tensor:
        """Frames [start, end) -> (end - start, 3, H, W) uint8."""
        return read_blocks(self._ends, start, end, self._checked_shard, lambda: self.size, self.task_dir)

    def _checked_shard(self, i: int):
        """Shard i, after checking it holds the frame count its index promises."""
        shard = self._shard(i)
        expected = int(self._ends[i]) - (int(self._ends[i - 1]) if i else 0)
        if len(shard) != expected:
            raise CorruptShardError(f"{self.paths[i]}: holds {len(shard)} frames, index says {expected}")
        return shard


# -- preprocessing ----------------------------------------------------------------------------------------
def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(n, 3, H, W) uint8 -> (n, 3, size, size) uint8, bilinear, truncating like the reference preprocess."""
    if frames.shape[-2:] == (size, size):
        return frames
    x = F.interpolate(frames.float() / 255.0, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def preprocess_task(raw_dir: str | Path, out_dir: str | Path, task: str, *, size: int | None = None,
                    codec: str = "webp", shard_size: int = DEFAULT_SHARD_SIZE,
                    chunk_frames: int = DEFAULT_CHUNK_FRAMES) -> bool:
    """Convert one task's PNG strips into shards; returns False when its index already existed (skipped).

    Reads the first N frames, N from ``<task>.pt`` (strips can hold more after an interrupted collection).
    Stale shards of an earlier, unfinished run are removed first; the index is written last.
    """
    task_dir = Path(out_dir) / task
    if index_path(task_dir).exists():
        return False
    shard_name(task, 0, codec)  # validates the codec before any work
    n = len(read_raw(raw_dir, task))
    strips = StripFrames(raw_dir, task, cache_strips=1)
    if len(strips) < n:
        raise ValueError(f"{raw_dir}: {task}.pt describes {n} frames but its PNG strips hold {len(strips)}")
    task_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*task_dir.glob(f"{task}_shard*"), *task_dir.glob(f".{task}_shard*.tmp")]:
        if stale.is_file():
            stale.unlink()
    index = {}
    for i, s in enumerate(range(0, n, shard_size)):
        frames = strips.read(s, min(s + shard_size, n))
        if size is not None:
            frames = resize_frames(frames, size)
        name = shard_name(task, i, codec)
        index[name] = write_shard(frames, task_dir / name, codec, chunk_frames)
    atomic_write(index_path(task_dir), lambda tmp: tmp.write_text(json.dumps(index, indent=2)))
    return True


def _preprocess_one(job: tuple) -> tuple[str, bool]:
    raw_dir, out_dir, task, kwargs = job
    return task, preprocess_task(raw_dir, out_dir, task, **kwargs)


def preprocess(raw_dir: str | Path, out_dir: str | Path, tasks: Iterable[str] | None = None, *,
               workers: int = 1, progress: bool = True, **kwargs) -> dict[str, bool]:
    """Preprocess tasks (default: every ``<task>.pt`` in ``raw_dir``), in ``workers`` processes.

    Returns ``{task: True if written, False if skipped as already complete}``. Keyword arguments go to
    ``preprocess_task`` (size, codec, shard_size, chunk_frames). Rerunning resumes an interrupted run.
    """
    from tqdm.auto import tqdm

    tasks = list_raw_tasks(raw_dir) if tasks is None else list(tasks)
    if not tasks:
        raise FileNotFoundError(f"{raw_dir} holds no <task>.pt files; is it a raw partition directory?")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(str(raw_dir), str(out_dir), t, kwargs) for t in tasks]
    bar = tqdm(total=len(jobs), desc="preprocess", unit="task", disable=not progress)
    done = {}
    if workers <= 1:
        results = map(_preprocess_one, jobs)
    else:
        # spawn: torch and forked workers do not mix safely.
        pool = mp.get_context("spawn").Pool(min(workers, len(jobs)))
        results = pool.imap_unordered(_preprocess_one, jobs)
    try:
        for task, wrote in results:
            done[task] = wrote
            bar.update(1)
    finally:
        bar.close()
        if workers > 1:
            pool.terminate()
    return done
