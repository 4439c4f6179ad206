"""Box2D tasks: the reference's bipedal-walker terrains and lunar-lander variants, built on gymnasium's classes.

The reference ships its own copies of gymnasium's BipedalWalker and LunarLander. We configure gymnasium's
classes instead:

- bipedal-walker-{flat,uneven,rugged,hills,obstacles}: our terrain generators; the reference ran the
  walker with the module constants VIEWPORT 224x224 and SCALE 15 (a closer camera, and a forward-progress
  reward twice gymnasium's), which we apply while one of our walkers resets, steps or renders.
- lunarlander-{land,hover,takeoff}: the continuous lander in a square 400x400 world (gymnasium: 600x400)
  with the reference's gentler initial push; hover and takeoff add a goal (drawn as a translucent disc),
  the goal-relative position to the state (10-d) and a reward of 1 - distance/6 minus fuel, 0 on the ground.

Per simulator step the reward is clipped to [-1, 10] (walkers) or to [-5, 10] / 20 (land). Scores are the
return / 250 (walkers) or / 500 (landers), clipped to [0, 1]. Not reproduced: the reference's randomised
sky and lander colours and its 7- or 9-chunk lunar terrain (gymnasium draws 11 chunks).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import gymnasium
import numpy as np

from mmbench2_lab.envs.wrappers import ActionRepeat, ReferenceFrame
from mmbench2_lab.tasks import TaskSpec

TASKS = {
    "bipedal-walker-flat": "flat",
    "bipedal-walker-uneven": "uneven",
    "bipedal-walker-rugged": "rugged",
    "bipedal-walker-hills": "hills",
    "bipedal-walker-obstacles": "obstacles",
    "lunarlander-land": "land",
    "lunarlander-hover": "hover",
    "lunarlander-takeoff": "takeoff",
}
NOT_YET: dict[str, str] = {}

_WALKER_VIEW = dict(VIEWPORT_W=224, VIEWPORT_H=224, SCALE=15.0)  # the reference's walker constants
_LANDER_WORLD = dict(VIEWPORT_W=400, VIEWPORT_H=400, INITIAL_RANDOM=600.0)  # and its lander's


def return_range(name: str) -> tuple[float, float]:
    return (0.0, 500.0) if name.startswith("lunarlander") else (0.0, 250.0)


def make(spec: TaskSpec) -> gymnasium.Env:
    variant = TASKS[spec.name]
    if spec.name.startswith("bipedal-walker"):
        base = _sim_module("bipedal_walker").BipedalWalker
        cls = type(f"BipedalWalker{variant.title()}", (_WALKERS[variant], base), {})
        env = gymnasium.wrappers.TransformReward(ReferenceFrame(cls(render_mode="rgb_array")),
                                                 lambda r: float(np.clip(r, -1.0, 10.0)))
    else:
        base = _sim_module("lunar_lander").LunarLander
        cls = type(f"LunarLander{variant.title()}", (_LANDERS[variant], base), {})
        env = ReferenceFrame(cls(render_mode="rgb_array", continuous=True))
        if variant == "land":
            env = gymnasium.wrappers.TransformReward(env, lambda r: float(np.clip(r, -5.0, 10.0)) / 20.0)
    return ActionRepeat(env, spec.action_repeat)


def _sim_module(name: str):
    return importlib.import_module(f"gymnasium.envs.box2d.{name}")


@contextmanager
def _constants(module, values: dict):
    """Temporarily set module-level constants that gymnasium's Box2D code reads at call time."""
    saved = {k: getattr(module, k) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


# ---------------------------------------------------------------------------------------------------- walker
class _TerrainWalker:
    """Mixin over gymnasium's BipedalWalker (hardcore off): a terrain profile and the reference's view."""

    def reset(self, *, seed=None, options=None):
        bw = _sim_module("bipedal_walker")
        with _constants(bw, _WALKER_VIEW):
            return super().reset(seed=seed, options=options)

    def step(self, action):
        with _constants(_sim_module("bipedal_walker"), _WALKER_VIEW):
            return super().step(action)

    def render(self):
        with _constants(_sim_module("bipedal_walker"), _WALKER_VIEW):
            return super().render()

    def _profile(self) -> list[float]:
        """Ground height at each of the TERRAIN_LENGTH terrain points."""
        raise NotImplementedError

    def _generate_terrain(self, hardcore):
        bw = _sim_module("bipedal_walker")
        self.terrain = []
        self.terrain_x = [i * bw.TERRAIN_STEP for i in range(bw.TERRAIN_LENGTH)]
        self.terrain_y = self._profile()
        ground = np.clip(np.array([102, 153, 76]) + self.np_random.integers(-20, 21, 3), 0, 255)
        grass = tuple(int(c) for c in np.clip(ground + [-20, 60, 0], 0, 255))
        self.terrain_poly = []
        for i in range(bw.TERRAIN_LENGTH - 1):
            edge = [(self.terrain_x[i], self.terrain_y[i]), (self.terrain_x[i + 1], self.terrain_y[i + 1])]
            self.fd_edge.shape.vertices = edge
            body = self.world.CreateStaticBody(fixtures=self.fd_edge)
            body.color1 = body.color2 = grass
            self.terrain.append(body)
            self.terrain_poly.append((edge + [(edge[1][0], 0), (edge[0][0], 0)], tuple(int(c) for c in ground)))
        self.terrain.reverse()

    def _drifting_profile(self, pull: float, damping: float, noise: float, floor: float = 1.0):
        """Heights from a damped random walk pulled back to TERRAIN_HEIGHT; noise starts after the pad."""
        bw = _sim_module("bipedal_walker")
        y, velocity, ys = bw.TERRAIN_HEIGHT, 0.0, []
        for i in range(bw.TERRAIN_LENGTH):
            velocity = damping * velocity + pull * np.sign(bw.TERRAIN_HEIGHT - y)
            if i > bw.TERRAIN_STARTPAD:
                velocity += noise * self.np_random.uniform(-1, 1) / _WALKER_VIEW["SCALE"]
            y = min(max(y + velocity, floor), 5.5)
            ys.append(y)
        return ys


class _Flat(_TerrainWalker):
    def _profile(self):
        return [_sim_module("bipedal_walker").TERRAIN_HEIGHT] * _sim_module("bipedal_walker").TERRAIN_LENGTH


class _Uneven(_TerrainWalker):
    def _profile(self):
        return self._drifting_profile(pull=0.011, damping=0.8, noise=1.0)


class _Rugged(_TerrainWalker):
    def _profile(self):
        return self._drifting_profile(pull=0.015, damping=0.75, noise=2.25)


class _Hills(_TerrainWalker):
    def _profile(self):
        bw = _sim_module("bipedal_walker")
        base = bw.TERRAIN_HEIGHT + self.np_random.uniform(-1.0, -0.8)
        amplitude, wavelength = self.np_random.uniform(0.4, 0.8), self.np_random.uniform(7.0, 14.0)
        return [min(max(base + amplitude * np.sin(2 * np.pi * x / wavelength), 1.0), 5.5)
                for x in self.terrain_x]


class _Obstacles(_TerrainWalker):
    """Grass broken by stumps (raised boxes) and pits (3 steps deep), like hardcore mode without stairs."""

    def _profile(self):
        bw = _sim_module("bipedal_walker")
        step = bw.TERRAIN_STEP
        ys, y, velocity, rim = [], bw.TERRAIN_HEIGHT, 0.0, 0.0
        mode, counter, entering = "grass", bw.TERRAIN_STARTPAD, False
        for i, x in enumerate(self.terrain_x):
            if mode == "grass" and not entering:
                velocity = 0.8 * velocity + 0.01 * np.sign(bw.TERRAIN_HEIGHT - y)
                if i > bw.TERRAIN_STARTPAD:
                    velocity += self.np_random.uniform(-1, 1) / _WALKER_VIEW["SCALE"]
                y = min(max(y + velocity, 1.5), 5.5)
            elif mode == "pit" and entering:
                counter = int(self.np_random.integers(2, 4))
                wall = [(x, y), (x + step, y), (x + step, y - 3 * step), (x, y - 3 * step)]
                self._add_block(wall)
                self._add_block([(px + step * counter, py) for px, py in wall])
                counter += 2
                rim = y
            elif mode == "pit":
                y = rim - 3 * step if counter > 1 else rim
            elif mode == "stump" and entering:
                counter = int(self.np_random.integers(2, 4))
                width, height = counter * step, counter * 0.75 * step
                self._add_block([(x, y), (x + width, y), (x + width, y + height), (x, y + height)])
            entering = False
            ys.append(y)
            counter -= 1
            if counter == 0:
                counter = int(self.np_random.integers(bw.TERRAIN_GRASS // 2, bw.TERRAIN_GRASS))
                mode = str(self.np_random.choice(["stump", "pit"])) if mode == "grass" else "grass"
                entering = True
        return ys

    def _add_block(self, vertices):
        self.fd_polygon.shape.vertices = vertices
        block = self.world.CreateStaticBody(fixtures=self.fd_polygon)
        block.color1, block.color2 = (255, 255, 255), (153, 153, 153)
        self.terrain.append(block)


_WALKERS = {"flat": _Flat, "uneven": _Uneven, "rugged": _Rugged, "hills": _Hills, "obstacles": _Obstacles}


# ---------------------------------------------------------------------------------------------------- lander
class _Land:
    """Mixin over gymnasium's continuous LunarLander: the reference's square world, start at 0.8 height."""

    def reset(self, *, seed=None, options=None):
        gymnasium.Env.reset(self, seed=seed)  # seed first: the goal is drawn before the world is built
        self._before_reset()
        ll = _sim_module("lunar_lander")
        with _constants(ll, _LANDER_WORLD):
            super().reset()
            world_w, world_h = ll.VIEWPORT_W / ll.SCALE, ll.VIEWPORT_H / ll.SCALE
            self._place(ll, world_w, world_h)
            return self.step(np.zeros(2, np.float32))[0], {}

    def step(self, action):
        with _constants(_sim_module("lunar_lander"), _LANDER_WORLD):
            return super().step(action)

    def render(self):
        with _constants(_sim_module("lunar_lander"), _LANDER_WORLD):
            return super().render()

    def _before_reset(self):
        pass

    def _place(self, ll, world_w, world_h):
        """Move the freshly built lander (keeping its initial push) to the reference's start height."""
        x = world_w / 2 * self.np_random.uniform(0.95, 1.05)
        y = 0.8 * world_h * self.np_random.uniform(0.95, 1.05)
        self._move_lander(ll, x, y)

    def _move_lander(self, ll, x, y):
        dx, dy = x - self.lander.position[0], y - self.lander.position[1]
        for body in [self.lander, *self.legs]:
            body.position = (body.position[0] + dx, body.position[1] + dy)


class _Hover(_Land):
    """Fly to and hold a goal above the pad: reward 1 - distance/6 minus fuel, 0 on the ground."""

    goal_alpha = 104 / 255

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (10,), np.float32)
        self.goal = np.zeros(2, np.float32)

    def _before_reset(self):
        world = _LANDER_WORLD["VIEWPORT_W"] / _sim_module("lunar_lander").SCALE
        centre = np.array([world / 2, world / 2], np.float32)  # pad centre, twice the pad height (H/4)
        self.goal = centre + self.np_random.uniform(-1, 1, 2).astype(np.float32)

    def step(self, action):
        ll = _sim_module("lunar_lander")
        with _constants(ll, _LANDER_WORLD):
            state, _, terminated, truncated, info = super().step(action)
            half_w, half_h = ll.VIEWPORT_W / ll.SCALE / 2, ll.VIEWPORT_H / ll.SCALE / 2
        pos = np.array(self.lander.position, np.float32)
        to_goal = [(self.goal[0] - pos[0]) / half_w, (self.goal[1] - pos[1]) / half_h]
        state = np.concatenate([state, to_goal]).astype(np.float32)
        a = np.clip(np.asarray(action, np.float64), -1, 1)
        main = (np.clip(a[0], 0, 1) + 1) / 2 if a[0] > 0 else 0.0
        side = np.clip(abs(a[1]), 0.5, 1.0) if abs(a[1]) > 0.5 else 0.0
        reward = 1 - np.linalg.norm(pos - self.goal) / 6 - 0.03 * main - 0.003 * side
        if pos[1] < self.helipad_y + ll.LEG_DOWN / ll.SCALE:
            reward = 0.0
        return state, float(np.clip(reward, 0, 1)), terminated, truncated, info

    def render(self):
        frame = super().render().copy()
        ll = _sim_module("lunar_lander")
        h, w = frame.shape[:2]
        cx, cy, radius = self.goal[0] * ll.SCALE, h - self.goal[1] * ll.SCALE, ll.SCALE
        yy, xx = np.ogrid[:h, :w]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
        flag = np.array([204, 204, 0], np.float32)
        frame[disc] = ((1 - self.goal_alpha) * frame[disc] + self.goal_alpha * flag).astype(np.uint8)
        return frame


class _Takeoff(_Hover):
    """Lift off from the pad and fly to a goal high in the sky."""

    def _before_reset(self):
        world = _LANDER_WORLD["VIEWPORT_W"] / _sim_module("lunar_lander").SCALE
        self.goal = np.array([self.np_random.uniform(0.2, 0.8) * world, self.np_random.uniform(0.6, 0.8) * world],
                             np.float32)

    def _place(self, ll, world_w, world_h):
        """Rest the lander on the pad (legs down), push it sideways and down, and let it settle."""
        pad = self.helipad_x2 - self.helipad_x1
        x = self.np_random.uniform(self.helipad_x1 + pad / 4, self.helipad_x2 - pad / 4)
        for body in [self.lander, *self.legs]:
            body.linearVelocity, body.angularVelocity = (0.0, 0.0), 0.0
        self.lander.angle = 0.0
        self._move_lander(ll, x, self.helipad_y + ll.LEG_DOWN / ll.SCALE)
        push = 0.5 * self.np_random.uniform(-ll.INITIAL_RANDOM, ll.INITIAL_RANDOM)
        self.lander.ApplyForceToCenter((push, -2 * ll.INITIAL_RANDOM), True)
        for _ in range(5):
            self.step(np.zeros(2, np.float32))


_LANDERS = {"land": _Land, "hover": _Hover, "takeoff": _Takeoff}
