"""The world model's networks: official names and sizes, causality, masks, caches, heads and the loss."""
from __future__ import annotations

import pytest
import torch

from _session_fixtures import tiny_world_model
from mmbench2_lab.config import preset
from mmbench2_lab.flow_matching import EmaRms, dynamics_pretrain_loss, led_to_actions
from mmbench2_lab.model import (Dynamics, Tokenizer, WorldModel, bc_loss, pack_latents, reward_loss, symexp, symlog,
                                twohot, unpack_latents)


def _paper_official_shapes() -> dict:
    """State-dict shapes of the released 350M model, written out from the reference's key list."""
    shapes = {}

    def layers(prefix, depth, d, time_layers):
        hidden = int(d * 4 * 2 / 3)
        for i in range(depth):
            p = f"{prefix}transformer.layers.{i}."
            subs = ["space"] + (["time"] if i in time_layers else [])
            for sub in subs:
                shapes.update({f"{p}{sub}.attn.qkv.weight": (3 * d, d), f"{p}{sub}.attn.qkv.bias": (3 * d,),
                               f"{p}{sub}.attn.out.weight": (d, d), f"{p}{sub}.attn.out.bias": (d,),
                               f"{p}{sub}.attn.log_qk_scale": (8,)})
            shapes.update({f"{p}norm1.scale": (d,), f"{p}norm3.scale": (d,),
                           f"{p}mlp.fc_in.weight": (2 * hidden, d), f"{p}mlp.fc_in.bias": (2 * hidden,),
                           f"{p}mlp.fc_out.weight": (d, hidden), f"{p}mlp.fc_out.bias": (d,)})
            if i in time_layers:
                shapes[f"{p}norm2.scale"] = (d,)

    shapes.update({"encoder.patch_proj.weight": (512, 588), "encoder.patch_proj.bias": (512,),
                   "encoder.bottleneck_proj.weight": (64, 512), "encoder.bottleneck_proj.bias": (64,),
                   "encoder.mae.mask_token": (512,), "encoder.latents": (64, 512),
                   "decoder.up_proj.weight": (512, 64), "decoder.up_proj.bias": (512,),
                   "decoder.patch_queries": (256, 512), "decoder.patch_head.weight": (588, 512),
                   "decoder.patch_head.bias": (588,)})
    layers("encoder.", 12, 512, range(12))
    layers("decoder.", 12, 512, range(12))
    dyn = {"spatial_proj.weight": (1024, 128), "spatial_proj.bias": (1024,), "register_tokens": (4, 1024),
           "action_encoder.base": (1024,), "action_encoder.fc1.weight": (2048, 16), "action_encoder.fc1.bias": (2048,),
           "action_encoder.fc2.weight": (1024, 2048), "action_encoder.fc2.bias": (1024,),
           "step_embed.weight": (7, 512), "signal_embed.weight": (65, 512),
           "flow_x_head.weight": (128, 1024), "flow_x_head.bias": (128,)}
    shapes.update({f"dynamics.{k}": v for k, v in dyn.items()})
    before = set(shapes)
    layers("", 16, 1024, range(1, 16, 2))
    for k in set(shapes) - before:
        shapes[f"dynamics.{k}"] = shapes.pop(k)
    return shapes


def _count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_paper_preset_has_the_official_keys_shapes_and_sizes():
    with torch.device("meta"):
        wm = WorldModel(preset("paper"))
    ours = {k: tuple(v.shape) for k, v in wm.state_dict().items()}
    assert ours == {f"tokenizer.{k}" if k.startswith(("encoder", "decoder")) else k: v
                    for k, v in _paper_official_shapes().items()}
    assert _count(wm.tokenizer.encoder) == pytest.approx(50.80, abs=0.01)
    assert _count(wm.tokenizer.decoder) == pytest.approx(50.90, abs=0.01)
    assert _count(wm.dynamics) == pytest.approx(237.53, abs=0.01)
    assert wm.reward_head is None and wm.policy_head is None


@pytest.fixture(scope="module")
def tiny():
    return tiny_world_model(**{"dynamics.n_agent": 1, "dynamics.lang_dim": 8, "dynamics.reward_head": True,
                               "dynamics.bc_head": True, "dynamics.reward_L": 3, "dynamics.bc_L": 2})


