"""Loading and saving world models: official-format files on disk, named variants, our own folders."""
from __future__ import annotations

import json

import pytest
import torch

from mmbench2_lab import checkpoints
from mmbench2_lab.checkpoints import (dynamics_config_from_args, load_official, load_pretrained,
                                      tokenizer_config_from_args)
from mmbench2_lab.config import Config
from mmbench2_lab.model import WorldModel

# A reference-style tiny configuration, written the way the reference trainers store ``args``.
TOK_ARGS = {"H": 16, "W": 16, "C": 3, "patch": 4, "d_model": 32, "n_heads": 2, "depth": 2, "n_latents": 4,
            "d_bottleneck": 6, "dropout": 0.05, "mlp_ratio": 4.0, "time_every": 1, "lr": 1e-4, "seed": 1}
DYN_ARGS = {"d_model_dyn": 32, "dyn_depth": 2, "n_heads": 2, "dropout": 0.0, "mlp_ratio": 4.0, "time_every": 2,
            "packing_factor": 2, "n_register": 2, "n_agent": 1, "k_max": 4, "lang_dim": 8, "H": None,
            "reward_weight": 1.0, "reward_L": 2, "reward_num_bins": 9, "reward_log_low": -3.0,
            "reward_log_high": 3.0, "reward_mlp_ratio": 2.0, "reward_pool_agent": "attn", "bc_weight": 0.0,
            "bc_L": 2, "bc_act_dim": 16, "bc_mlp_ratio": 2.0, "bc_pool_agent": "mean"}


def _reference_model(with_reward=True) -> WorldModel:
    tok = tokenizer_config_from_args(TOK_ARGS)
    dyn = dynamics_config_from_args(DYN_ARGS, tok, reward_head=with_reward, bc_head=False)
    torch.manual_seed(0)
    model = WorldModel(Config(tokenizer=tok, dynamics=dyn)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _save_official(model: WorldModel, folder, tok_key="model", dyn_key="dynamics", prefix=""):
    """torch.save the pair as the reference trainers do."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 10, "epoch": 0, "model" if tok_key == "model" else tok_key:
                {prefix + k: v for k, v in model.tokenizer.state_dict().items()},
                "args": TOK_ARGS, "rms_state": {"mse": {"sq_ema": torch.tensor(1.0)}}}, folder / "tokenizer.pt")
    torch.save({"step": 10, "epoch": 0, dyn_key: {prefix + k: v for k, v in model.dynamics.state_dict().items()},
                "rew_head": None if model.reward_head is None else model.reward_head.state_dict(),
                "policy_head": None, "args": DYN_ARGS}, folder / "dynamics.pt")


@torch.no_grad()
def _same_outputs(a: WorldModel, b: WorldModel) -> None:
    frames = torch.rand(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    z = a.encode(frames)
    torch.testing.assert_close(b.encode(frames), z)
    torch.testing.assert_close(b.decode(z), a.decode(z))
    args = (torch.rand(2, 2, 16), torch.full((2, 2), 2), torch.full((2, 2), 3), z)
    lang = torch.randn(2, 8)
    for x, y in zip(a.dynamics(*args, lang_emb=lang), b.dynamics(*args, lang_emb=lang)):
        torch.testing.assert_close(y, x)


def test_official_pair_on_disk_loads_through_load_pretrained(tmp_path):
    model = _reference_model()
    _save_official(model, tmp_path)
    loaded = load_pretrained(str(tmp_path))
    assert not loaded.training and loaded.config.dynamics.n_agent == 1 and loaded.policy_head is None
    assert loaded.config.tokenizer.dropout == 0.05 and loaded.config.dynamics.k_max == 4
    _same_outputs(model, loaded)
    torch.testing.assert_close(loaded.reward_head.centers_log, torch.linspace(-3, 3, 9))


def test_wrapper_prefixes_and_containers_are_unwrapped(tmp_path):
    model = _reference_model(with_reward=False)
    _save_official(model, tmp_path, tok_key="state_dict", dyn_key="dyn_model", prefix="_orig_mod.module.")
    _same_outputs(model, load_official(tmp_path / "tokenizer.pt", tmp_path / "dynamics.pt"))


def test_args_map_onto_our_configs_with_reference_fallbacks():
    tok = tokenizer_config_from_args({"H": 28, "W": 28, "patch": 7})
    assert (tok.height, tok.patch, tok.d_model, tok.depth, tok.n_latents, tok.d_bottleneck) == (28, 7, 256, 6, 16, 32)
    dyn = dynamics_config_from_args({"d_model_dyn": 64, "k_max": 16}, tok, packing_factor=4)
    assert (dyn.d_model, dyn.depth, dyn.time_every, dyn.k_max, dyn.lang_dim) == (64, 8, 4, 16, 0)
    assert (dyn.n_spatial, dyn.d_spatial, dyn.reward_num_bins) == (4, 128, 101)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    _save_official(_reference_model(with_reward=False), tmp_path)
    ckpt = torch.load(tmp_path / "dynamics.pt", weights_only=True)
    ckpt["args"] = dict(DYN_ARGS, dyn_depth=3)
    torch.save(ckpt, tmp_path / "dynamics.pt")
    with pytest.raises(ValueError, match=r"missing: transformer\.layers\.2\.norm1\.scale"):
        load_pretrained(str(tmp_path))
    ckpt["args"] = dict(DYN_ARGS, d_model_dyn=48, n_heads=2)
    torch.save(ckpt, tmp_path / "dynamics.pt")
    with pytest.raises(ValueError, match=r"other shapes: register_tokens: checkpoint \(2, 32\) vs model \(2, 48\)"):
        load_pretrained(str(tmp_path))


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = _reference_model()
    model.save_pretrained(tmp_path / "wm")
    assert {p.name for p in (tmp_path / "wm").iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "wm" / "config.json").read_text())["dynamics"]["reward_head"] is True
    _same_outputs(model, load_pretrained(str(tmp_path / "wm")))


def test_from_pretrained_refuses_weights_of_another_config(tmp_path):
    model = _reference_model()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dynamics"]["n_register"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="register_tokens"):
        WorldModel.from_pretrained(tmp_path)


def test_official_variant_from_a_local_dir_needs_no_hub(tmp_path):
    model = _reference_model()
    _save_official(model, tmp_path / "coverage_aware")
    _same_outputs(model, load_pretrained("coverage_aware", local_dir=tmp_path))


def test_offline_variant_miss_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download nicklashansen/mmbench2-models"):
        load_pretrained("base", cache_dir=tmp_path / "cache")


def test_missing_bundled_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "BUNDLED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="no bundled model"):
        load_pretrained("bundled")


def test_unknown_names_and_empty_folders_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        load_pretrained("large")
    with pytest.raises(FileNotFoundError, match="neither"):
        load_pretrained(str(tmp_path))
