"""Training runs: they learn, they resume exactly after kill -9, and torchrun matches one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmbench2_lab.config import preset
from mmbench2_lab.training.engine import read_metrics

# A micro configuration of the real architecture: 16x16 frames, one layer per stack.
MICRO = ["tokenizer.height=16", "tokenizer.width=16", "tokenizer.patch=4", "tokenizer.d_model=32",
         "tokenizer.n_heads=2", "tokenizer.depth=1", "tokenizer.time_every=1", "tokenizer.n_latents=4",
         "tokenizer.d_bottleneck=8", "dynamics.d_model=32", "dynamics.n_heads=2", "dynamics.depth=2",
         "dynamics.k_max=8"]


def cli(*args, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "mmbench2_lab.cli", *args], env=env, **kw)


def train_args(stage, data, out, steps, extra=(), options=()):
    section = "tokenizer_train" if stage == "train-tokenizer" else "dynamics_train"
    return [stage, "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", str(steps),
            "--no-progress", *options, "--set", *MICRO, f"{section}.batch_size=4", f"{section}.seq_len=4",
            f"{section}.ckpt_every=3", f"{section}.eval_every=0", f"{section}.log_every=1", *extra]


def weights(folder: Path, name: str) -> dict:
    return load_file(str(folder / name))


def test_tokenizer_training_reduces_the_loss_and_exports(sim_data, tmp_path):
    out = tmp_path / "tok"
    proc = cli(*train_args("train-tokenizer", sim_data, out, 30, [f"tokenizer_train.val_dirs=[{sim_data}]",
                                                                  "tokenizer_train.lr=0.003"]))
    assert proc.wait(timeout=300) == 0
    rows = [r for r in read_metrics(out) if "train/mse" in r]
    first, last = sum(r["train/mse"] for r in rows[:5]) / 5, sum(r["train/mse"] for r in rows[-5:]) / 5
    assert last < 0.7 * first
    assert any("val/psnr/dmcontrol" in r for r in read_metrics(out))
    assert (out / "tokenizer" / "tokenizer.safetensors").is_file()


def test_kill_9_then_resume_gives_the_weights_of_an_uninterrupted_run(sim_data, tmp_path):
    steps = 24
    # the cosine schedule, the all-patch loss and the weight average (the CPU recipe) must resume exactly too
    recipe = ["tokenizer_train.lr_decay=cosine", "tokenizer_train.recon_loss_on=all", "tokenizer_train.ema_decay=0.9"]
    full = tmp_path / "full"
    assert cli(*train_args("train-tokenizer", sim_data, full, steps, recipe)).wait(timeout=300) == 0

    cut = tmp_path / "cut"
    proc = cli(*train_args("train-tokenizer", sim_data, cut, steps, recipe))
    latest = cut / "checkpoints" / "latest.pt"
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(latest, weights_only=True)["step"]
    assert 0 < killed_at < steps, "the run finished before it could be killed; the test proved nothing"

    assert cli(*train_args("train-tokenizer", sim_data, cut, steps, recipe), "--resume").wait(timeout=300) == 0
    a, b = weights(full / "tokenizer", "tokenizer.safetensors"), weights(cut / "tokenizer", "tokenizer.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resumed run re-logged the steps after the checkpoint instead of duplicating them
    steps_logged = [r["step"] for r in read_metrics(cut) if "train/loss" in r]
    assert steps_logged == sorted(set(steps_logged))


def test_sigterm_checkpoints_the_step_it_reached_and_resume_finishes_like_an_uninterrupted_run(sim_data, tmp_path):
    # constant LR, so that the total step count (unknown until the signal lands) does not change the schedule;
    # interval checkpoints off, so the only checkpoint is the one SIGTERM writes
    recipe = ["tokenizer_train.lr_decay=none", "tokenizer_train.ckpt_every=100000"]
    cut = tmp_path / "cut"
    proc = cli(*train_args("train-tokenizer", sim_data, cut, 100_000, recipe))
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and len(read_metrics(cut)) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "SIGTERM ends the run cleanly"
    reached = torch.load(cut / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert 3 <= reached < 100_000
    assert not (cut / "tokenizer").exists(), "an interrupted run exports nothing"
    assert max(r["step"] for r in read_metrics(cut)) <= reached

    total = reached + 2
    assert cli(*train_args("train-tokenizer", sim_data, cut, total, recipe), "--resume").wait(timeout=300) == 0
    full = tmp_path / "full"
    assert cli(*train_args("train-tokenizer", sim_data, full, total, recipe)).wait(timeout=300) == 0
    a, b = weights(full / "tokenizer", "tokenizer.safetensors"), weights(cut / "tokenizer", "tokenizer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_exported_weights_are_the_moving_average_of_the_steps(sim_data, tmp_path):
    # Data and noise are functions of the step and the LR is constant, so a run of k steps is the first k
    # steps of a longer one: runs of 1, 2, 3 steps give the raw weights W1, W2, W3 of each step.
    constant = ["tokenizer_train.lr_decay=none"]
    raw = []
    for k in (1, 2, 3):
        out = tmp_path / f"raw{k}"
        assert cli(*train_args("train-tokenizer", sim_data, out, k, constant)).wait(timeout=300) == 0
        raw.append(weights(out / "tokenizer", "tokenizer.safetensors"))
    out = tmp_path / "ema"
    assert cli(*train_args("train-tokenizer", sim_data, out, 3, [*constant, "tokenizer_train.ema_decay=0.5"])).wait(timeout=300) == 0
    averaged = weights(out / "tokenizer", "tokenizer.safetensors")
    w1, w2, w3 = raw
    for k in averaged:  # E1 = W1, E2 = (E1 + W2) / 2, E3 = (E2 + W3) / 2
        torch.testing.assert_close(averaged[k], 0.25 * w1[k] + 0.25 * w2[k] + 0.5 * w3[k], msg=k)
    assert any(not torch.equal(averaged[k], w3[k]) for k in averaged), "the average equals the last step"
    # training itself went on with the raw weights: the checkpoint holds W3 beside the average
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    encoder_keys = [k for k in ckpt["modules"]["encoder"] if f"encoder.{k}" in w3]
    assert encoder_keys and all(torch.equal(ckpt["modules"]["encoder"][k], w3[f"encoder.{k}"]) for k in encoder_keys)


def test_torchrun_two_processes_match_one_process_at_equal_global_batch(sim_data, tmp_path):
    steps = 4
    one = tmp_path / "one"
    extra = ["tokenizer_train.batch_size=4"]
    assert cli(*train_args("train-tokenizer", sim_data, one, steps, extra)).wait(timeout=300) == 0
    two = tmp_path / "two"
    args = train_args("train-tokenizer", sim_data, two, steps, ["tokenizer_train.batch_size=2"])
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29517", "-m", "mmbench2_lab.cli", *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.wait(timeout=300) == 0
    a, b = weights(one / "tokenizer", "tokenizer.safetensors"), weights(two / "tokenizer", "tokenizer.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    # a second process never wrote: one metrics stream, one config
    assert len(list(two.glob("metrics*.jsonl"))) == 1


def test_dynamics_training_on_a_frozen_tokenizer_runs_evaluates_and_exports(sim_data, tmp_path):
    tok = tmp_path / "tok"
    assert cli(*train_args("train-tokenizer", sim_data, tok, 3)).wait(timeout=300) == 0
    out = tmp_path / "dyn"
    extra = ["dynamics_train.eval_every=4", "dynamics_train.eval_ctx=2",
             "dynamics_train.eval_horizon=3", "dynamics_train.eval_windows=4", "dynamics_train.val_fraction=0.34",
             "dynamics_train.bootstrap_start=2"]
    options = ["--tokenizer", str(tok / "tokenizer")]
    assert cli(*train_args("train-dynamics", sim_data, out, 6, extra, options)).wait(timeout=300) == 0
    rows = read_metrics(out)
    evals = [r for r in rows if "val/dpsnr" in r]
    assert evals and all(r["val/action_shuffle_ratio"] > 0 for r in evals)
    assert any(r.get("train/bootstrap_mse", 0) > 0 for r in rows)
    from mmbench2_lab.checkpoints import load_pretrained
    model = load_pretrained(str(out / "world_model"))
    exported = json.loads((out / "world_model" / "config.json").read_text())
    assert exported["tokenizer"]["d_model"] == 32 and model.config.dynamics.depth == 2
    assert exported["tokenizer_train"]["steps"] == 3, "the world model records how its tokenizer was trained"


def test_finetuning_our_world_model_keeps_its_weights_and_adds_agent_tokens_and_heads(sim_data, tmp_path):
    from mmbench2_lab.checkpoints import load_pretrained
    from mmbench2_lab.training.dynamics import DynamicsStage
    tok, base = tmp_path / "tok", tmp_path / "base"
    assert cli(*train_args("train-tokenizer", sim_data, tok, 2)).wait(timeout=300) == 0
    options = ["--tokenizer", str(tok / "tokenizer")]
    assert cli(*train_args("train-dynamics", sim_data, base, 3, [], options)).wait(timeout=300) == 0
    source = load_pretrained(str(base / "world_model")).state_dict()

    heads = ["dynamics.n_agent=1", "dynamics.reward_head=true", "dynamics.bc_head=true",
             "dynamics_train.reward_weight=1.0", "dynamics_train.bc_weight=1.0"]
    config = preset("tiny", [*MICRO, *heads, f"dynamics_train.tokenizer_path={tok / 'tokenizer'}",
                             f"dynamics_train.init_from={base / 'world_model'}"])
    model = DynamicsStage(config).model.state_dict()
    new = sorted(k for k in model if k not in source)
    assert new and all(k.startswith(("dynamics.task_proj.", "reward_head.", "policy_head.")) for k in new), new
    assert all(torch.equal(model[k], source[k]) for k in source), "every pretrained weight is loaded as it was"

    tuned = tmp_path / "tuned"
    options = [*options, "--init-from", str(base / "world_model")]
    assert cli(*train_args("train-dynamics", sim_data, tuned, 2, heads, options)).wait(timeout=300) == 0
    rows = [r for r in read_metrics(tuned) if "train/loss_rew" in r]
    assert rows and all(r["train/loss_rew"] > 0 and r["train/loss_bc"] > 0 for r in rows)
    exported = load_pretrained(str(tuned / "world_model"))
    assert exported.reward_head is not None and exported.policy_head is not None

    deeper = preset("tiny", [*MICRO, "dynamics.depth=3", f"dynamics_train.tokenizer_path={tok / 'tokenizer'}",
                             f"dynamics_train.init_from={base / 'world_model'}"])
    with pytest.raises(ValueError, match="lacks .* dynamics weights this config needs"):
        DynamicsStage(deeper)
    untrained_head = preset("tiny", [*MICRO, *heads[:3], f"dynamics_train.tokenizer_path={tok / 'tokenizer'}"])
    with pytest.raises(ValueError, match="reward_weight is 0, so the head would never train"):
        DynamicsStage(untrained_head)


def test_finetuning_a_tokenizer_starts_from_its_weights_and_refuses_another_architecture(sim_data, tmp_path):
    from mmbench2_lab.checkpoints import load_tokenizer
    from mmbench2_lab.training.tokenizer import TokenizerStage
    base = tmp_path / "base"
    assert cli(*train_args("train-tokenizer", sim_data, base, 2)).wait(timeout=300) == 0
    source = load_tokenizer(base / "tokenizer")[0].state_dict()
    stage = TokenizerStage(preset("tiny", [*MICRO, f"tokenizer_train.init_from={base / 'tokenizer'}"]))
    assert all(torch.equal(v, source[k]) for k, v in stage.tokenizer.state_dict().items())
    tuned = tmp_path / "tuned"
    assert cli(*train_args("train-tokenizer", sim_data, tuned, 1, [], ["--init-from", str(base / "tokenizer")])
               ).wait(timeout=300) == 0
    assert json.loads((tuned / "config.json").read_text())["tokenizer_train"]["init_from"] == str(base / "tokenizer")
    wider = preset("tiny", [*MICRO, "tokenizer.d_model=64", f"tokenizer_train.init_from={base / 'tokenizer'}"])
    with pytest.raises(ValueError, match="tokenizer_train.init_from .* does not match the model built from its config"):
        TokenizerStage(wider)


def test_bad_training_input_is_named(tmp_path, capsys):
    from mmbench2_lab.cli import main
    assert main(["train-dynamics", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "tokenizer_path is empty" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="LPIPS"):
        from mmbench2_lab.training.tokenizer import TokenizerStage
        TokenizerStage(preset("tiny", {"tokenizer_train.lpips_weight": 0.2}))
    with pytest.raises(ValueError, match="recon_loss_on"):
        TokenizerStage(preset("tiny", {"tokenizer_train.recon_loss_on": "visible"}))


def test_cosine_schedule_warms_up_then_decays_to_a_tenth():
    from mmbench2_lab.training.engine import scheduled_lr
    lrs = [scheduled_lr(s, 1.0, 10, "cosine", 110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone after warmup
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert scheduled_lr(500, 1.0, 10) == 1.0  # "none": the reference's constant rate
    with pytest.raises(ValueError, match="lr_decay"):
        scheduled_lr(50, 1.0, 10, "linear", 100)
