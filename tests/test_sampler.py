"""Shortcut sampling, rollouts and the predictors computed from them."""
from __future__ import annotations

import pytest
import torch

from mmbench2_lab import predictors
from _session_fixtures import tiny_world_model
from mmbench2_lab.sampler import ContextCache, context_signal_index, expand_seeds, rollout, sample_next, shortcut_schedule


@pytest.fixture(scope="module")
def wm():
    return tiny_world_model(**{"sampler.ctx_window": 3})


def _inputs(wm, B=2, t=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = wm.dynamics.cfg
    return (torch.randn(B, t, c.n_spatial, c.d_spatial, generator=g).tanh(),
            torch.rand(B, t + 1, 16, generator=g) * 2 - 1)


def test_kv_cached_sampling_equals_uncached(wm):
    ctx, actions = _inputs(wm)
    mask = torch.zeros(16)
    mask[:4] = 1
    for steps, tau_init in ((4, 0.0), (8, 0.125)):
        kw = dict(steps=steps, tau_ctx=0.1, tau_init=tau_init, z_prev=ctx[:, -1])
        cached = sample_next(wm.dynamics, ctx, actions, mask, kv_cache=True,
                             generator=torch.Generator().manual_seed(1), **kw)
        full = sample_next(wm.dynamics, ctx, actions, mask, kv_cache=False,
                           generator=torch.Generator().manual_seed(1), **kw)
        torch.testing.assert_close(cached.z, full.z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.x1_traj, full.x1_traj, atol=1e-5, rtol=1e-5)
        assert cached.executed_steps == full.executed_steps == list(range(steps))[steps // 8:]


def test_a_context_cache_built_frame_by_frame_samples_as_rerunning_the_context(wm):
    ctx, actions = _inputs(wm, t=7)
    mask = torch.zeros(16)
    mask[:4] = 1
    kw = dict(steps=8, tau_ctx=0.0, tau_init=0.125, n_seeds=2)
    cc = ContextCache(wm.dynamics, window=6, act_mask=mask)
    cc.reset(ctx[:, :3], actions[:, :3])
    for k in (3, 4):
        cc.append(ctx[:, k], actions[:, k])
    assert cc.length == 5
    cached = sample_next(wm.dynamics, cc.latents, actions[:, :6], mask, context_cache=cc, z_prev=ctx[:, 4],
                         generator=torch.Generator().manual_seed(1), **kw)
    full = sample_next(wm.dynamics, ctx[:, :5], actions[:, :6], mask, z_prev=ctx[:, 4],
                       generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(cached.z, full.z, atol=1e-5, rtol=1e-5)
    # full at 6 frames: the next append rebuilds it from the newest window // 2 + 1 = 4 frames
    cc.append(ctx[:, 5], actions[:, 5])
    cc.append(ctx[:, 6], actions[:, 6])
    assert cc.length == 4 and torch.equal(cc.latents, ctx[:, 3:7])
    cached = sample_next(wm.dynamics, cc.latents, actions[:, 3:8], mask, context_cache=cc,
                         generator=torch.Generator().manual_seed(2), **kw)
    full = sample_next(wm.dynamics, ctx[:, 3:7], actions[:, 3:8], mask, generator=torch.Generator().manual_seed(2),
                       **kw)
    torch.testing.assert_close(cached.z, full.z, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context_cache holds 4 frames"):
        sample_next(wm.dynamics, ctx[:, :5], actions[:, :6], mask, context_cache=cc, **kw)


def test_last_euler_step_lands_on_the_clean_prediction(wm):
    ctx, actions = _inputs(wm)
    out = sample_next(wm.dynamics, ctx, actions, steps=4, generator=torch.Generator().manual_seed(0))
    assert out.x1_traj.shape == out.z_traj.shape == (4, *out.z.shape)
    torch.testing.assert_close(out.z, out.x1_traj[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.z_traj[-1], out.z)


def test_sampling_is_seeded_and_depends_on_actions(wm):
    ctx, actions = _inputs(wm)

    def run(seed, acts=actions):
        return sample_next(wm.dynamics, ctx, acts, steps=2, generator=torch.Generator().manual_seed(seed)).z
    torch.testing.assert_close(run(5), run(5))
    assert not torch.allclose(run(5), run(6))
    assert not torch.allclose(run(5), run(5, -actions))


def test_injected_noise_replays_a_generator_draw(wm):
    ctx, actions = _inputs(wm)
    g = torch.Generator().manual_seed(9)
    noise_z = torch.randn(ctx.shape[0], 1, *ctx.shape[2:], generator=g)
    noise_ctx = torch.randn(ctx.shape, generator=g)
    drawn = sample_next(wm.dynamics, ctx, actions, steps=2, generator=torch.Generator().manual_seed(9))
    replayed = sample_next(wm.dynamics, ctx, actions, steps=2, noise=(noise_z, noise_ctx))
    torch.testing.assert_close(drawn.z, replayed.z)


def test_sampler_without_context_or_actions(wm):
    ctx, _ = _inputs(wm, t=0)
    out = sample_next(wm.dynamics, ctx, None, steps=2, generator=torch.Generator().manual_seed(0))
    assert out.z.shape == (2, wm.dynamics.cfg.n_spatial, wm.dynamics.cfg.d_spatial) and out.h is None


def test_sampler_rejects_bad_steps_and_misaligned_actions(wm):
    ctx, actions = _inputs(wm)
    with pytest.raises(ValueError, match="power of two"):
        sample_next(wm.dynamics, ctx, actions, steps=3)
    with pytest.raises(ValueError, match="t\\+1"):
        sample_next(wm.dynamics, ctx, actions[:, :-1], steps=4)


def test_schedule_and_context_level():
    s = shortcut_schedule(4, 64)
    assert s["e"] == 2 and s["tau"] == [0.0, 0.25, 0.5, 0.75] and s["tau_idx"] == [0, 16, 32, 48]
    assert context_signal_index(0.1, 64) == 58 and context_signal_index(0.01, 8) == 8
    assert context_signal_index(0.0, 16) == 16


def test_expand_seeds_is_row_major():
    x = torch.arange(3)
    assert expand_seeds(x, 2).tolist() == [0, 0, 1, 1, 2, 2] and expand_seeds(None, 2) is None


def test_rollout_slides_the_context_window_and_decodes(wm):
    ctx, _ = _inputs(wm, B=2, t=2)
    actions = torch.rand(2, 2 + 4, 16) * 2 - 1
    kw = dict(n_seeds=2, steps=2, tau_ctx=0.0)
    out = rollout(wm, ctx, actions, 4, generator=torch.Generator().manual_seed(0), **kw)
    c = wm.config
    assert out.latents.shape == (2, 2, 4, c.dynamics.n_spatial, c.dynamics.d_spatial)
    assert out.x1_traj.shape == (2, 2, 4, 2, c.dynamics.n_spatial, c.dynamics.d_spatial)
    assert out.frames.shape == (2, 2, 4, 3, c.tokenizer.height, c.tokenizer.width)
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    assert not torch.allclose(out.latents[:, 0], out.latents[:, 1])  # seeds differ
    uncached = rollout(wm, ctx, actions, 4, generator=torch.Generator().manual_seed(0), kv_cache=False,
                       decode=False, **kw)
    torch.testing.assert_close(uncached.latents, out.latents, atol=1e-5, rtol=1e-5)
    # Frame 5 (index 3 of the rollout) is predicted from frames 2..4 only (ctx_window = 3).
    first = rollout(wm, ctx, actions, 1, generator=torch.Generator().manual_seed(0), decode=False, **kw)
    torch.testing.assert_close(first.latents[:, :, 0], out.latents[:, :, 0])



def test_shared_context_rollout_branches_its_seeds_from_the_followed_seed_at_every_step(wm):
    """Each step's N seeds sample from one history that continues with seed 0 (the reference's scorers)."""
    ctx, _ = _inputs(wm, B=2, t=2)
    actions = torch.rand(2, 2 + 2, 16) * 2 - 1
    kw = dict(steps=2, tau_ctx=0.1)
    out = rollout(wm, ctx, actions, 2, n_seeds=3, shared_context=True, decode=False,
                  generator=torch.Generator().manual_seed(0), **kw)
    g = torch.Generator().manual_seed(0)
    first = sample_next(wm.dynamics, ctx, actions[:, :3], n_seeds=3, generator=g, **kw)
    followed = first.z.reshape(2, 3, *first.z.shape[1:])[:, 0]
    second = sample_next(wm.dynamics, torch.cat([ctx, followed[:, None]], 1), actions, n_seeds=3, generator=g,
                         z_prev=followed, **kw)
    torch.testing.assert_close(out.latents[:, :, 0], first.z.reshape(2, 3, *first.z.shape[1:]))
    torch.testing.assert_close(out.latents[:, :, 1], second.z.reshape(2, 3, *second.z.shape[1:]))
    assert not torch.allclose(out.latents[:, 1, 1], out.latents[:, 2, 1])  # seeds still differ

def test_flow_instability_uses_the_tail_half_of_the_deltas():
    steps = torch.stack([torch.full((2, 3, 4), v) for v in (0.0, 1.0, 1.5, 1.75, 2.0)])  # deltas 1, .5, .25, .25
    steps[:, 1] *= 2
    u_f = predictors.flow_instability(steps)
    torch.testing.assert_close(u_f, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(predictors.flow_instability(steps[:1]), torch.zeros(2))
    batch = predictors.flow_instability(steps, batch_rms=True)
    torch.testing.assert_close(batch, torch.tensor(0.25 * (2.5 ** 0.5)))


def test_seed_variance_motion_and_normalisation():
    a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    u_s = predictors.seed_variance(torch.stack([a, b], dim=1))
    torch.testing.assert_close(u_s, ((a - b) ** 2 / 2).mean(dim=(1, 2)))
    m = predictors.motion(a, b)
    torch.testing.assert_close(m, ((a - b) ** 2).mean(dim=(1, 2)).sqrt())
    torch.testing.assert_close(predictors.normalise(torch.ones(2), torch.tensor([0.0, 0.5])), torch.tensor([1e3, 2.0]))
    with pytest.raises(ValueError, match="N >= 2"):
        predictors.seed_variance(a[:, None])


@torch.no_grad()
def test_round_trip_residual_is_small_for_a_tokenizer_fixed_point(wm):
    frames = torch.rand(2, 1, 3, wm.config.tokenizer.height, wm.config.tokenizer.width)
    z = wm.encode(frames)[:, 0]
    for _ in range(3):  # iterate decode -> encode towards the tokenizer's own latents
        z = predictors.round_trip(wm.tokenizer, z)
    far = torch.randn_like(z)
    assert (predictors.round_trip_residual(wm.tokenizer, z) < predictors.round_trip_residual(wm.tokenizer, far)).all()


def test_seeds_sharing_one_context_pass_match_expanded_rows(wm):
    """n_seeds > 1 prefills the context once; it must equal sampling expanded rows with the same noise."""
    cfg = wm.dynamics.cfg
    B, t, N = 2, 3, 3
    ctx = torch.randn(B, t, cfg.n_spatial, cfg.d_spatial)
    actions = torch.rand(B, t + 1, 16) * 2 - 1
    noise_z = torch.randn(B * N, 1, cfg.n_spatial, cfg.d_spatial)
    noise_ctx = torch.randn(B, t, cfg.n_spatial, cfg.d_spatial)
    shared = sample_next(wm.dynamics, ctx, actions, steps=4, tau_ctx=0.1, noise=(noise_z, noise_ctx), n_seeds=N)
    uncached = sample_next(wm.dynamics, ctx, actions, steps=4, tau_ctx=0.1, noise=(noise_z, noise_ctx), n_seeds=N,
                           kv_cache=False)
    expanded = sample_next(wm.dynamics, expand_seeds(ctx, N), expand_seeds(actions, N), steps=4, tau_ctx=0.1,
                           noise=(noise_z, expand_seeds(noise_ctx, N)), kv_cache=False)
    assert shared.z.shape == (B * N, cfg.n_spatial, cfg.d_spatial)
    torch.testing.assert_close(shared.z, uncached.z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.z, expanded.z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.x1_traj, expanded.x1_traj, atol=1e-5, rtol=1e-5)


def test_seed_context_noise_draws_each_seeds_own_corrupted_context_as_the_reference(wm):
    """The reference expands the context rows before sampling, so each seed gets its own tau_ctx noise."""
    ctx, actions = _inputs(wm)
    N = 3
    per_seed = sample_next(wm.dynamics, ctx, actions, steps=4, tau_ctx=0.1, n_seeds=N, seed_context_noise=True,
                           generator=torch.Generator().manual_seed(7))
    expanded = sample_next(wm.dynamics, expand_seeds(ctx, N), expand_seeds(actions, N), steps=4, tau_ctx=0.1,
                           generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(per_seed.z, expanded.z, atol=1e-5, rtol=1e-5)
    shared = sample_next(wm.dynamics, ctx, actions, steps=4, tau_ctx=0.1, n_seeds=N,
                         generator=torch.Generator().manual_seed(7))
    assert shared.z.shape == per_seed.z.shape and not torch.allclose(shared.z, per_seed.z)
    # replayed noise is one draw: the flag is refused rather than silently ignored
    noise = (torch.randn(ctx.shape[0] * N, 1, *ctx.shape[2:]), torch.randn_like(ctx))
    with pytest.raises(ValueError, match="seed_context_noise.*expand the rows"):
        sample_next(wm.dynamics, ctx, actions, steps=4, tau_ctx=0.1, n_seeds=N, seed_context_noise=True,
                    noise=noise)
