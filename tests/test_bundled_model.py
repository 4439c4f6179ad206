"""The bundled default model ships inside the package and drives a live rollout with the predictors on."""
import torch

from mmbench2_lab.checkpoints import BUNDLED_DIR, load_pretrained


def test_bundled_model_loads_and_rolls_out_with_predictors_from_a_live_simulator(threads_1):
    from mmbench2_lab.session import RolloutSession
    assert (BUNDLED_DIR / "MODEL_CARD.md").is_file()
    model = load_pretrained("bundled")
    assert model.config.tokenizer.height == 64 and not model.training
    with RolloutSession(model, "atari-pong", seed=0) as session:
        frames = [session.step(torch.tensor([1.0, 0.5, 1.0] + [0.0] * 13)) for _ in range(3)]
    last = frames[-1]
    assert last.frame.shape == (64, 64, 3)
    assert all(k in last.values for k in ("u_r_norm", "u_f_norm", "u_s_norm"))
    assert last.state in ("stable", "drifting", "hallucinating", "calibrating")
