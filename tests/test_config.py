"""Configs: presets, overrides, JSON/YAML round trips and the errors a user sees."""
import json

import pytest

from mmbench2_lab.cli import main
from mmbench2_lab.config import Config, preset


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_preset_round_trips_through_json_and_yaml(tmp_path, name):
    cfg = preset(name)
    for suffix in (".json", ".yaml"):
        path = cfg.save(tmp_path / f"cfg{suffix}")
        assert Config.load(path) == cfg


def test_paper_preset_matches_the_released_configuration():
    cfg = preset("paper")
    assert (cfg.tokenizer.height, cfg.tokenizer.patch, cfg.tokenizer.n_latents, cfg.tokenizer.d_bottleneck) == (224, 14, 64, 64)
    assert cfg.tokenizer.n_patches == 256 and cfg.tokenizer.patch_dim == 588
    assert (cfg.dynamics.d_model, cfg.dynamics.depth, cfg.dynamics.k_max) == (1024, 16, 64)
    assert (cfg.dynamics.n_spatial, cfg.dynamics.d_spatial) == (32, 128)


def test_dotted_overrides_coerce_types_from_strings_and_dicts():
    cfg = preset("tiny", ["dynamics_train.steps=7", "tokenizer.d_model=64", "dynamics_train.compile=true", "sampler.tau_ctx=0.05"])
    assert cfg.dynamics_train.steps == 7 and cfg.tokenizer.d_model == 64 and cfg.dynamics_train.compile is True
    assert cfg.sampler.tau_ctx == pytest.approx(0.05)
    cfg2 = preset("tiny", {"dynamics_train.steps": "9"})
    assert cfg2.dynamics_train.steps == 9


def test_tokenizer_latent_grid_propagates_to_the_dynamics():
    cfg = preset("tiny", {"tokenizer.n_latents": 32, "tokenizer.d_bottleneck": 8})
    assert (cfg.dynamics.n_latents, cfg.dynamics.d_bottleneck) == (32, 8)
    assert (cfg.dynamics.n_spatial, cfg.dynamics.d_spatial) == (16, 16)


def test_unknown_key_names_close_matches():
    with pytest.raises(KeyError, match="dynamics_train.steps"):
        preset("tiny", {"dynamics_train.step": 3})


def test_bad_values_are_rejected_with_the_reason():
    with pytest.raises(TypeError, match="dynamics_train.steps.*integer"):
        preset("tiny", {"dynamics_train.steps": [1, 2]})
    with pytest.raises(ValueError, match="multiples of patch"):
        preset("tiny", {"tokenizer.patch": 7})
    with pytest.raises(ValueError, match="power of two"):
        preset("tiny", {"dynamics.k_max": 12})
    with pytest.raises(KeyError, match="unknown preset"):
        preset("huge")


def test_config_command_writes_an_editable_file(tmp_path, capsys):
    out = tmp_path / "run.yaml"
    assert main(["config", "--preset", "tiny", "--set", "dynamics_train.steps=11", "--out", str(out)]) == 0
    assert Config.load(out).dynamics_train.steps == 11
    assert main(["config", "--from", str(out), "--set", "dynamics_train.lr=0.5"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert printed["dynamics_train"]["lr"] == 0.5 and printed["dynamics_train"]["steps"] == 11
