"""Atari 2600 games with continuous actions (ALE ``v5`` through ale-py), as the reference runs them.

The 3 action dims (radius, angle, fire) map linearly from [-1, 1] onto ALE's continuous bounds; ALE v5
skips 4 frames per step and ``repeat_action_probability`` is 0. The state is the 128-byte RAM / 255; the
frame is the 210x160 screen pasted centred on a black 224x224 canvas. The score is the return normalised
over a per-game range.
"""
from __future__ import annotations

import gymnasium
import numpy as np

from mmbench2_lab.envs.wrappers import REFERENCE_SIZE, ActionRepeat, ReferenceFrame
from mmbench2_lab.tasks import TaskSpec

# MMBench2 task name -> (ALE game id, (min, max) return for the score)
_GAMES = {
    "atari-alien": ("Alien", (0, 1000)),
    "atari-assault": ("Assault", (0, 1000)),
    "atari-asterix": ("Asterix", (0, 5000)),
    "atari-atlantis": ("Atlantis", (0, 50000)),
    "atari-bank-heist": ("BankHeist", (0, 1000)),
    "atari-battle-zone": ("BattleZone", (0, 15000)),
    "atari-beamrider": ("BeamRider", (0, 2000)),
    "atari-boxing": ("Boxing", (-100, 100)),
    "atari-chopper-command": ("ChopperCommand", (0, 1000)),
    "atari-crazy-climber": ("CrazyClimber", (0, 20000)),
    "atari-double-dunk": ("DoubleDunk", (0, 25)),
    "atari-gopher": ("Gopher", (0, 2000)),
    "atari-ice-hockey": ("IceHockey", (-15, 15)),
    "atari-jamesbond": ("Jamesbond", (0, 1000)),
    "atari-kangaroo": ("Kangaroo", (0, 10000)),
    "atari-krull": ("Krull", (0, 10000)),
    "atari-ms-pacman": ("MsPacman", (0, 5000)),
    "atari-name-this-game": ("NameThisGame", (0, 3000)),
    "atari-phoenix": ("Phoenix", (0, 1000)),
    "atari-pong": ("Pong", (-21, 21)),
    "atari-road-runner": ("RoadRunner", (0, 50000)),
    "atari-robotank": ("Robotank", (0, 50)),
    "atari-seaquest": ("Seaquest", (0, 5000)),
    "atari-space-invaders": ("SpaceInvaders", (0, 2000)),
    "atari-tutankham": ("Tutankham", (0, 100)),
    "atari-upndown": ("UpNDown", (0, 5000)),
    "atari-yars-revenge": ("YarsRevenge", (0, 20000)),
}
TASKS = {name: f"ALE/{game}-v5" for name, (game, _) in _GAMES.items()}
NOT_YET: dict[str, str] = {}


def return_range(name: str) -> tuple[float, float]:
    lo, hi = _GAMES[name][1]
    return (float(lo), float(hi))


def make(spec: TaskSpec) -> gymnasium.Env:
    import ale_py

    gymnasium.register_envs(ale_py)
    sim = gymnasium.make(TASKS[spec.name], obs_type="ram", continuous=True, repeat_action_probability=0.0,
                         render_mode="rgb_array").unwrapped
    env = gymnasium.wrappers.TransformObservation(
        sim, lambda ram: ram.astype(np.float32) / 255.0, gymnasium.spaces.Box(0.0, 1.0, (128,), np.float32))
    return ActionRepeat(ReferenceFrame(env, _on_canvas), spec.action_repeat)


def _on_canvas(screen: np.ndarray) -> np.ndarray:
    """Paste the (210, 160, 3) screen centred on a black (224, 224, 3) canvas."""
    canvas = np.zeros((REFERENCE_SIZE, REFERENCE_SIZE, 3), np.uint8)
    top, left = (REFERENCE_SIZE - screen.shape[0]) // 2, (REFERENCE_SIZE - screen.shape[1]) // 2
    canvas[top:top + screen.shape[0], left:left + screen.shape[1]] = screen
    return canvas
