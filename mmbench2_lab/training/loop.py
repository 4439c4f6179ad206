"""The training loop both stages share: resume, step, clip, log, evaluate, checkpoint, export.

A stage (tokenizer, dynamics) subclasses :class:`Stage` and supplies its modules, its dataset, a loss for a
batch, an evaluation and an export. The loop does everything else the same way for both, so resume,
SIGTERM handling, DDP and metrics behave identically across stages.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from mmbench2_lab.config import Config
from mmbench2_lab.data.sampling import task_weights
from mmbench2_lab.training.engine import (Dist, EmaRms, MetricsLog, StepBatchSampler, StopFlag, atomic_save,
                                          autocast_context, averaged_models, averaged_weights,
                                          cleanup_distributed, clip_per_module, load_run_checkpoint, step_seed,
                                          scheduled_lr)


def item_weights(dataset, mode: str, alpha: float = 0.5) -> torch.Tensor:
    """One sampling weight per dataset window, from the task weighting ``mode`` (coverage-aware etc.)."""
    starts = dataset.starts_per_task
    w_task = task_weights(starts, mode, alpha=alpha)
    return torch.cat([torch.full((n,), w_task[t] / n, dtype=torch.float64) for t, n in starts.items() if n])


class Stage:
    """One training stage. Subclasses set ``name`` and implement the hooks below."""

    name = "stage"
    section = "tokenizer_train"  # which TrainConfig of the Config this stage reads

    def __init__(self, config: Config, d: Dist):
        self.config, self.d = config, d
        self.tc = getattr(config, self.section)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Trainable modules by name; each is clipped separately and DDP-wrapped separately."""
        raise NotImplementedError

    def dataset(self):
        raise NotImplementedError

    def loss(self, batch: dict, step: int, nets: dict[str, torch.nn.Module]) -> tuple[torch.Tensor, dict]:
        """(scalar loss to minimise, metrics to log) for this rank's slice of the global batch."""
        raise NotImplementedError

    def normalisers(self) -> dict[str, EmaRms]:
        """Running-RMS loss normalisers; saved and restored with the run."""
        return {}

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics (rank 0 only)."""
        return {}

    def export(self, out_dir: Path) -> Path:
        """Write the trained weights in our own format; return the folder."""
        raise NotImplementedError


def run(stage: Stage, *, resume: bool = False, progress: bool = True, max_seconds: float | None = None) -> Path:
    """Train ``stage`` to its ``steps`` (or until ``max_seconds``/SIGTERM), checkpointing as it goes.

    ``resume=True`` continues from ``<out_dir>/checkpoints/latest.pt`` exactly where it stopped (weights,
    optimizer, loss normalisers, weight average, step; data and noise are functions of the step). With
    ``ema_decay`` set, evaluation and export use the averaged weights. Returns the export folder.
    """
    cfg, d = stage.tc, stage.d
    out = Path(cfg.out_dir)
    metrics = MetricsLog(out, enabled=d.is_main, tensorboard=cfg.tensorboard)
    mods = stage.modules()
    for m in mods.values():
        m.to(d.device).train()
    params = [p for m in mods.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    norms = stage.normalisers()
    for n in norms.values():
        n.to(d.device)
    ema = averaged_models(mods, cfg.ema_decay)

    start = 0
    if resume:
        ckpt = load_run_checkpoint(out)
        if ckpt is None:
            if d.is_main:
                print(f"no checkpoint in {out / 'checkpoints'}; starting from step 0")
        else:
            if ckpt["stage"] != stage.name:
                raise ValueError(f"{out} holds a {ckpt['stage']} run, not a {stage.name} run; pick another out_dir")
            for k, m in mods.items():
                m.load_state_dict(ckpt["modules"][k])
            opt.load_state_dict(ckpt["opt"])
            for k, n in norms.items():
                n.load_state_dict(ckpt["normalisers"][k])
            for k, e in ema.items():
                if k not in ckpt.get("ema", {}):
                    raise ValueError(f"{out} was trained without a weight average (ema_decay=0); resume it "
                                     "with ema_decay=0 or start a new run in another out_dir")
                e.load_state_dict(ckpt["ema"][k])
            start = int(ckpt["step"])
            metrics.truncate_after(start)
    if d.is_main:
        stage.config.save(out / "config.json")

    nets = {k: DDP(m, broadcast_buffers=False) if d.enabled else m for k, m in mods.items()}
    if cfg.compile:
        nets = {k: torch.compile(m) for k, m in nets.items()}
    data = stage.dataset()
    sampler = StepBatchSampler(item_weights(data, cfg.task_weighting, cfg.targeted_alpha), cfg.batch_size,
                               cfg.steps, seed=cfg.seed, d=d, start_step=start)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         persistent_workers=cfg.num_workers > 0)

    def save(step: int) -> None:
        if not d.is_main:
            return
        state = {"stage": stage.name, "step": step, "config": stage.config.to_dict(),
                 "modules": {k: m.state_dict() for k, m in mods.items()}, "opt": opt.state_dict(),
                 "normalisers": {k: n.state_dict() for k, n in norms.items()},
                 "ema": {k: e.state_dict() for k, e in ema.items()}}
        atomic_save(state, out / "checkpoints" / "latest.pt")

    bar = None
    if progress and d.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {stage.name}", dynamic_ncols=True)
    t0, done = time.time(), start
    with StopFlag() as stop:
        for step, batch in enumerate(loader, start=start):
            torch.manual_seed(step_seed(cfg.seed, step, stream=3 + d.rank))  # dropout and the like
            for g in opt.param_groups:
                g["lr"] = scheduled_lr(step, cfg.lr, cfg.warmup_steps, cfg.lr_decay, cfg.steps)
            batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
            with autocast_context(cfg.amp, d.device):
                loss, logs = stage.loss(batch, step, nets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms = clip_per_module(mods, cfg.grad_clip)
            opt.step()
            for k, e in ema.items():
                e.update_parameters(mods[k])
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.4f}")
            if d.is_main and (done % cfg.log_every == 0 or done == cfg.steps):
                metrics.log(done, {"train/loss": loss, **{f"train/{k}": v for k, v in logs.items()},
                                   **{f"train/grad_norm/{k}": v for k, v in grad_norms.items()},
                                   "train/lr": opt.param_groups[0]["lr"],
                                   "train/seconds": time.time() - t0})
            out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
            if done % cfg.ckpt_every == 0 or stop.requested or out_of_time:
                save(done)
            if stop.requested or out_of_time:
                break
            if d.is_main and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                with averaged_weights(mods, ema):
                    metrics.log(done, stage.evaluate(done))
    if bar is not None:
        bar.close()
    save(done)
    export_dir = out
    if not stop.requested and d.is_main:
        # Finished (or out of its time budget): evaluate and export what was trained (averaged, if asked).
        with averaged_weights(mods, ema):
            metrics.log(done, stage.evaluate(done))
            export_dir = stage.export(out)
    cleanup_distributed()
    return export_dir
