"""Loading world models: the official reference checkpoints, the hub variants, our own saved folders.

Official files are the reference trainers' ``torch.save`` dicts: ``tokenizer.pt`` holds ``model`` (the
Tokenizer state dict) and ``args``; ``dynamics.pt`` holds ``dynamics``, optional ``rew_head`` /
``policy_head`` state dicts and ``args``. The config is rebuilt from ``args`` with the reference loaders'
fallback defaults, and every state dict loads with strict key and shape matching.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from mmbench2_lab.config import Config, DynamicsConfig, TokenizerConfig
from mmbench2_lab.model.tokenizer import Tokenizer
from mmbench2_lab.model.world_model import CONFIG_NAME, WorldModel, load_strict

HUB_REPO = "nicklashansen/mmbench2-models"
VARIANTS = ("base", "coverage_aware", "combined")
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / "bundled"


# -- reference args -> our configs ----------------------------------------------------------------
def tokenizer_config_from_args(args: Mapping[str, Any]) -> TokenizerConfig:
    """The tokenizer trainer's ``args`` -> TokenizerConfig (defaults as in the reference loader)."""
    return TokenizerConfig(
        height=int(args.get("H", 224)), width=int(args.get("W", 224)), channels=int(args.get("C", 3)),
        patch=int(args.get("patch", 4)), d_model=int(args.get("d_model", 256)),
        n_heads=int(args.get("n_heads", 4)), depth=int(args.get("depth", 6)),
        n_latents=int(args.get("n_latents", 16)), d_bottleneck=int(args.get("d_bottleneck", 32)),
        dropout=float(args.get("dropout", 0.0)), mlp_ratio=float(args.get("mlp_ratio", 4.0)),
        time_every=int(args.get("time_every", 1)),
        latents_only_time=bool(args.get("latents_only_time", True)))


def dynamics_config_from_args(args: Mapping[str, Any], tokenizer: TokenizerConfig, *, packing_factor: int = 2,
                              reward_head: bool = False, bc_head: bool = False) -> DynamicsConfig:
    """The dynamics trainer's ``args`` -> DynamicsConfig (defaults as in the reference loader).

    The latent grid comes from the tokenizer and ``packing_factor`` from the caller: the reference
    stores it in ``args`` but its loaders take the command-line default (2).
    """
    def get(*names, default):
        return next((args[n] for n in names if n in args and args[n] is not None), default)
    return DynamicsConfig(
        d_model=int(get("d_model_dyn", "dyn_d_model", "d_model", default=256)),
        n_heads=int(get("n_heads", default=4)), depth=int(get("dyn_depth", "depth", default=8)),
        dropout=float(get("dropout", default=0.0)), mlp_ratio=float(get("mlp_ratio", default=4.0)),
        time_every=int(get("time_every", default=4)), k_max=int(get("k_max", default=8)),
        n_register=int(get("n_register", default=4)), n_agent=int(get("n_agent", default=0)),
        lang_dim=int(get("lang_dim", default=0)), packing_factor=packing_factor,
        n_latents=tokenizer.n_latents, d_bottleneck=tokenizer.d_bottleneck,
        reward_head=reward_head, reward_L=int(get("reward_L", default=8)),
        reward_num_bins=int(get("reward_num_bins", default=101)),
        reward_log_low=float(get("reward_log_low", default=-8.0)),
        reward_log_high=float(get("reward_log_high", default=8.0)),
        reward_mlp_ratio=float(get("reward_mlp_ratio", default=2.0)),
        reward_pool_agent=str(get("reward_pool_agent", default="attn")),
        bc_head=bc_head, bc_L=int(get("bc_L", default=8)), bc_act_dim=int(get("bc_act_dim", default=16)),
        bc_mlp_ratio=float(get("bc_mlp_ratio", default=2.0)),
        bc_pool_agent=str(get("bc_pool_agent", default="attn")))


