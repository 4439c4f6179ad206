"""Lab-manual notebooks 01, 02 and 04 run end to end under papermill on real simulator data.

Each runs with tiny parameters (2 tasks, short 32x32 episodes, a few optimizer steps) in its own kernel
from this environment; the tests check that the printed numbers are the run's own metrics and that the
figures were drawn. Notebook 02 trains on the tokenizer notebook 01 exported, as a student would.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from mmbench2_lab.training.engine import read_metrics

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
OURS = ["01_tokenizer_training.ipynb", "02_dynamics_training.ipynb", "04_data_collection.ipynb"]
TASKS = ["lunarlander-hover", "atari-pong"]  # two domains, both fast to simulate
DATA = dict(TASKS=TASKS, EPISODES=2, VAL_EPISODES=1, SIZE=32, MAX_STEPS=30, WORKERS=1)
PLOTLY = "application/vnd.plotly.v1+json"


def execute(name: str, out_dir: Path, **parameters) -> nbformat.NotebookNode:
    """Run a notebook with papermill in ``out_dir`` (its working directory) and return the executed copy."""
    import papermill as pm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the kernel inherits it: 2 threads thrash on a busy 2-core CPU
        pm.execute_notebook(str(NOTEBOOKS / name), str(out_dir / name), parameters=parameters,
                            kernel_name="python3", cwd=str(out_dir), progress_bar=False)
    return nbformat.read(out_dir / name, as_version=4)


def text_output(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def figures(nb) -> int:
    return sum(PLOTLY in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Notebook 01 run once: its data folder, run folder and executed notebook."""
    root = tmp_path_factory.mktemp("lab")
    nb = execute(OURS[0], root, **DATA, DATA_DIR=str(root / "data"), RUN_DIR=str(root / "tokenizer"), STEPS=8,
                 MINUTES=2, OVERRIDES={"tokenizer_train.eval_every": 0, "tokenizer_train.log_every": 2,
                                       "tokenizer_train.eval_windows": 8})
    return root, nb


@pytest.mark.parametrize("name", OURS)
def test_committed_notebook_is_stripped_and_has_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "strip outputs before committing"
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert nb.cells[0].cell_type == "markdown"


def test_tokenizer_notebook_prints_the_runs_validation_psnr_and_draws_its_figures(lab):
    root, nb = lab
    out = text_output(nb)
    final = {k: v for r in read_metrics(root / "tokenizer") for k, v in r.items() if k.startswith("val/psnr")}
    assert f"tokenizer validation PSNR: {final['val/psnr']:.2f} dB (target: 25 dB or more)" in out
    for domain in ("atari", "box2d"):
        assert re.search(rf"{domain}\s+{final[f'val/psnr/{domain}']:.2f} dB", out)
    assert figures(nb) == 5  # data frames, 2 curve figures, reconstructions, per-domain bars
    assert (root / "tokenizer" / "tokenizer" / "tokenizer.safetensors").is_file()
    assert sorted(p.name for p in (root / "data" / "val").glob("*.pt")) == [f"{t}.pt" for t in sorted(TASKS)]


def test_dynamics_notebook_trains_on_notebook_01s_tokenizer_and_prints_dpsnr_and_shuffle_ratio(lab, tmp_path):
    root, _ = lab
    nb = execute(OURS[1], tmp_path, **DATA, DATA_DIR=str(root / "data"), TOKENIZER=str(root / "tokenizer" / "tokenizer"),
                 RUN_DIR=str(tmp_path / "dynamics"), STEPS=6, MINUTES=2, CTX=4, HORIZON=4,
                 OVERRIDES={"dynamics_train.seq_len": 8, "dynamics_train.batch_size": 8,
                            "dynamics_train.eval_every": 0, "dynamics_train.eval_windows": 4,
                            "dynamics_train.log_every": 2, "dynamics.d_model": 64, "dynamics.depth": 2})
    out = text_output(nb)
    final = {k: v for r in read_metrics(tmp_path / "dynamics") for k, v in r.items() if k.startswith("val/")}
    assert f"frozen tokenizer: {root / 'tokenizer' / 'tokenizer'}" in out
    assert f"validation dPSNR: {final['val/dpsnr']:+.2f} dB (target: > 0 dB" in out
    assert f"action-shuffle ratio: {final['val/action_shuffle_ratio']:.3f} (target: > 1.2" in out
    assert figures(nb) == 5  # 2 curve figures, 2 rollout grids, per-domain bars
    assert (tmp_path / "dynamics" / "world_model" / "model.safetensors").is_file()


def test_data_collection_notebook_collects_preprocesses_and_weighs_tasks(tmp_path):
    data = tmp_path / "collection"
    nb = execute(OURS[2], tmp_path, EPISODES={"lunarlander-hover": 2, "atari-pong": 1}, POLICY_TASK="lunarlander-hover",
                 SIZE=32, MAX_STEPS=30, WORKERS=1, DATA_DIR=str(data), SEQ_LEN=8)
    for policy in ("zero", "random", "brownian"):
        assert (data / "policies" / policy / "lunarlander-hover.pt").is_file()
    for shards in ("shards-chunks", "shards-pt"):
        for task in TASKS:
            assert (data / shards / task / f"{task}_index.json").is_file()
    out = text_output(nb)
    starts = dict(re.findall(r"'([\w-]+)': (\d+)", out.split("valid window starts per task:")[1]))
    assert set(starts) == set(TASKS) and int(starts["lunarlander-hover"]) > int(starts["atari-pong"])
    assert figures(nb) == 6  # actions, policy frames, task frames, sizes, frames per task, weighting masses


@pytest.mark.slow
def test_dynamics_notebook_trains_its_own_tokenizer_when_notebook_01_has_not_run(lab, tmp_path):
    root, _ = lab
    nb = execute(OURS[1], tmp_path, **DATA, DATA_DIR=str(root / "data"), TOKENIZER=str(tmp_path / "missing"),
                 TOKENIZER_MINUTES=1, TOKENIZER_OVERRIDES={"tokenizer_train.steps": 3},
                 RUN_DIR=str(tmp_path / "dynamics"), STEPS=2, MINUTES=1, CTX=4, HORIZON=4,
                 OVERRIDES={"dynamics_train.seq_len": 8, "dynamics_train.batch_size": 4,
                            "dynamics_train.eval_every": 0, "dynamics_train.eval_windows": 2,
                            "dynamics_train.log_every": 1, "dynamics.d_model": 64, "dynamics.depth": 2})
    fallback = tmp_path / "dynamics" / "tokenizer_run" / "tokenizer"
    assert f"frozen tokenizer: {fallback}" in text_output(nb)
    assert (fallback / "tokenizer.safetensors").is_file()
    assert "validation dPSNR" in text_output(nb)
