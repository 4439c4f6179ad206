"""OGBench locomotion tasks: point and ant mazes, directional ant, ant soccer (``og-antball``).

Mazes are OGBench's maze env (rendered top-down at 224 by OGBench itself) with the reference's layouts and
start/goal cells: OGBench's ``arena`` and ``medium`` maps, and the reference's own 8x8 ``bottleneck``,
``circle``, ``spiral``, ``var1`` and ``var2`` maps. Each reset draws one start/goal pair from the task's
list. Per agent step (4 simulator steps for the point, 2 for the ant) the state is the reference's
goal-relative feature vector / 20 and the reward is
``success - (|xy - goal|_1 / 2 + |xy - goal|_2 / 2 + velocity penalty) / 20``; the score is the current
step's success (within 1.0 of the goal for the point, 0.5 for the ant).

``og-ant`` is OGBench's online ant following a direction resampled every 100 steps (score: return / 250);
``og-antball`` is its ant-soccer env with the goal drawn within 3 of the origin and the camera at
distance 8 (score: success); it renders at 480 and is resized, because at 224 it renders black here.
OGBench draws from numpy's global RNG; ``OwnGlobalRNG`` makes that reproducible per env.
"""
from __future__ import annotations

from functools import cache

import gymnasium
import numpy as np

from mmbench2_lab.envs.wrappers import ActionRepeat, OwnGlobalRNG, ReferenceFrame
from mmbench2_lab.tasks import TaskSpec

# MMBench2 task name -> (robot, maze) for mazes, or the OGBench env id
TASKS = {
    "og-ant": "online-ant-v0",
    "og-antball": "online-antball-v0",
    **{f"og-{robot}-{name}": (robot, maze)
       for robot in ("point", "ant")
       for name, maze in [("arena", "arena"), ("maze", "medium"), ("bottleneck", "bottleneck"),
                          ("circle", "circle"), ("spiral", "spiral")]},
    "og-point-var1": ("point", "var1"),
    "og-point-var2": ("point", "var2"),
}
NOT_YET: dict[str, str] = {}

# The reference's own maze maps ('#' wall, '.' floor); arena and medium are OGBench's.
_LAYOUTS = {
    "bottleneck": ["########", "#..##..#", "#..##..#", "#......#", "#......#", "#..##..#", "#..##..#", "########"],
    "circle": ["########", "##....##", "#..##..#", "#.####.#", "#.####.#", "#..##..#", "##....##", "########"],
    "spiral": ["########", "#......#", "#.#.##.#", "#.#....#", "#....#.#", "#.##.#.#", "#......#", "########"],
    "var1": ["####..##", "##....##", "#.......", "#.##.#..", "..#..#.#", "#.......", "##....##", "##.#####"],
    "var2": ["..##..##", "#......#", "#..##...", "#......#", ".......#", "...##...", "#..#...#", "##.#..##"],
}
# Start/goal cells (row, col): every ordered pair of a cell set at least `gap` apart (Manhattan) ...
_CORNERS_AND_CENTRE = [(1, 1), (1, 2), (2, 1), (2, 2), (5, 5), (5, 6), (6, 5), (6, 6), (1, 5), (2, 5), (1, 6),
                       (2, 6), (5, 1), (6, 1), (5, 2), (6, 2), (3, 3), (3, 4), (4, 3), (4, 4)]
_RING = [(2, 1), (1, 2), (2, 2), (3, 1), (1, 3), (4, 1), (5, 1), (5, 2), (6, 2), (6, 3), (6, 4), (6, 5), (5, 5),
         (5, 6), (4, 6), (1, 4), (1, 5), (2, 5), (2, 6), (3, 6)]
_SPIRAL_ENDS = [(1, 1), (1, 2), (2, 1), (1, 6), (2, 6), (1, 5), (6, 1), (6, 2), (5, 1), (6, 6), (5, 6), (6, 5),
                (3, 3), (3, 4), (4, 3), (4, 4)]
_CELL_SETS = {"bottleneck": (_CORNERS_AND_CENTRE, 3), "var2": (_CORNERS_AND_CENTRE, 3), "circle": (_RING, 3),
              "var1": (_RING, 3), "spiral": (_SPIRAL_ENDS, 3),
              "arena": ([(i, j) for i in range(2, 5) for j in range(2, 5)], 2)}
# ... or an explicit list: OGBench's five medium-maze tasks as the reference edited them, plus its five more.
_MEDIUM_TASKS = [((1, 1), (6, 6)), ((6, 1), (1, 6)), ((5, 3), (2, 4)), ((2, 2), (6, 1)), ((2, 6), (1, 1)),
                 ((2, 1), (4, 5)), ((6, 5), (4, 6)), ((2, 2), (4, 4)), ((6, 1), (2, 1)), ((6, 3), (3, 3))]


def return_range(name: str) -> tuple[float, float] | None:
    return (0.0, 250.0) if name == "og-ant" else None