def _dyn_inputs(wm, B=2, T=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = wm.dynamics.cfg
    return dict(actions=torch.rand(B, T, 16, generator=g) * 2 - 1,
                step_idx=torch.randint(0, c.emax + 1, (B, T), generator=g),
                signal_idx=torch.randint(0, c.k_max + 1, (B, T), generator=g),
                latents=torch.randn(B, T, c.n_spatial, c.d_spatial, generator=g),
                lang_emb=torch.randn(B, c.lang_dim, generator=g))


@torch.no_grad()
def test_tokenizer_is_causal_in_time_and_bounded(tiny):
    tok = tiny.tokenizer
    c = tok.cfg
    frames = torch.rand(2, 3, c.channels, c.height, c.width)
    z = tok.encode(frames)
    assert z.shape == (2, 3, c.n_latents, c.d_bottleneck) and z.abs().max() < 1
    changed = frames.clone()
    changed[:, 2] = torch.rand_like(changed[:, 2])
    z2 = tok.encode(changed)
    torch.testing.assert_close(z2[:, :2], z[:, :2])  # the future does not leak into the past
    assert not torch.allclose(z2[:, 2], z[:, 2])
    torch.testing.assert_close(tok.encode(frames[:, :1]), z[:, :1])  # frame 0 alone = frame 0 in a clip
    out = tok.decode(z)
    assert out.shape == frames.shape and 0 < out.min() and out.max() < 1


def test_tokenizer_rejects_frames_of_the_wrong_size(tiny):
    with pytest.raises(ValueError, match="expected frames"):
        tiny.tokenizer.encode(torch.rand(1, 1, 3, 32, 32))


def test_mae_masking_only_when_asked(tiny):
    enc = tiny.tokenizer.encoder
    c = enc.cfg
    patches = torch.rand(4, 2, c.n_patches, c.patch_dim)
    _, mask = enc(patches)
    assert not mask.any()
    g = torch.Generator().manual_seed(0)
    z_masked, mask = enc(patches, mae_p_max=0.9, mae_p_min=0.5, generator=g)
    frac = mask.float().mean(dim=-1)
    assert mask.shape == (4, 2, c.n_patches) and 0.2 < frac.mean() < 0.95
    torch.testing.assert_close(enc(patches, mae_p_max=0.9, mae_p_min=0.5,
                                   generator=torch.Generator().manual_seed(0))[0], z_masked)


def test_packing_round_trips_and_pairs_neighbouring_latents():
    z = torch.randn(2, 3, 8, 4)
    packed = pack_latents(z)
    assert packed.shape == (2, 3, 4, 8)
    torch.testing.assert_close(packed[:, :, 1], torch.cat([z[:, :, 2], z[:, :, 3]], dim=-1))
    torch.testing.assert_close(unpack_latents(packed), z)


@torch.no_grad()
def test_language_reaches_only_the_agent_tokens(tiny):
    x = _dyn_inputs(tiny)
    x1, h = tiny.dynamics(**x)
    other = dict(x, lang_emb=torch.randn_like(x["lang_emb"]))
    x1_other, h_other = tiny.dynamics(**other)
    torch.testing.assert_close(x1_other, x1)
    assert h.shape == (2, 4, 1, tiny.dynamics.cfg.d_model) and not torch.allclose(h_other, h)


@torch.no_grad()
def test_dynamics_is_causal_and_uses_actions(tiny):
    x = _dyn_inputs(tiny)
    x1, _ = tiny.dynamics(**x)
    later = dict(x, latents=x["latents"].clone(), actions=x["actions"].clone())
    later["latents"][:, 3] += 1.0
    later["actions"][:, 3] = -later["actions"][:, 3]
    x1_later, _ = tiny.dynamics(**later)
    torch.testing.assert_close(x1_later[:, :3], x1[:, :3])
    assert not torch.allclose(x1_later[:, 3], x1[:, 3])
    masked, _ = tiny.dynamics(**dict(x, act_mask=torch.zeros(16)))
    no_action, _ = tiny.dynamics(**dict(x, actions=None))
    assert not torch.allclose(masked, no_action)  # a masked action still passes fc1/fc2 biases
    assert not torch.allclose(masked, x1)


@torch.no_grad()
def test_kv_cache_continues_the_sequence_exactly(tiny):
    x = _dyn_inputs(tiny, T=5)
    full, h_full = tiny.dynamics(**x)

    def part(sl):
        return {k: (v[:, sl] if k != "lang_emb" else v) for k, v in x.items()}
    _, _, cache = tiny.dynamics(**part(slice(0, 2)), return_kv_cache=True)
    x1, _, cache = tiny.dynamics(**part(slice(2, 4)), kv_cache=cache, return_kv_cache=True)  # two at once
    torch.testing.assert_close(x1, full[:, 2:4], atol=1e-5, rtol=1e-5)
    x1, h = tiny.dynamics(**part(slice(4, 5)), kv_cache=cache)
    torch.testing.assert_close(x1, full[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, h_full[:, 4:], atol=1e-5, rtol=1e-5)
    assert cache[0] is None and cache[1][0].shape[2] == 4  # only time layers cache, 4 frames so far


def test_dynamics_rejects_unpacked_latents(tiny):
    x = _dyn_inputs(tiny)
    x["latents"] = unpack_latents(x["latents"])
    with pytest.raises(ValueError, match="latents must be packed"):
        tiny.dynamics(**x)


def test_symlog_twohot_round_trip():
    centers = torch.linspace(-5, 5, 11)
    y = torch.tensor([-7.0, -5.0, -0.3, 0.0, 2.25, 4.9, 9.0])
    w = twohot(y, centers)
    torch.testing.assert_close(w.sum(-1), torch.ones(7))
    torch.testing.assert_close((w * centers).sum(-1), y.clamp(-5, 5))
    assert ((w > 0).sum(-1) <= 2).all()
    x = torch.tensor([-100.0, -1.5, 0.0, 0.5, 1e3])
    torch.testing.assert_close(symexp(symlog(x)), x)


def test_reward_head_decodes_a_peaked_distribution(tiny):
    head = tiny.reward_head
    logits = torch.full((head.L, head.num_bins), -30.0)
    target = 2.0
    logits[:, int((head.centers_log - symlog(torch.tensor(target))).abs().argmin())] = 30.0
    nearest = symexp(head.centers_log[(head.centers_log - symlog(torch.tensor(target))).abs().argmin()])
    torch.testing.assert_close(head.decode(logits), nearest)


def test_head_losses_mask_the_window_and_bc_leaves_the_dynamics_alone(tiny):
    x = _dyn_inputs(tiny, T=4)
    x1, h = tiny.dynamics(**x)
    rewards = torch.randn(2, 4)
    loss = reward_loss(tiny.reward_head, h, rewards)
    changed = rewards.clone()
    changed[:, -1] = 100.0  # rew[T-1] is the reward of leaving the window: no slot predicts it
    torch.testing.assert_close(reward_loss(tiny.reward_head, h, changed), loss)
    mask = torch.zeros(16)
    mask[:3] = 1
    bc = bc_loss(tiny.policy_head, h, x["actions"], mask.expand(2, 4, 16))
    bc.backward()
    assert all(p.grad is None for p in tiny.dynamics.parameters())
    assert tiny.policy_head.out.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_led_to_actions_shift_clamp_and_mask():
    act = torch.tensor([[[2.0, -0.5], [0.3, 0.7], [-3.0, 1.0]]])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    actions, shifted = led_to_actions(act, mask)
    torch.testing.assert_close(actions, torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.3, 0.7]]]))
    torch.testing.assert_close(shifted, torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]]))


