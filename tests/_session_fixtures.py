"""A world model for tests and interactive sessions: the tiny preset at random initialisation.

A freshly built dynamics zero-initialises its flow head, so it predicts the same x1_hat = 0 whatever the
context, actions or noise; its head is given small random weights here so that each step's frame depends
on them, as a trained model's does.
"""
from __future__ import annotations

import torch

from mmbench2_lab.config import preset
from mmbench2_lab.model.world_model import WorldModel

TASK = "atari-pong"  # quick to build (0.5 s) and to step (2 ms); action_dim 3
OTHER_TASK = "atari-boxing"


def tiny_world_model(seed: int = 0, **overrides) -> WorldModel:
    torch.manual_seed(seed)
    model = WorldModel(preset("tiny", overrides))
    torch.nn.init.normal_(model.dynamics.flow_x_head.weight, std=0.05)
    return model.eval()


def save_tiny_world_model(directory) -> str:
    """Write the model with WorldModel.save_pretrained; the folder loads with load_pretrained(folder)."""
    tiny_world_model().save_pretrained(directory)
    return str(directory)