def make(spec: TaskSpec) -> gymnasium.Env:
    target = TASKS[spec.name]
    if isinstance(target, tuple):
        robot, maze = target
        sim = _maze_class(robot)(layout=_LAYOUTS.get(maze), tasks=_start_goal_pairs(maze),
                                 maze_type="medium" if maze == "medium" else "arena",
                                 render_mode="rgb_array", width=224, height=224)
        return MazeTask(ActionRepeat(OwnGlobalRNG(ReferenceFrame(sim)), spec.action_repeat), robot)
    import ogbench.online_locomotion  # noqa: F401  (registers the online-* envs)

    # og-antball renders black at 224 here (OGBench 1.2.2, MuJoCo 3.3.0): render at 480, resize to 224.
    size = {} if spec.name == "og-antball" else dict(width=224, height=224)
    sim = gymnasium.make(target, render_mode="rgb_array", **size).unwrapped
    if spec.name == "og-ant":
        from ogbench.online_locomotion.wrappers import GymXYWrapper

        env = GymXYWrapper(sim, resample_interval=100)
    else:
        sim.mujoco_renderer.viewer.cam.distance = 8  # closer than OGBench's 30, as in the reference
        env = NearGoal(sim)
    env = gymnasium.wrappers.TransformObservation(
        env, lambda obs: np.asarray(obs, np.float32),
        gymnasium.spaces.Box(-np.inf, np.inf, env.observation_space.shape, np.float32))
    return ActionRepeat(OwnGlobalRNG(ReferenceFrame(env)), spec.action_repeat)


def _start_goal_pairs(maze: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    if maze == "medium":
        return _MEDIUM_TASKS
    cells, gap = _CELL_SETS[maze]
    return [(a, b) for a in cells for b in cells if abs(a[0] - b[0]) + abs(a[1] - b[1]) >= gap]


@cache
def _maze_class(robot: str) -> type:
    """OGBench's maze env class for ``robot`` with our layout and start/goal list.

    OGBench defines the class inside its factory, so one throwaway arena instance hands it to us.
    """
    from ogbench.locomaze.maze import make_maze_env

    base = type(make_maze_env(robot, "maze", maze_type="arena"))
    return type(f"{robot.title()}LayoutMaze", (_LayoutMaze, base), {})


class _LayoutMaze:
    """Mixin over OGBench's maze env: ``layout`` (rows of '#'/'.', or None for OGBench's map) and ``tasks``."""

    def __init__(self, *, layout: list[str] | None, tasks: list, **kwargs):
        self._layout = None if layout is None else np.array([[c == "#" for c in row] for row in layout], int)
        self._start_goal = tasks
        super().__init__(**kwargs)

    def update_tree(self, tree):
        if self._layout is not None:
            self.maze_map = self._layout
        super().update_tree(tree)

    def set_tasks(self):
        self.task_infos = [dict(task_name=f"task{i + 1}", init_ij=start, init_xy=self.ij_to_xy(start),
                                goal_ij=goal, goal_xy=self.ij_to_xy(goal))
                           for i, (start, goal) in enumerate(self._start_goal)]


class MazeTask(gymnasium.Wrapper):
    """The reference's maze state (goal-relative features / 20), shaped reward and success, per agent step."""

    def __init__(self, env: gymnasium.Env, robot: str):
        super().__init__(env)
        self.robot = robot
        dim = 9 if robot == "point" else env.observation_space.shape[0] + 7
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._state(obs, info), {"success": self._success()}

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        maze = self.env.unwrapped
        xy, goal = maze.get_xy(), maze.get_oracle_rep()
        if self.robot == "point":
            effort = 0.025 * np.linalg.norm(xy - info["prev_qpos"])
        else:
            effort = 0.001 * np.linalg.norm(info["qvel"])
        success = self._success()
        distance = 0.5 * np.abs(xy - goal).sum() + 0.5 * np.linalg.norm(xy - goal)
        reward = float(success) - (distance + effort) / 20.0
        return self._state(obs, info), reward, terminated, truncated, {"success": success}

    def _success(self) -> bool:
        maze = self.env.unwrapped
        return bool(np.linalg.norm(maze.get_xy() - maze.get_oracle_rep()) <= maze._goal_tol)

    def _state(self, obs: np.ndarray, info: dict) -> np.ndarray:
        maze = self.env.unwrapped
        xy, goal = maze.get_xy(), maze.get_oracle_rep()
        to_goal = [xy - goal, [np.linalg.norm(xy - goal)]]
        if self.robot == "point":
            velocity = xy - info.get("prev_qpos", xy)
            parts = [xy, velocity, goal, *to_goal]
        else:
            parts = [obs, xy, goal, *to_goal]
        return (np.concatenate(parts) / 20.0).astype(np.float32)


class NearGoal(gymnasium.Wrapper):
    """og-antball: the ball's goal is redrawn within 3 of the origin at each reset (OGBench: within 12)."""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        _, info = self.env.reset(seed=seed, options=options)
        sim = self.env.unwrapped
        sim.set_goal(np.random.uniform(-3, 3, size=2))
        return sim._get_obs(), info