def test_pretrain_loss_trains_the_dynamics_and_bootstraps_after_start(tiny):
    x = _dyn_inputs(tiny, B=4, T=3)
    z1 = x["latents"].tanh()
    kw = dict(b_self=1, bootstrap_start=10, lang_emb=x["lang_emb"])
    g = torch.Generator().manual_seed(3)
    loss, aux = dynamics_pretrain_loss(tiny.dynamics, z1, x["actions"], None, step=0, generator=g, **kw)
    assert aux["loss_self"] == 0 and aux["flow_per_sample"].shape == (3,)
    loss.backward()
    assert tiny.dynamics.flow_x_head.weight.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    rms = EmaRms()
    loss_b, aux_b = dynamics_pretrain_loss(tiny.dynamics, z1, x["actions"], None, step=10, generator=g, rms_flow=rms,
                                           **kw)
    assert aux_b["loss_self"] > 0 and aux_b["loss_emp"] == aux["loss_emp"]  # same draws, same empirical rows
    flow = aux_b["loss_flow"]
    torch.testing.assert_close(loss_b.detach(), flow / (0.99 + 0.01 * flow ** 2).sqrt())
    with pytest.raises(ValueError, match="b_self"):
        dynamics_pretrain_loss(tiny.dynamics, z1, x["actions"], None, step=0, b_self=4, bootstrap_start=0)


def test_modules_build_from_their_own_configs():
    cfg = preset("tiny")
    assert isinstance(Tokenizer(cfg.tokenizer).encoder.transformer.layers[0].space.allow, torch.Tensor)
    dyn = Dynamics(cfg.dynamics)
    assert dyn.task_proj is None and dyn.n_tokens == 2 + cfg.dynamics.n_spatial + cfg.dynamics.n_register