# -- finding state dicts inside reference checkpoint files -------------------------------------------
def _is_state_dict(d) -> bool:
    return isinstance(d, dict) and len(d) > 0 and all(isinstance(k, str) for k in d) \
        and torch.is_tensor(next(iter(d.values())))


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Drop each wrapper prefix (DDP ``module.``, compile ``_orig_mod.`` ...) where the keys carry it."""
    for p in prefixes:
        if any(k.startswith(p) for k in state):
            state = {k.removeprefix(p): v for k, v in state.items()}
    return state


def _find_state_dict(ckpt: dict, containers: tuple[str, ...], prefixes: tuple[str, ...]) -> Optional[dict]:
    """The first state dict under one of ``containers`` (or nested under ``state_dict`` there)."""
    for key in containers:
        value = ckpt.get(key)
        if isinstance(value, dict) and _is_state_dict(value.get("state_dict")):
            value = value["state_dict"]
        if _is_state_dict(value):
            return _strip(value, prefixes)
    return None


def _load_file(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, expected a checkpoint dict or a state dict")
    return ckpt


def _model_state(ckpt: dict, path, what: str) -> dict:
    if _is_state_dict(ckpt):
        return _strip(ckpt, ("_orig_mod.", "module.", "dynamics.", "dyn."))
    state = _find_state_dict(ckpt, ("dynamics", "dyn_model", "model", "dyn", "state_dict"),
                             ("_orig_mod.", "module.", "dynamics.", "dyn."))
    if state is None:
        raise KeyError(f"no {what} state dict in {path} (keys {sorted(ckpt)}); expected one under "
                       "'model' (tokenizer) or 'dynamics' (dynamics)")
    return state


def load_official(tokenizer_path: str | os.PathLike, dynamics_path: str | os.PathLike,
                  packing_factor: int = 2) -> WorldModel:
    """A WorldModel (eval mode, on CPU) from a reference ``tokenizer.pt`` + ``dynamics.pt`` pair."""
    tok_ckpt = _load_file(tokenizer_path, "tokenizer")
    dyn_ckpt = _load_file(dynamics_path, "dynamics")
    rew_state = _find_state_dict(dyn_ckpt, ("rew_head", "reward_head"), ("module.", "rew_head.", "reward_head."))
    pol_state = _find_state_dict(dyn_ckpt, ("policy_head", "bc_head"), ("module.", "policy_head.", "bc_head."))
    tok_cfg = tokenizer_config_from_args(tok_ckpt.get("args") or {})
    dyn_cfg = dynamics_config_from_args(dyn_ckpt.get("args") or {}, tok_cfg, packing_factor=packing_factor,
                                        reward_head=rew_state is not None, bc_head=pol_state is not None)
    model = WorldModel(Config(tokenizer=tok_cfg, dynamics=dyn_cfg, preset="official"))
    load_strict(model.tokenizer, _model_state(tok_ckpt, tokenizer_path, "tokenizer"), f"tokenizer {tokenizer_path}")
    load_strict(model.dynamics, _model_state(dyn_ckpt, dynamics_path, "dynamics"), f"dynamics {dynamics_path}")
    if rew_state is not None:
        load_strict(model.reward_head, rew_state, f"reward head in {dynamics_path}")
    if pol_state is not None:
        load_strict(model.policy_head, pol_state, f"policy head in {dynamics_path}")
    return model.eval()


# -- named models --------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def _download_variant(variant: str, local_dir: Optional[str | os.PathLike],
                      cache_dir: Optional[str | os.PathLike]) -> Path:
    """Folder holding ``<variant>/tokenizer.pt`` and ``<variant>/dynamics.pt`` (downloaded if needed)."""
    files = [f"{variant}/tokenizer.pt", f"{variant}/dynamics.pt"]
    if local_dir is not None and all((Path(local_dir) / f).is_file() for f in files):
        return Path(local_dir) / variant
    how = (f"download it first, e.g. `huggingface-cli download {HUB_REPO} --include '{variant}/*' "
           f"--local-dir DIR`, then call load_pretrained('{variant}', local_dir=DIR)")
    from huggingface_hub import snapshot_download
    try:
        root = snapshot_download(repo_id=HUB_REPO, repo_type="model", allow_patterns=files,
                                 local_dir=local_dir, cache_dir=cache_dir, local_files_only=_hub_offline())
    except Exception as err:  # offline cache miss, no network, hub errors: all mean "not on disk"
        state = "HF_HUB_OFFLINE is set and it is not in the cache" if _hub_offline() else f"download failed ({err})"
        raise FileNotFoundError(f"official checkpoint '{variant}' is unavailable: {state}; {how}") from err
    folder = Path(root) / variant
    if not all((Path(root) / f).is_file() for f in files):
        raise FileNotFoundError(f"{HUB_REPO} snapshot at {root} lacks {files}; {how}")
    return folder


def load_pretrained(name: str, *, local_dir: Optional[str | os.PathLike] = None,
                    cache_dir: Optional[str | os.PathLike] = None, packing_factor: int = 2) -> WorldModel:
    """A world model by name, in eval mode on CPU.

    ``name``: "bundled" (shipped in mmbench2_lab/assets/bundled), one of the official variants "base",
    "coverage_aware", "combined" (from the hub repo nicklashansen/mmbench2-models, honouring
    HF_HUB_OFFLINE, ``local_dir`` and ``cache_dir``), or a local folder holding either our
    ``save_pretrained`` output or an official ``tokenizer.pt`` + ``dynamics.pt`` pair.
    """
    if name == "bundled":
        if not (BUNDLED_DIR / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"no bundled model in {BUNDLED_DIR} yet; train one with the tiny preset and "
                                    "save it there with WorldModel.save_pretrained, or load an official variant "
                                    f"({', '.join(VARIANTS)})")
        return WorldModel.from_pretrained(BUNDLED_DIR)
    if name in VARIANTS:
        folder = _download_variant(name, local_dir, cache_dir)
        return load_official(folder / "tokenizer.pt", folder / "dynamics.pt", packing_factor)
    folder = Path(name)
    if folder.is_dir():
        if (folder / CONFIG_NAME).is_file():
            return WorldModel.from_pretrained(folder)
        if (folder / "tokenizer.pt").is_file() and (folder / "dynamics.pt").is_file():
            return load_official(folder / "tokenizer.pt", folder / "dynamics.pt", packing_factor)
        raise FileNotFoundError(f"{folder} holds neither {CONFIG_NAME} (WorldModel.save_pretrained) nor an official "
                                "tokenizer.pt + dynamics.pt pair")
    raise ValueError(f"unknown model {name!r}: use 'bundled', one of {', '.join(VARIANTS)}, or a local folder")


# -- tokenizers alone (the first training stage's output, or the frozen tokenizer of the second) ------------
TOKENIZER_WEIGHTS = "tokenizer.safetensors"


def save_tokenizer(tokenizer: Tokenizer, config: Config, directory: str | os.PathLike) -> Path:
    """Write ``tokenizer.safetensors`` + ``config.json`` (the whole run config) into ``directory``."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (TOKENIZER_WEIGHTS + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tokenizer.state_dict().items()}, str(tmp))
    os.replace(tmp, directory / TOKENIZER_WEIGHTS)
    config.save(directory / CONFIG_NAME)
    return directory


