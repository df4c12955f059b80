"""Meta-World v3 environments and their scripted expert policies (metaworld 3.1.x, gymnasium API).

Goal variants: Meta-World's MT1 benchmark for a task lists 50 goal variants ("train tasks"); variant i is
`goal_variants(task)[i]`. Episodes last at most `MAX_EPISODE_STEPS` (the env truncates at 500).
Rendering (evaluation videos): `make_env(..., render_size=N)` renders offscreen from `RENDER_CAMERA`; `render_frame`
gives the upright frame. MuJoCo's GL backend (MUJOCO_GL) is chosen in harmodt_fast/video.py.
"""
from __future__ import annotations

import functools
import warnings

MAX_EPISODE_STEPS = 500
# the fixed camera that shows the whole table: arm, object and goal ("corner" is closer and cuts the arm off)
RENDER_CAMERA = "corner2"

# policy class names that do not follow 'Sawyer' + CamelCase(task) + 'V3Policy'
_POLICY_NAME_EXCEPTIONS = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}


def _require_metaworld():
    try:
        import metaworld  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "Meta-World is needed for environments: pip install 'harmodt_fast[metaworld]' (metaworld 3.1.x)"
        ) from exc
    return metaworld


@functools.lru_cache(maxsize=None)
def _benchmark(task: str, seed: int):
    metaworld = _require_metaworld()
    if task not in metaworld.ALL_V3_ENVIRONMENTS:
        raise ValueError(f"unknown Meta-World v3 task {task!r}")
    return metaworld.MT1(task, seed=seed)


def goal_variants(task: str, seed: int = 0) -> list:
    """The task's goal variants (Meta-World MT1 'train tasks'), in Meta-World's order."""
    return list(_benchmark(task, seed).train_tasks)


def make_env(task: str, goal_index: int = 0, seed: int = 0, render_size: int | None = None):
    """A v3 environment of `task` set to goal variant `goal_index` (call env.reset(seed=...) before stepping).
    render_size: also render offscreen, render_size x render_size pixels from RENDER_CAMERA (see render_frame)."""
    bench = _benchmark(task, seed)
    variants = bench.train_tasks
    if not 0 <= goal_index < len(variants):
        raise ValueError(f"{task}: goal_index {goal_index} out of range (0..{len(variants) - 1})")
    view = {} if render_size is None else {"render_mode": "rgb_array", "camera_name": RENDER_CAMERA,
                                           "width": int(render_size), "height": int(render_size)}
    env = bench.train_classes[task](**view)
    if view:  # no shadows, reflections or multisampling: a tenth of the software renderer's time (visual only)
        env.model.vis.quality.shadowsize, env.model.vis.quality.offsamples = 0, 0
        env.model.mat_reflectance[:] = 0.0
    env.set_task(variants[goal_index])
    return env


def make_gym_env(task: str, goal_index: int = 0, seed: int = 0, render_mode=None):
    """make_env as a gymnasium entry point by module path ("harmodt_fast.envs:make_gym_env"): Meta-World's own
    entry points are lambdas, which a serialised EnvSpec (a Minari dataset's) cannot name."""
    env = make_env(task, goal_index, seed)
    env.render_mode = render_mode
    return env


def render_frame(env):
    """The current frame of an env made with render_size, [H, W, 3] uint8, upright: Meta-World's corner cameras are
    mounted upside down (their image y axis points up), so MuJoCo's image is flipped back."""
    return env.render()[::-1].copy()


def scripted_policy(task: str):
    """Meta-World's scripted expert for `task`; `.get_action(obs) -> action [4]`."""
    _require_metaworld()
    import metaworld.policies as policies

    name = _POLICY_NAME_EXCEPTIONS.get(task) or "Sawyer" + "".join(
        w.capitalize() for w in task.removesuffix("-v3").split("-")
    ) + "V3Policy"
    cls = getattr(policies, name, None)
    if cls is None:
        raise ValueError(f"no scripted policy {name} for task {task!r} in metaworld.policies")
    warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high", category=UserWarning)
    return cls()
