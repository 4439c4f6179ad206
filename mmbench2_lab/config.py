"""Typed configuration: model shapes, training options and the named presets.

Every option is a dataclass field with a one-line help string (``metadata["help"]``). A config is written
to and read from JSON or YAML, and overridden with dotted ``key=value`` strings (command line) or a flat
dict (a papermill ``parameters`` cell), e.g. ``{"tokenizer.d_model": 128, "dynamics_train.steps": 200}``.

Presets:
- ``paper``: the released 350M configuration (tokenizer 50.8M + 50.9M, dynamics 237.5M), 224x224 frames.
- ``small``: a single-GPU configuration at 128x128 that trains in hours.
- ``tiny``: 64x64 frames, trains on a laptop CPU in minutes; used by tests, notebooks and the bundled model.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


def _opt(default, help: str, **kw):
    """A dataclass field carrying its help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class TokenizerConfig:
    """Causal video tokenizer (MAE encoder + decoder, tanh bottleneck)."""
    height: int = _opt(224, "frame height in pixels")
    width: int = _opt(224, "frame width in pixels")
    channels: int = _opt(3, "image channels")
    patch: int = _opt(14, "square patch size; height and width must be multiples of it")
    d_model: int = _opt(512, "transformer width")
    n_heads: int = _opt(8, "attention heads")
    depth: int = _opt(12, "transformer layers in the encoder and in the decoder")
    n_latents: int = _opt(64, "latent tokens per frame")
    d_bottleneck: int = _opt(64, "channels per latent token (tanh-bounded)")
    mlp_ratio: float = _opt(4.0, "MLP expansion before the 2/3 gated-SiLU factor")
    time_every: int = _opt(1, "a layer i has causal time attention iff (i+1) % time_every == 0 "
                              "(above depth: a frame-wise tokenizer)")
    dropout: float = _opt(0.05, "dropout (training only)")
    latents_only_time: bool = _opt(True, "time attention runs over latent tokens only")

    def __post_init__(self):
        if self.height % self.patch or self.width % self.patch:
            raise ValueError(f"tokenizer: height {self.height} and width {self.width} must be multiples of "
                             f"patch {self.patch}; choose a patch that divides both")
        if self.d_model % self.n_heads:
            raise ValueError(f"tokenizer: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")

    @property
    def frame_wise(self) -> bool:
        """True when no layer has time attention: each frame encodes alone, so latents can be cached."""
        return self.time_every > self.depth

    @property
    def n_patches(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch


@dataclass
class DynamicsConfig:
    """Block-causal transformer dynamics with shortcut flow matching, plus optional reward and BC heads."""
    d_model: int = _opt(1024, "transformer width")
    n_heads: int = _opt(8, "attention heads")
    depth: int = _opt(16, "transformer layers")
    mlp_ratio: float = _opt(4.0, "MLP expansion before the 2/3 gated-SiLU factor")
    time_every: int = _opt(2, "a layer i has causal time attention iff (i+1) % time_every == 0")
    dropout: float = _opt(0.0, "dropout (training only)")
    k_max: int = _opt(64, "finest shortcut step is 1/k_max (a power of two)")
    n_register: int = _opt(4, "register tokens per frame")
    n_agent: int = _opt(0, "agent tokens per frame (feed the reward and BC heads only)")
    lang_dim: int = _opt(512, "task/language embedding width")
    action_dim: int = _opt(16, "padded action width")
    packing_factor: int = _opt(2, "latent tokens concatenated per spatial token")
    n_latents: int = _opt(64, "tokenizer latent tokens per frame (from the tokenizer)")
    d_bottleneck: int = _opt(64, "tokenizer latent channels (from the tokenizer)")
    reward_head: bool = _opt(False, "build the multi-token reward head (needs n_agent > 0)")
    reward_L: int = _opt(8, "reward head: future steps predicted")
    reward_num_bins: int = _opt(255, "reward head: two-hot bins")
    reward_log_low: float = _opt(-10.0, "reward head: lowest bin centre in symlog space")
    reward_log_high: float = _opt(10.0, "reward head: highest bin centre in symlog space")
    reward_mlp_ratio: float = _opt(2.0, "reward head: projector MLP ratio")
    reward_pool_agent: str = _opt("attn", "reward head: pooling over agent tokens (attn, mean, first)")
    bc_head: bool = _opt(False, "build the behaviour-cloning head (needs n_agent > 0)")
    bc_L: int = _opt(8, "BC head: future actions predicted")
    bc_act_dim: int = _opt(16, "BC head: action width")
    bc_mlp_ratio: float = _opt(2.0, "BC head: projector MLP ratio")
    bc_pool_agent: str = _opt("attn", "BC head: pooling over agent tokens (attn, mean, first)")

    def __post_init__(self):
        if self.k_max < 1 or self.k_max & (self.k_max - 1):
            raise ValueError(f"dynamics: k_max must be a power of two, got {self.k_max}")
        if self.n_latents % self.packing_factor:
            raise ValueError(f"dynamics: n_latents {self.n_latents} is not divisible by packing_factor "
                             f"{self.packing_factor}")
        if self.d_model % self.n_heads:
            raise ValueError(f"dynamics: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.reward_head or self.bc_head) and self.n_agent < 1:
            raise ValueError("dynamics: reward and BC heads read agent tokens; set n_agent >= 1")

    @property
    def n_spatial(self) -> int:
        return self.n_latents // self.packing_factor

    @property
    def d_spatial(self) -> int:
        return self.d_bottleneck * self.packing_factor

    @property
    def emax(self) -> int:
        return int(math.log2(self.k_max))


@dataclass
class TrainConfig:
    """Options shared by the tokenizer and dynamics trainers."""
    data_dirs: list = _opt([], "raw-layout or shard directories to train on")
    val_dirs: list = _opt([], "held-out directories for validation (default: a split of data_dirs)")
    out_dir: str = _opt("runs/default", "where checkpoints, metrics.jsonl and figures go")
    seq_len: int = _opt(24, "frames per training window")
    batch_size: int = _opt(12, "sequences per step per process")
    steps: int = _opt(300_000, "optimizer steps")
    lr: float = _opt(1e-4, "AdamW learning rate")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    warmup_steps: int = _opt(0, "linear LR warmup steps")
    lr_decay: str = _opt("none", "after warmup: none (constant, the reference) or cosine (to 10% at `steps`)")
    grad_clip: float = _opt(1.0, "max gradient norm, applied per module")
    ema_decay: float = _opt(0.0, "decay of an exponential moving average of the weights, which evaluation and "
                                 "export then use (0: off, as in the reference)")
    task_weighting: str = _opt("valid_starts", "valid_starts (frame-proportional), uniform (coverage-aware), "
                                               "or targeted")
    targeted_alpha: float = _opt(0.5, "targeted weighting: mass on the SEEN and UNSEEN tasks")
    mae_p_max: float = _opt(0.9, "tokenizer: per-frame MAE drop rate ~ U(0, mae_p_max)")
    recon_loss_on: str = _opt("masked", "tokenizer: reconstruction loss on the masked patches (the reference) "
                                        "or on all patches (more signal per step for short CPU runs)")
    lpips_weight: float = _opt(0.0, "tokenizer: LPIPS weight (0.2 in the paper; needs LPIPS weights)")
    self_fraction: float = _opt(0.25, "dynamics: fraction of each batch used for shortcut bootstrap rows")
    bootstrap_start: int = _opt(10_000, "dynamics: step at which the bootstrap loss switches on")
    reward_weight: float = _opt(0.0, "dynamics: reward head loss weight")
    bc_weight: float = _opt(0.0, "dynamics: BC head loss weight")
    eval_every: int = _opt(1000, "steps between evaluations")
    eval_ctx: int = _opt(8, "dynamics evaluation: context frames of each rollout")
    eval_horizon: int = _opt(16, "dynamics evaluation: frames rolled out open-loop")
    eval_windows: int = _opt(32, "held-out windows per evaluation")
    val_fraction: float = _opt(0.1, "episodes per task held out for validation when val_dirs is empty")
    tokenizer_path: str = _opt("", "dynamics: the frozen tokenizer (our folder, a world-model folder, or an "
                                   "official tokenizer.pt)")
    init_from: str = _opt("", "start from these weights (our folder or official files) instead of scratch")
    ckpt_every: int = _opt(5000, "steps between checkpoints")
    log_every: int = _opt(50, "steps between metric lines")
    seed: int = _opt(0, "random seed")
    num_workers: int = _opt(0, "DataLoader worker processes")
    amp: str = _opt("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or none")
    compile: bool = _opt(False, "torch.compile the model")
    tensorboard: bool = _opt(False, "also write TensorBoard event files")


@dataclass
class SamplerConfig:
    """Shortcut Euler sampling at inference."""
    steps: int = _opt(4, "Euler steps K per frame (step size 1/K)")
    tau_ctx: float = _opt(0.1, "context corruption level")
    tau_init: float = _opt(0.0, "warm start from the previous latent (0.125 in the interactive demo)")
    ctx_window: int = _opt(24, "context frames kept at inference")
    kv_cache: bool = _opt(True, "prefill the context once and decode the new frame against the cache")
    n_seeds: int = _opt(2, "noise seeds per prediction (u_s needs >= 2)")
    amp: str = _opt("fp16", "dynamics autocast on GPU: fp16 (the reference demo), bf16 or none; CPU runs fp32")


@dataclass
class Config:
    """A whole workbench configuration: model, training and sampling."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    dynamics: DynamicsConfig = field(default_factory=DynamicsConfig)
    tokenizer_train: TrainConfig = field(default_factory=TrainConfig)
    dynamics_train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    preset: str = _opt("paper", "the preset this config started from")

    def __post_init__(self):
        # The dynamics reads the tokenizer's latent grid; keep the two in step.
        self.dynamics.n_latents = self.tokenizer.n_latents
        self.dynamics.d_bottleneck = self.tokenizer.d_bottleneck

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Config":
        return _build(cls, data, "config")

    def save(self, path: str | Path) -> Path:
        """Write JSON or YAML (chosen by suffix)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml
            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        return cls.from_dict(data)

    def override(self, overrides: Mapping[str, Any] | list[str] | None) -> "Config":
        """A copy with dotted overrides applied: ``{"dynamics_train.steps": 10}`` or ``["dynamics_train.steps=10"]``."""
        data = self.to_dict()
        for key, value in _as_pairs(overrides):
            section, _, name = key.partition(".")
            if not name:
                if section not in data or isinstance(data[section], dict):
                    raise KeyError(_unknown(key, [f"{s}.{n}" for s, v in data.items() if isinstance(v, dict)
                                                  for n in v] + [k for k, v in data.items()
                                                                 if not isinstance(v, dict)]))
                data[section] = value
                continue
            if section not in data or not isinstance(data[section], dict) or name not in data[section]:
                raise KeyError(_unknown(key, [f"{s}.{n}" for s, v in data.items() if isinstance(v, dict)
                                              for n in v]))
            data[section][name] = value
        return Config.from_dict(data)


def _as_pairs(overrides) -> list[tuple[str, Any]]:
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value, e.g. train.steps=100")
        key, raw = item.split("=", 1)
        pairs.append((key.strip(), _parse_scalar(raw.strip())))
    return pairs


def _parse_scalar(raw: str):
    """Parse a command-line value with YAML rules (numbers, booleans, lists), else keep the string."""
    import yaml
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _build(cls, data: Mapping[str, Any], where: str):
    """Construct a (nested) dataclass from a dict, coercing scalar types and rejecting unknown keys."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise KeyError(_unknown(f"{where}.{key}", [f"{where}.{n}" for n in names]))
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint, value, where):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, (bool, int)):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{where}: expected a number, got {value!r}") from None
    if hint is list:
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return value


# -- presets ------------------------------------------------------------------------------------
def _paper() -> Config:
    return Config(
        tokenizer=TokenizerConfig(),
        dynamics=DynamicsConfig(),
        tokenizer_train=TrainConfig(seq_len=24, batch_size=12, steps=300_000, ckpt_every=10_000),
        dynamics_train=TrainConfig(seq_len=24, batch_size=64, steps=180_000, warmup_steps=1000, eval_every=1000),
        sampler=SamplerConfig(steps=4, tau_ctx=0.1, ctx_window=24),
        preset="paper",
    )


def _small() -> Config:
    return Config(
        tokenizer=TokenizerConfig(height=128, width=128, patch=8, d_model=384, n_heads=6, depth=8,
                                  n_latents=32, d_bottleneck=32),
        dynamics=DynamicsConfig(d_model=512, n_heads=8, depth=8, k_max=64),
        tokenizer_train=TrainConfig(seq_len=8, batch_size=32, steps=50_000, ckpt_every=5000),
        dynamics_train=TrainConfig(seq_len=24, batch_size=32, steps=50_000, warmup_steps=500),
        sampler=SamplerConfig(steps=4, tau_ctx=0.1, ctx_window=16),
        preset="small",
    )


def _tiny() -> Config:
    return Config(
        # Frame-wise (no time layers): latents are cached once for dynamics training on a CPU.
        tokenizer=TokenizerConfig(height=64, width=64, patch=8, d_model=96, n_heads=4, depth=2,
                                  time_every=3, n_latents=16, d_bottleneck=16, dropout=0.0),
        dynamics=DynamicsConfig(d_model=128, n_heads=4, depth=4, time_every=2, k_max=16),
        # The 10-minute CPU recipe: single frames (the tokenizer is frame-wise), loss on every patch, light
        # masking, cosine decay; lr 5e-4 because from 1e-3 up tanh saturates and the encoder stops learning.
        tokenizer_train=TrainConfig(seq_len=1, batch_size=32, steps=2200, lr=5e-4, warmup_steps=100,
                                    lr_decay="cosine", mae_p_max=0.25, recon_loss_on="all",
                                    eval_every=500, ckpt_every=500, log_every=25, eval_windows=32),
        # 16-frame windows of 8: more optimizer steps in a 10-minute CPU run; the context window matches.
        # The bootstrap starts early: evaluation samples with coarse steps (K = 1 and 4), which only it trains.
        dynamics_train=TrainConfig(seq_len=16, batch_size=8, steps=1700, lr=1e-3, warmup_steps=100,
                                   lr_decay="cosine", bootstrap_start=200, eval_every=500, ckpt_every=500,
                                   log_every=25, eval_windows=32),
        sampler=SamplerConfig(steps=4, tau_ctx=0.1, ctx_window=16),
        preset="tiny",
    )


PRESETS = {"paper": _paper, "small": _small, "tiny": _tiny}


def preset(name: str, overrides: Mapping[str, Any] | list[str] | None = None) -> Config:
    """A fresh copy of a named preset, with optional dotted overrides."""
    if name not in PRESETS:
        raise KeyError(_unknown(name, list(PRESETS)).replace("config key", "preset"))
    return PRESETS[name]().override(overrides)
