"""Hub download, exercised offline only: a local copy, a Hugging Face cache the test builds, clear misses."""
import pytest

from mmbench2_lab.cli import main
from mmbench2_lab.data.hub import allow_patterns, download_dataset

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network


def _touch_task(partition_dir, task):
    partition_dir.mkdir(parents=True, exist_ok=True)
    (partition_dir / f"{task}.pt").write_bytes(b"pt")
    (partition_dir / f"{task}-0.png").write_bytes(b"png")


def _hf_cache(cache_dir):
    """A Hugging Face cache holding one snapshot of the dataset with val/cheetah-run."""
    repo = cache_dir / "datasets--nicklashansen--mmbench2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    _touch_task(repo / "snapshots" / COMMIT / "val", "cheetah-run")
    return repo / "snapshots" / COMMIT


def test_allow_patterns_select_partitions_and_tasks():
    assert allow_patterns(None, None) is None
    assert allow_patterns(["val/", "expert"], None) == ["val/*", "expert/*"]
    assert allow_patterns(["val"], ["cheetah-run"]) == ["val/cheetah-run.pt", "val/cheetah-run-*.png"]
    assert allow_patterns(None, ["cheetah-run"]) == ["*/cheetah-run.pt", "*/cheetah-run-*.png"]


def test_offline_uses_an_existing_local_dir(tmp_path):
    _touch_task(tmp_path / "data" / "val", "cheetah-run")
    assert download_dataset(["val"], ["cheetah-run"], local_dir=tmp_path / "data") == tmp_path / "data"
    assert download_dataset(None, ["cheetah-run"], local_dir=tmp_path / "data") == tmp_path / "data"


def test_offline_finds_a_snapshot_in_the_hugging_face_cache(tmp_path):
    snapshot = _hf_cache(tmp_path / "cache")
    root = download_dataset(["val"], ["cheetah-run"], local_dir=None, cache_dir=tmp_path / "cache")
    assert root == snapshot and (root / "val" / "cheetah-run.pt").exists()


def test_offline_and_absent_says_how_to_get_the_data(tmp_path):
    _hf_cache(tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match=r"expert/.*Run `mmbench2-lab download --partitions expert"
                                                r" --local-dir DIR` on a machine with network.*--local-dir"):
        download_dataset(["expert"], local_dir=None, cache_dir=tmp_path / "cache")
    _touch_task(tmp_path / "data" / "val", "cheetah-run")
    with pytest.raises(FileNotFoundError, match="walker-walk.pt"):
        download_dataset(["val"], ["walker-walk"], local_dir=tmp_path / "data")


def test_download_command_reports_an_offline_miss_without_a_traceback(tmp_path, capsys):
    assert main(["download", "--partitions", "val", "--local-dir", str(tmp_path / "none"), "--offline"]) == 2
    assert "on a machine with network" in capsys.readouterr().err
    _touch_task(tmp_path / "data" / "val", "cheetah-run")
    assert main(["download", "--partitions", "val", "--local-dir", str(tmp_path / "data"), "--offline"]) == 0
