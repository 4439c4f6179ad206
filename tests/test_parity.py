"""Reference parity: our model, sampler, predictors and loss reproduce the reference implementation.

Data-driven over every sub-folder of $MMB_PARITY_FIXTURES (default ../shared/fixtures/reference-parity
next to the repo): each holds tokenizer.pt + dynamics.pt in the reference trainers' format and
vectors.pt with inputs, recorded reference outputs and ``meta`` (see that folder's README). The config
comes from the checkpoints' ``args``; recorded draws are injected so the samplers and the loss replay
the reference calls. Tolerances as the fixtures' README suggests.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import pytest
import torch

from mmbench2_lab import flow_matching, predictors, sampler
from mmbench2_lab.checkpoints import load_official
from mmbench2_lab.model import apply_rope, pack_latents, patchify, twohot, unpatchify
from mmbench2_lab.model.layers import Rotary

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("MMB_PARITY_FIXTURES", REPO.parent / "shared" / "fixtures" / "reference-parity"))
FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir()) if ROOT.is_dir() else []

LATENT = 1e-5  # latents, x1_hat, samples, predictors, losses
HIDDEN = 1e-4  # hidden states, KV caches, agent states, logits
EXACT_ISH = 1e-6  # RoPE probe, two-hot probe

# Every name a fixture may hold; test_fixture_has_no_unchecked_tensors keeps this list honest.
INPUTS = {"obs_u8", "lang_emb", "dyn_step_idx", "dyn_signal_idx", "dyn_eps", "dyn_z_noisy", "actions", "act_mask",
          "ctx_packed", "rope_probe_in", "k4_seed", "k4_noise_z", "k4_noise_ctx", "k8_seed", "k8_noise_z",
          "k8_noise_ctx", "k8_z_prev", "us_seed", "us_noise_z", "us_noise_ctx", "loss_act_raw", "loss_mask_raw",
          "loss_rew_raw", "loss_seed", "loss_B_self", "loss_draw_step_idx_self", "loss_draw_u", "loss_draw_z0",
          "loss_z1", "rew_decode_probe_logits", "twohot_probe_y", "meta"}
CHECKED = {"patches", "z_joint", "z_single", "recon_joint_patches", "recon_single_patches", "z_packed_joint",
           "z_packed_single", "mask_encoder_allow", "mask_decoder_allow", "mask_dynamics_allow", "rope_probe_out",
           "dyn_tokens_in", "dyn_x1_full", "dyn_x1_noact", "dyn_x1_prefill", "dyn_x1_cached_last",
           "us_predictions", "us_u_s", "us_u_r", "us_motion", "us_u_r_norm", "loss_actions", "loss_act_mask",
           "loss_step_idx_full", "loss_sigma", "loss_sigma_idx", "loss_z_tilde", "loss_z1_hat_main",
           "loss_boot_total_fresh_rms", "dyn_h_full", "dyn_h_nolang", "rew_logits", "rew_centers_log", "policy_out",
           "rew_decode_probe_value", "twohot_probe_out", "rew_decoded_l0", "k8_h_new", "k8_reward_pred",
           "k8_executed_steps", "k4_past_input"}
CHECKED_PATTERNS = [r"dyn_layer\d+_out", r"dyn_kvcache_layer\d+_[kv]",
                    r"k[48]_(sched|ctx_signal_idx|z|u_f|u_f_per_b|x1_traj|z_traj|deltas)",
                    r"k[48]_(ur_interactive|ur_z_recon|urnorm_u_r|urnorm_motion|urnorm_u_r_norm)",
                    r"loss_(boot|noboot)_(total|aux_\w+)"]
AUX_KEYS = ("flow_mse", "flow_per_sample", "bootstrap_mse", "loss_emp", "loss_self", "sigma_mean", "sigma_std",
            "loss_rew", "loss_bc", "loss_flow", "rms_flow", "rms_rew", "rms_bc")


class Case:
    """One fixture folder: the model loaded through our official loader, its vectors, a mismatch log."""

    def __init__(self, name: str):
        folder = ROOT / name
        for f in ("tokenizer.pt", "dynamics.pt", "vectors.pt"):
            if not (folder / f).is_file():
                pytest.fail(f"fixture folder {folder} lacks {f}")
        self.name = name
        self.model = load_official(folder / "tokenizer.pt", folder / "dynamics.pt")
        self.dyn_args = torch.load(folder / "dynamics.pt", weights_only=True).get("args") or {}
        self.v = torch.load(folder / "vectors.pt", weights_only=True)
        self.meta = self.v.get("meta", {})
        self.errors: list[str] = []

    def __getitem__(self, key):
        if key not in self.v:
            pytest.fail(f"[{self.name}] vectors.pt is missing the input '{key}'")
        return self.v[key]

    def param(self, key: str, name: str, default: float) -> float:
        """A call parameter (``name=value``) from the description of ``key`` in meta, else ``default``."""
        entry = self.meta.get(key)
        desc = str(entry.get("desc", "")) if isinstance(entry, dict) else ""
        m = re.search(rf"\b{name}=([-+\d.eE]+)", desc)
        return float(m.group(1)) if m else default

    def check(self, key: str, actual, atol: float = LATENT) -> None:
        """Compare with the recorded reference output ``key``; mismatches are collected, not raised."""
        if key not in self.v:
            self.errors.append(f"'{key}': MISSING from vectors.pt (the reference output was expected)")
            return
        expected = self.v[key]
        if isinstance(expected, (list, dict)):
            if actual != expected:
                self.errors.append(f"'{key}': expected {expected}, got {actual}")
            return
        expected, actual = torch.as_tensor(expected), torch.as_tensor(actual).detach()
        if tuple(actual.shape) != tuple(expected.shape):
            self.errors.append(f"'{key}': shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
        elif not (expected.is_floating_point() or actual.is_floating_point()):
            if not torch.equal(actual.to(expected.dtype), expected):
                self.errors.append(f"'{key}': integer/bool values differ at {int((actual != expected).sum())} places")
        else:
            diff = (actual.double() - expected.double()).abs()
            bound = atol + 1e-5 * expected.double().abs()
            if not bool((diff <= bound).all()):
                self.errors.append(f"'{key}': max abs diff {diff.max().item():.3g} exceeds atol {atol:g}")

    def done(self) -> None:
        assert not self.errors, f"[{self.name}] parity failures:\n  " + "\n  ".join(self.errors)


@functools.lru_cache(maxsize=None)
def _case(name: str) -> Case:
    return Case(name)


@pytest.fixture(params=FOLDERS)
def case(request):
    c = _case(request.param)
    c.errors = []
    torch.manual_seed(0)  # nothing below may depend on it; the global RNG is only used where seeded
    yield c


def _frames(c: Case) -> torch.Tensor:
    T = c["obs_u8"].shape[1] - 1  # parse_batch drops the last observation
    return c["obs_u8"][:, :T].float() / 255.0


def _has_heads(c: Case) -> bool:
    return c.model.dynamics.cfg.n_agent > 0


# -- the tests --------------------------------------------------------------------------------------
def test_fixture_folders_exist():
    assert FOLDERS, f"no parity fixture folders under {ROOT}; set MMB_PARITY_FIXTURES to the reference-parity folder"


def test_fixture_has_no_unchecked_tensors(case):
    unknown = [k for k in case.v if k not in INPUTS | CHECKED
               and not any(re.fullmatch(p, k) for p in CHECKED_PATTERNS)]
    assert not unknown, f"[{case.name}] vectors.pt holds tensors no parity test checks: {unknown}"


@torch.no_grad()
def test_tokenizer_patches_latents_and_reconstructions(case):
    tok, cfg = case.model.tokenizer, case.model.config.tokenizer
    frames = _frames(case)
    B, T = frames.shape[:2]
    case.check("patches", patchify(frames, cfg.patch), 0.0)
    assert torch.equal(unpatchify(case["patches"], cfg.height, cfg.width, cfg.channels, cfg.patch), frames)
    case.check("z_joint", tok.encode(frames))
    z_single = tok.encoder(case["patches"].reshape(B * T, 1, *case["patches"].shape[2:]))[0]
    case.check("z_single", z_single.reshape(B, T, *z_single.shape[2:]))
    case.check("recon_joint_patches", tok.decoder(case.v["z_joint"]))
    recon = tok.decoder(case.v["z_single"].reshape(B * T, 1, *z_single.shape[2:]))
    case.check("recon_single_patches", recon.reshape(B, T, *recon.shape[2:]))
    pf = case.model.packing_factor
    case.check("z_packed_joint", pack_latents(case.v["z_joint"], pf), 0.0)
    case.check("z_packed_single", pack_latents(case.v["z_single"], pf), 0.0)
    case.done()


def test_space_attention_masks(case):
    for key, transformer in (("mask_encoder_allow", case.model.tokenizer.encoder.transformer),
                             ("mask_decoder_allow", case.model.tokenizer.decoder.transformer),
                             ("mask_dynamics_allow", case.model.dynamics.transformer)):
        for layer in transformer.layers:
            case.check(key, layer.space.allow)
    case.done()


def test_rope_probe(case):
    x = case["rope_probe_in"]
    L, hd = x.shape[-2:]
    offset = int(case.param("rope_probe_in", "offset", 3))
    cos, sin = Rotary(hd).cos_sin(L, offset, x.device, x.dtype)
    case.check("rope_probe_out", apply_rope(x, cos, sin), EXACT_ISH)
    case.done()


@torch.no_grad()
def test_dynamics_forward_and_layer_outputs(case):
    dyn = case.model.dynamics
    seen = {}
    hooks = [dyn.transformer.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))]
    for i, layer in enumerate(dyn.transformer.layers):
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)))
    args = (case["dyn_step_idx"], case["dyn_signal_idx"], case["dyn_z_noisy"])
    try:
        x1, h = dyn(case["actions"], *args, act_mask=case["act_mask"], lang_emb=case["lang_emb"])
    finally:
        for hook in hooks:
            hook.remove()
    case.check("dyn_tokens_in", seen["in"], HIDDEN)
    for i in range(len(dyn.transformer.layers)):
        case.check(f"dyn_layer{i}_out", seen[i], HIDDEN)
    case.check("dyn_x1_full", x1)
    case.check("dyn_x1_noact", dyn(None, *args, act_mask=case["act_mask"], lang_emb=case["lang_emb"])[0])
    if _has_heads(case):
        case.check("dyn_h_full", h, HIDDEN)
        x1_nolang, h_nolang = dyn(case["actions"], *args, act_mask=case["act_mask"], lang_emb=None)
        case.check("dyn_h_nolang", h_nolang, HIDDEN)
        case.check("dyn_x1_full", x1_nolang)  # language reaches only the agent tokens
    case.done()


@torch.no_grad()
def test_dynamics_kv_cache_prefill_and_decode(case):
    dyn = case.model.dynamics
    t = case["dyn_x1_prefill"].shape[1]
    a, s, g, z = case["actions"], case["dyn_step_idx"], case["dyn_signal_idx"], case["dyn_z_noisy"]
    m, lang = case["act_mask"], case["lang_emb"]
    x1_pre, _, cache = dyn(a[:, :t], s[:, :t], g[:, :t], z[:, :t], act_mask=m[:, :t], lang_emb=lang,
                           return_kv_cache=True)
    case.check("dyn_x1_prefill", x1_pre)
    for i, layer_cache in enumerate(cache):
        assert (layer_cache is None) == (not dyn.transformer.layers[i].do_time)
        if layer_cache is not None:
            case.check(f"dyn_kvcache_layer{i}_k", layer_cache[0], HIDDEN)
            case.check(f"dyn_kvcache_layer{i}_v", layer_cache[1], HIDDEN)
    x1_last, _ = dyn(a[:, t:], s[:, t:], g[:, t:], z[:, t:], act_mask=m[:, t:], lang_emb=lang, kv_cache=cache)
    case.check("dyn_x1_cached_last", x1_last)
    case.done()


def _sampler_case(case, prefix: str, tau_ctx: float, tau_init: float):
    """Replay the recorded K-step sampler call ``prefix`` with and without the KV cache."""
    sched = case[f"{prefix}_sched"]
    K, k_max = int(sched["K"]), case.model.dynamics.cfg.k_max
    ours = sampler.shortcut_schedule(K, k_max)
    case.check(f"{prefix}_sched", {k: ours.get(k) for k in sched})
    ctx = case["ctx_packed"]
    t = ctx.shape[1]
    case.check(f"{prefix}_ctx_signal_idx", sampler.context_signal_index(tau_ctx, k_max))
    if prefix == "k4":  # the corrupted context the model saw (recorded for K = 4 only)
        case.check("k4_past_input", (1.0 - tau_ctx) * ctx + tau_ctx * case["k4_noise_ctx"])
    z_prev = case.v.get(f"{prefix}_z_prev") if tau_init > 0 else None
    kwargs = dict(steps=K, tau_ctx=tau_ctx, tau_init=tau_init, z_prev=z_prev, lang_emb=case["lang_emb"])
    acts, mask = case["actions"][:, :t + 1], case["act_mask"][:, :t + 1]
    outs = []
    for kv in (False, True):
        out = sampler.sample_next(case.model.dynamics, ctx, acts, mask, kv_cache=kv,
                                  noise=(case[f"{prefix}_noise_z"], case[f"{prefix}_noise_ctx"]), **kwargs)
        case.check(f"{prefix}_z", out.z)
        case.check(f"{prefix}_x1_traj", out.x1_traj)
        case.check(f"{prefix}_z_traj", out.z_traj)
        case.check(f"{prefix}_deltas", predictors.flow_deltas(out.x1_traj, batch_rms=True))
        case.check(f"{prefix}_u_f", predictors.flow_instability(out.x1_traj, batch_rms=True))
        case.check(f"{prefix}_u_f_per_b", predictors.flow_instability(out.x1_traj))
        outs.append(out)
    # Seeded like the reference call, our draws (initial z, then context noise) replay the recorded ones.
    with torch.random.fork_rng():
        torch.manual_seed(int(case[f"{prefix}_seed"]))
        seeded = sampler.sample_next(case.model.dynamics, ctx, acts, mask, kv_cache=False, **kwargs)
    case.check(f"{prefix}_z", seeded.z)
    return outs


@torch.no_grad()
def test_sampler_k4_train_schedule(case):
    _sampler_case(case, "k4", case.param("k4_z", "tau_ctx", 0.1), case.param("k4_z", "tau_init", 0.0))
    case.done()


@torch.no_grad()
def test_sampler_k8_interactive_warm_start(case):
    outs = _sampler_case(case, "k8", case.param("k8_z", "tau_ctx", 0.01), case.param("k8_z", "tau_init", 0.125))
    for out in outs:
        case.check("k8_executed_steps", out.executed_steps)
        if _has_heads(case):
            case.check("k8_h_new", out.h, HIDDEN)
            if case.model.reward_head is not None:
                head = case.model.reward_head
                case.check("k8_reward_pred", head.decode(head(out.h))[:, 0])
    case.done()


@torch.no_grad()
def test_round_trip_residual_and_motion(case):
    tok, z_prev = case.model.tokenizer, case["ctx_packed"][:, -1]
    for prefix in ("k4", "k8"):
        z = case[f"{prefix}_z"]
        case.check(f"{prefix}_ur_z_recon", predictors.round_trip(tok, z))
        u_r = predictors.round_trip_residual(tok, z)
        case.check(f"{prefix}_ur_interactive", u_r)
        case.check(f"{prefix}_urnorm_u_r", u_r)
        m = predictors.motion(z, z_prev)
        case.check(f"{prefix}_urnorm_motion", m)
        case.check(f"{prefix}_urnorm_u_r_norm", predictors.normalise(u_r, m))
    case.done()


@torch.no_grad()
def test_seed_variance_over_candidates(case):
    preds = case["us_predictions"]
    K, N = preds.shape[:2]
    ctx, desc_key = case["ctx_packed"][0:1], "us_predictions"
    rows = K * N  # row k * N + n: candidate-major, as the reference flattens them
    context = ctx.expand(rows, -1, -1, -1)
    actions = sampler.expand_seeds(case["actions"][:K, :ctx.shape[1] + 1], N)
    lang = case["lang_emb"][0:1].expand(rows, -1)
    for kv in (False, True):
        out = sampler.sample_next(case.model.dynamics, context, actions, case["act_mask"][0, 0],
                                  steps=int(case.param(desc_key, "sched K", 4)),
                                  tau_ctx=case.param(desc_key, "tau_ctx", 0.1), lang_emb=lang, kv_cache=kv,
                                  noise=(case["us_noise_z"], case["us_noise_ctx"]))
        z = out.z.reshape(K, N, *out.z.shape[1:])
        case.check("us_predictions", z)
        case.check("us_u_s", predictors.seed_variance(z))
        mean = z.mean(dim=1)
        u_r = predictors.round_trip_residual(case.model.tokenizer, mean)
        m = predictors.motion(mean, ctx[:, -1].expand(K, -1, -1))
        case.check("us_u_r", u_r)
        case.check("us_motion", m)
        case.check("us_u_r_norm", predictors.normalise(u_r, m))
    case.done()


def test_training_loss_with_and_without_bootstrap(case):
    dyn = case.model.dynamics
    actions, mask = flow_matching.led_to_actions(case["loss_act_raw"], case["loss_mask_raw"])
    case.check("loss_actions", actions)
    case.check("loss_act_mask", mask)
    z1, b_self, lang = case["loss_z1"], int(case["loss_B_self"]), case["lang_emb"]
    draws = flow_matching.LossDraws(case["loss_draw_step_idx_self"], case["loss_draw_u"], case["loss_draw_z0"])
    with torch.random.fork_rng():
        torch.manual_seed(int(case["loss_seed"]))
        fresh = flow_matching.draw(z1, b_self, dyn.cfg.k_max)
    for name in ("step_idx_self", "u", "z0"):
        assert torch.equal(getattr(fresh, name), getattr(draws, name)), f"[{case.name}] seeded draw '{name}' differs"
    start = int(case.param("loss_boot_total", "bootstrap_start", 10000))

    def run(prefix, step, **rms):
        # Heads join the loss exactly when the reference call had them (its aux loss is then non-zero).
        heads = {}
        if float(case.v.get(f"{prefix}_aux_loss_rew", 0.0)) != 0.0:
            heads.update(reward_head=case.model.reward_head, rewards=case["loss_rew_raw"],
                         reward_weight=case.param(f"{prefix}_total", "reward_weight",
                                                  float(case.dyn_args.get("reward_weight", 0.0))))
        if float(case.v.get(f"{prefix}_aux_loss_bc", 0.0)) != 0.0:
            heads.update(policy_head=case.model.policy_head,
                         bc_weight=case.param(f"{prefix}_total", "bc_weight",
                                              float(case.dyn_args.get("bc_weight", 0.0))))
        return flow_matching.dynamics_pretrain_loss(dyn, z1, actions, mask, b_self=b_self, step=step,
                                                    bootstrap_start=start, lang_emb=lang, draws=draws, **heads, **rms)

    main = {}  # inputs and x1_hat of the first (main) forward of the first call

    def keep(name, value):  # hooks must return None, or they would replace the module's output
        main.setdefault(name, value)
    hooks = [dyn.register_forward_pre_hook(lambda m, a: keep("in", a)),
             dyn.register_forward_hook(lambda m, a, out: keep("out", out[0]))]
    try:
        for prefix, step in (("loss_boot", int(case.param("loss_boot_total", "step", start))),
                             ("loss_noboot", int(case.param("loss_noboot_total", "step", 0)))):
            loss, aux = run(prefix, step)
            case.check(f"{prefix}_total", loss)
            for key in AUX_KEYS:
                case.check(f"{prefix}_aux_{key}", aux[key])
    finally:
        for hook in hooks:
            hook.remove()
    _, step_idx, signal_idx, z_tilde = main["in"]
    case.check("loss_step_idx_full", step_idx)
    case.check("loss_sigma_idx", signal_idx)
    case.check("loss_sigma", signal_idx.float() / dyn.cfg.k_max)
    case.check("loss_z_tilde", z_tilde)
    case.check("loss_z1_hat_main", main["out"])
    fresh_rms = {f"rms_{k}": flow_matching.EmaRms() for k in ("flow", "rew", "bc")}
    case.check("loss_boot_total_fresh_rms", run("loss_boot", int(case.param("loss_boot_total", "step", start)),
                                                **fresh_rms)[0])
    case.done()


@torch.no_grad()
def test_reward_and_policy_heads(case):
    if not _has_heads(case):
        pytest.skip(f"{case.name} has no agent tokens, so no head tensors")
    wm = case.model
    h = wm.dynamics(case["actions"], case["dyn_step_idx"], case["dyn_signal_idx"], case["dyn_z_noisy"],
                    act_mask=case["act_mask"], lang_emb=case["lang_emb"])[1]
    if wm.reward_head is not None:
        logits = wm.reward_head(h)
        case.check("rew_logits", logits, HIDDEN)
        case.check("rew_centers_log", wm.reward_head.centers_log)
        case.check("rew_decoded_l0", wm.reward_head.decode(logits))
        case.check("rew_decode_probe_value", wm.reward_head.decode(case["rew_decode_probe_logits"]))
        case.check("twohot_probe_out", twohot(case["twohot_probe_y"], wm.reward_head.centers_log), EXACT_ISH)
    elif "rew_logits" in case.v:
        case.errors.append("'rew_logits' recorded, but dynamics.pt gave no reward head to load")
    if wm.policy_head is not None:
        case.check("policy_out", wm.policy_head(h), HIDDEN)
    elif "policy_out" in case.v:
        case.errors.append("'policy_out' recorded, but dynamics.pt gave no policy head to load")
    case.done()
