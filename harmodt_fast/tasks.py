"""Meta-World task sets (v3 environment names)."""

# The order of the HarmoDT paper's task list: MT5, MT30 and MT50 are its first 5, 30 and 50 names.
_PAPER_ORDER = (
    "basketball-v3 bin-picking-v3 button-press-topdown-v3 button-press-v3 button-press-wall-v3 coffee-button-v3 "
    "coffee-pull-v3 coffee-push-v3 dial-turn-v3 disassemble-v3 door-close-v3 door-lock-v3 door-open-v3 "
    "door-unlock-v3 hand-insert-v3 drawer-close-v3 drawer-open-v3 faucet-open-v3 faucet-close-v3 "
    "handle-press-side-v3 handle-press-v3 handle-pull-side-v3 handle-pull-v3 lever-pull-v3 peg-insert-side-v3 "
    "pick-place-wall-v3 pick-out-of-hole-v3 reach-v3 push-back-v3 push-v3 pick-place-v3 plate-slide-v3 "
    "plate-slide-side-v3 plate-slide-back-v3 plate-slide-back-side-v3 soccer-v3 push-wall-v3 shelf-place-v3 "
    "sweep-into-v3 sweep-v3 window-open-v3 window-close-v3 assembly-v3 button-press-topdown-wall-v3 hammer-v3 "
    "peg-unplug-side-v3 reach-wall-v3 stick-push-v3 stick-pull-v3 box-close-v3"
).split()

# Meta-World's own MT10 benchmark list.
_MT10 = (
    "reach-v3 push-v3 pick-place-v3 door-open-v3 drawer-open-v3 drawer-close-v3 button-press-topdown-v3 "
    "peg-insert-side-v3 window-open-v3 window-close-v3"
).split()

TASK_SETS: dict[str, list[str]] = {
    "MT5": list(_PAPER_ORDER[:5]),
    "MT10": list(_MT10),
    "MT30": list(_PAPER_ORDER[:30]),
    "MT50": list(_PAPER_ORDER[:50]),
}


def resolve_tasks(tasks) -> list[str]:
    """A task-set name ("MT5"), a comma-separated string or a list of names -> list of v3 names (validated)."""
    if isinstance(tasks, str):
        if tasks in TASK_SETS:
            return list(TASK_SETS[tasks])
        tasks = [t for t in tasks.split(",") if t]
    names = list(tasks)
    known = set(_PAPER_ORDER)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(f"unknown Meta-World task name(s) {unknown}; known: the MT50 list in hf.TASK_SETS['MT50']")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    if not names:
        raise ValueError("no tasks given")
    return names


def task_names(tasks) -> list[str]:
    """Like resolve_tasks, but names that are not Meta-World's are kept as they are (datasets may name any
    tasks); Meta-World names of older versions become their v3 names."""
    if isinstance(tasks, str):
        if tasks in TASK_SETS:
            return list(TASK_SETS[tasks])
        tasks = [t for t in tasks.split(",") if t]
    names = []
    for t in tasks:
        try:
            names.append(to_v3(str(t)))
        except ValueError:
            names.append(str(t))
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    if not names:
        raise ValueError("no tasks given")
    return names


def to_v3(name: str) -> str:
    """A Meta-World task name as it appears in older data ("reach-v2", "reach-v1", "reach") -> its v3 name.

    Every v2 environment kept its name in v3 (only the suffix changed), so the mapping is by suffix; a name that
    is not one of the MT50 tasks after mapping raises ValueError.
    """
    base = name.strip()
    for suffix in ("-v1", "-v2", "-v3"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    v3 = base + "-v3"
    if v3 not in _PAPER_ORDER:
        raise ValueError(f"{name!r} is not a Meta-World MT50 task name (v1/v2/v3 names are accepted)")
    return v3


def short_name(task: str) -> str:
    """A task's name as figures and tables show it: without the Meta-World version ("reach-v3" -> "reach")."""
    return task.removesuffix("-v3")


V2_TO_V3: dict[str, str] = {t.removesuffix("-v3") + "-v2": t for t in _PAPER_ORDER}
