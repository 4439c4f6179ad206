"""What every training run needs: processes, seeding, batches, checkpoints, metrics.

Design choices that make runs trustworthy:
- **All randomness is a function of (seed, step)**: each step draws its batch indices and noise from
  generators seeded by ``step_seed(seed, step)``. A resumed run therefore continues exactly (same data,
  same noise) without saving RNG or data-loader state, and the run does not depend on worker timing.
- **Data parallelism slices one global batch**: the global batch of ``batch_size * world_size`` indices is
  drawn identically on every rank and rank r takes its slice, so ``torchrun --nproc_per_node=N`` at batch B
  computes the same update as one process at batch N*B (up to float summation order).
- **Checkpoints are atomic** (write to a temporary file, then rename) and only rank 0 writes. SIGTERM asks
  the loop to checkpoint and stop at the end of the current step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# -- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group torchrun set up (nccl on GPU, gloo on CPU); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of a tensor across ranks (identity in a single process)."""
    if not d.enabled:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / d.world_size


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- seeding and batches ------------------------------------------------------------------------


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed for (run seed, step, stream); streams separate data, noise and model randomness."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) % (1 << 63)
    return x


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(step_seed(seed, step, stream))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of the global batch for each step in [start_step, steps).

    Indices are drawn with replacement with probability proportional to ``weights`` (one weight per
    dataset item: frame-proportional, task-uniform or targeted, see ``mmbench2_lab.data.sampling``).
    """

    def __init__(self, weights: torch.Tensor, batch_size: int, steps: int, *, seed: int, d: Dist = Dist(),
                 start_step: int = 0):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.ndim != 1 or len(weights) == 0 or not torch.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError("sampling weights must be a non-empty 1-D vector of finite values with a "
                             "positive sum; is the dataset empty?")
        self.weights, self.batch_size, self.steps = weights, batch_size, steps
        self.seed, self.d, self.start_step = seed, d, start_step

    def global_indices(self, step: int) -> torch.Tensor:
        g = step_generator(self.seed, step, stream=1)
        return torch.multinomial(self.weights, self.batch_size * self.d.world_size, replacement=True,
                                 generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.d.rank * self.batch_size
        for step in range(self.start_step, self.steps):
            yield self.global_indices(step)[lo:lo + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def rank_slice(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's slice of a tensor drawn for the global batch (first dimension)."""
    per = x.shape[0] // d.world_size
    return x[d.rank * per:(d.rank + 1) * per]


# -- precision ----------------------------------------------------------------------------------


def autocast_context(amp: str, device: torch.device):
    """Autocast on GPU (``auto`` = bf16); always float32 on CPU, where autocast is slower than fp32."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if dtype is None:
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- loss normalisation -------------------------------------------------------------------------


class EmaRms(torch.nn.Module):
    """Running RMS of a loss (``sq_ema <- 0.99 sq_ema + 0.01 loss^2``, detached) used to divide it.

    Update first, then normalise, as the reference does. Under data parallelism the loss is averaged
    across ranks before the update, so every rank holds the state a single process would.
    """

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("sq_ema", torch.tensor(1.0))

    @torch.no_grad()
    def update(self, loss: torch.Tensor) -> None:
        value = loss.detach().float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / dist.get_world_size()
        self.sq_ema.mul_(self.decay).add_((1 - self.decay) * value.to(self.sq_ema) ** 2)

    def normalize(self, loss: torch.Tensor) -> torch.Tensor:
        return loss / self.sq_ema.sqrt().clamp_min(1e-8)

    def forward(self, loss: torch.Tensor) -> torch.Tensor:
        self.update(loss)
        return self.normalize(loss)

    @property
    def rms(self) -> float:
        return float(self.sq_ema.sqrt())


# -- optimisation -------------------------------------------------------------------------------


def scheduled_lr(step: int, base_lr: float, warmup_steps: int, decay: str = "none", total_steps: int = 0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then constant (``decay="none"``, the reference) or
    a cosine to 10% of ``base_lr`` at ``total_steps`` (``"cosine"``: better weights from a short run)."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    if decay == "cosine" and step >= warmup_steps and total_steps > warmup_steps:
        frac = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        lr = base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))
    elif decay not in ("none", "cosine"):
        raise ValueError(f"lr_decay must be 'none' or 'cosine', got {decay!r}")
    return lr


def clip_per_module(modules: dict[str, torch.nn.Module], max_norm: float) -> dict[str, float]:
    """Clip each module's gradients separately (the reference clips encoder/decoder, dyn/heads apart)."""
    norms = {}
    for name, m in modules.items():
        params = [p for p in m.parameters() if p.grad is not None]
        if params:
            norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return norms


def averaged_models(modules: dict[str, torch.nn.Module], decay: float) -> dict[str, AveragedModel]:
    """An EMA copy of each module (``decay`` in (0, 1)); none when ``decay`` is 0.

    Averaging the last few hundred steps' weights smooths out the step-to-step noise of a short run at a
    high learning rate, which is where the tiny preset lives.
    """
    if decay == 0:
        return {}
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {decay}")
    return {k: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(decay)) for k, m in modules.items()}


@contextlib.contextmanager
def averaged_weights(modules: dict[str, torch.nn.Module], averaged: dict[str, AveragedModel]):
    """Temporarily load each module's averaged parameters into it (for evaluation and export)."""
    if not averaged:
        yield
        return

    @torch.no_grad()
    def load(params: dict[str, Iterable[torch.Tensor]]) -> None:
        for k, m in modules.items():
            for p, q in zip(m.parameters(), params[k], strict=True):
                p.copy_(q)

    saved = {k: [p.detach().clone() for p in m.parameters()] for k, m in modules.items()}
    load({k: a.module.parameters() for k, a in averaged.items()})
    try:
        yield
    finally:
        load(saved)


# -- checkpoints --------------------------------------------------------------------------------


def atomic_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_run_checkpoint(out_dir: str | Path) -> dict | None:
    """The latest training checkpoint of a run folder, or None if the run has none yet."""
    path = Path(out_dir) / "checkpoints" / "latest.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class StopFlag:
    """Set by SIGTERM (and SIGINT): the loop checkpoints at the end of the step and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook kernel thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# -- metrics ------------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only), optionally to TensorBoard.

    Metric names are stable (``train/loss``, ``val/psnr``, ``val/psnr/<domain>`` ...) so notebooks and
    scripts can plot them across runs.
    """

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, _scalar(v), step)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (a resumed run re-logs them)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)


def read_metrics(out_dir: str | Path) -> list[dict]:
    """All metric rows of a run folder."""
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _scalar(v) -> float:
    v = float(v.item() if isinstance(v, torch.Tensor) else v)
    return v if math.isfinite(v) else float("nan")


def cycle(it: Iterable):
    """Iterate forever (the step sampler already bounds the run)."""
    while True:
        yield from it