def load_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, TokenizerConfig]:
    """A tokenizer (eval mode, CPU) from a ``save_tokenizer`` folder, a world-model folder, an official
    ``tokenizer.pt`` or a folder holding one."""
    path = Path(path)
    if path.is_dir() and (path / TOKENIZER_WEIGHTS).is_file() and (path / CONFIG_NAME).is_file():
        from safetensors.torch import load_file
        cfg = Config.load(path / CONFIG_NAME).tokenizer
        tok = Tokenizer(cfg)
        load_strict(tok, load_file(str(path / TOKENIZER_WEIGHTS)), f"{path / TOKENIZER_WEIGHTS}")
        return tok.eval(), cfg
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        model = WorldModel.from_pretrained(path)
        return model.tokenizer, model.config.tokenizer
    if path.is_dir() and (path / "tokenizer.pt").is_file():
        path = path / "tokenizer.pt"
    if path.is_file():
        ckpt = _load_file(path, "tokenizer")
        cfg = tokenizer_config_from_args(ckpt.get("args") or {})
        tok = Tokenizer(cfg)
        load_strict(tok, _model_state(ckpt, path, "tokenizer"), f"tokenizer {path}")
        return tok.eval(), cfg
    raise FileNotFoundError(f"no tokenizer at {path}: expected a folder with {TOKENIZER_WEIGHTS} + {CONFIG_NAME} "
                            "(mmbench2-lab train-tokenizer), a world-model folder, or an official tokenizer.pt")
