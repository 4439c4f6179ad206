"""The world model's networks: tokenizer, dynamics, reward and BC heads, and their shared layers.

The samplers live in :mod:`mmbench2_lab.sampler`, the training loss in :mod:`mmbench2_lab.flow_matching`,
official checkpoint loading in :mod:`mmbench2_lab.checkpoints`.
"""
from mmbench2_lab.model.dynamics import ActionEncoder, Dynamics, dynamics_space_mask
from mmbench2_lab.model.heads import (PolicyHead, RewardHead, bc_loss, build_heads, reward_loss, symexp, symlog,
                                      twohot)
from mmbench2_lab.model.layers import apply_rope, pack_latents, patchify, unpack_latents, unpatchify
from mmbench2_lab.model.tokenizer import Decoder, Encoder, Tokenizer, decoder_space_mask, encoder_space_mask
from mmbench2_lab.model.world_model import WorldModel, load_strict

__all__ = [
    "ActionEncoder", "Decoder", "Dynamics", "Encoder", "PolicyHead", "RewardHead", "Tokenizer", "WorldModel",
    "apply_rope", "bc_loss", "build_heads", "decoder_space_mask", "dynamics_space_mask", "encoder_space_mask",
    "load_strict", "pack_latents", "patchify", "reward_loss", "symexp", "symlog", "twohot", "unpack_latents",
    "unpatchify",
]
