"""The world model as one object: tokenizer + dynamics (+ reward / BC heads), with its config.

Saved diffusers-style: ``config.json`` (the whole :class:`~mmbench2_lab.config.Config`) next to
``model.safetensors``. Official reference checkpoints load through :mod:`mmbench2_lab.checkpoints`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from mmbench2_lab.config import Config
from mmbench2_lab.model.dynamics import Dynamics
from mmbench2_lab.model.heads import build_heads
from mmbench2_lab.model.layers import pack_latents, unpack_latents
from mmbench2_lab.model.tokenizer import Tokenizer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """load_state_dict(strict=True), but first raise one error naming every missing, unexpected and
    mis-shaped key, so a wrong config never turns into a silent partial load."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else "",
                 f"{len(shapes)} with other shapes: {show(shapes)}" if shapes else ""]
        raise ValueError(f"{what} does not match the model built from its config; "
                         + "; ".join(p for p in parts if p)
                         + ". Build the model from the config saved with these weights.")
    module.load_state_dict(state, strict=True)


class WorldModel(nn.Module):
    """Tokenizer, dynamics and optional heads built from one :class:`Config`."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tokenizer = Tokenizer(config.tokenizer)
        self.dynamics = Dynamics(config.dynamics)
        self.reward_head, self.policy_head = build_heads(config.dynamics)

    @property
    def packing_factor(self) -> int:
        return self.config.dynamics.packing_factor

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, T, C, H, W) in [0, 1] -> packed latents (B, T, n_spatial, d_spatial), causal in T."""
        return pack_latents(self.tokenizer.encode(frames), self.packing_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Packed latents (B, T, n_spatial, d_spatial) -> frames (B, T, C, H, W) clamped to [0, 1]."""
        return self.tokenizer.decode(unpack_latents(z, self.packing_factor)).clamp(0, 1)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors into ``directory`` (atomically)."""
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "preset": self.config.preset})
        os.replace(tmp, directory / WEIGHTS_NAME)
        self.config.save(directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
                        ) -> "WorldModel":
        """Build from ``directory/config.json`` and load ``model.safetensors`` strictly; eval mode."""
        from safetensors.torch import load_file
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} has no {name}; expected a folder written by "
                                        "WorldModel.save_pretrained")
        model = cls(Config.load(directory / CONFIG_NAME))
        load_strict(model, load_file(str(directory / WEIGHTS_NAME)), f"{directory / WEIGHTS_NAME}")
        return model.to(map_location).eval()
