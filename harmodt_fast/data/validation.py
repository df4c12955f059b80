"""What a dataset must be: every check of the readers, in one place, each failure a DatasetError naming the file
and the field or task.

- Task names are strings, unique (two Meta-World names of one task, e.g. reach-v2 and reach-v3, are one task).
  Where a name becomes a path (our manifest, MTDiff folders) it must be a plain name: not empty, no `/`, `\\`,
  `:` or control characters, not starting with `.` (so never `.`, `..` or hidden).
- Our manifest: at most MAX_MANIFEST_BYTES; every known field has its type; `files` maps `{task}/{field}.npy` of
  known fields and listed tasks to {sha256, bytes, shape, dtype}; every task lists its step arrays and
  episode_starts.
- .npy headers (ours and the members of MTDiff .npz files) are parsed before anything is loaded, and the shape
  and dtype they declare must fill exactly the bytes there are; nothing holding Python objects is loaded. An MTDiff
  episode file, and the sum of its members' declared sizes, is at most MAX_EPISODE_FILE_BYTES.
- Step arrays: observations [T, S] and actions [T, A] and rewards [T] of real numbers (float or integer, never
  complex), finite, |x| <= MAX_ABS_VALUE; dones and success [T] bool or numbers that are exactly 0 or 1;
  episode_starts integer-typed.
- MTDiff episode files are named `{i}.npz` with i in ASCII digits; two names of one index (`1.npz`, `01.npz`) are
  refused, not merged.
"""
from __future__ import annotations

import io
import math
import os
import re
import zipfile

import numpy as np

from harmodt_fast.tasks import to_v3

STEP_FIELDS = ("observations", "actions", "rewards", "dones", "success")
EPISODE_FIELDS = ("episode_starts", "goal_index", "expert_prob")
FILE_FIELDS = STEP_FIELDS + EPISODE_FIELDS + ("final_observations",)
REQUIRED_FIELDS = STEP_FIELDS + ("episode_starts",)
# Meta-World's values are below ~10 per step (rewards) and a few units (observations); 1e6 leaves five orders of
# headroom while every square (state variance, action MSE: <= 1e12) and every return of a 1e4-step episode
# (<= 1e10, divided by rtg_scale) stays far inside float32's and bf16's range (3.4e38). 3e38 rewards trained NaN.
MAX_ABS_VALUE = 1e6
# an MT50 manifest is ~100 KB, 1000 tasks' ~2 MB: a larger one is not read into memory
MAX_MANIFEST_BYTES = 64 << 20
# an episode file past 1 GiB would hold >= 6.8M steps of 39 float32 observations: no replay episode is that long
MAX_EPISODE_FILE_BYTES = 1 << 30
_PLAIN_NAME = re.compile(r"[^/\\:\x00-\x1f]+")
_EPISODE_FILE = re.compile(r"([0-9]+)\.npz")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_KEY = re.compile(r"([^/]+)/([a-z_]+)\.npy")
_BLOCK = 1 << 22  # elements per block when scanning values (a memory-mapped file is not pulled in whole)


class DatasetError(ValueError):
    """A dataset file that is missing, damaged or inconsistent; the message names the file and the problem."""


# task names --------------------------------------------------------------------------------------------------------
def task_key(name: str) -> str:
    """The task a name means: its v3 name for a Meta-World name of any version, else the name itself."""
    try:
        return to_v3(name)
    except ValueError:  # not a Meta-World name: a task of its own
        return name


def check_task_names(names, where: str, plain: bool = True) -> list[str]:
    """The task names as a list: strings, not empty, unique also across Meta-World versions; `plain`: also plain
    names (they become paths under the dataset folder)."""
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{where}: tasks must be a non-empty list of names, got {names!r}")
    seen = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: task name {name!r} is not a non-empty string")
        if plain and (not _PLAIN_NAME.fullmatch(name) or name.startswith(".")):
            raise DatasetError(f"{where}: task name {name!r} is not a plain name (no /, \\, : or control "
                               f"characters, not starting with '.'): task names are folder names")
        key = task_key(name)
        if key in seen:
            raise DatasetError(f"{where}: task {name!r} is listed twice (as {seen[key]!r} and {name!r})")
        seen[key] = name
    return list(names)


# our manifest ------------------------------------------------------------------------------------------------------
_INT, _NUM, _STR = "an integer", "a number", "a string"
MANIFEST_FIELDS = {"format": _STR, "quality": _STR, "episodes_per_task": _INT, "seed": _INT,
                   "episode_steps": _INT, "expert_noise": _NUM, "rule": _STR, "metaworld_version": _STR,
                   "python": _STR, "numpy": _STR, "created": _STR}
_COUNT_FIELDS = {"episodes": _INT, "transitions": _INT}
_STATS_FIELDS = {**_COUNT_FIELDS, "mean_return": _NUM, "success_rate": _NUM}


def _is(value, kind: str) -> bool:
    if kind == _STR:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) if kind == _INT else math.isfinite(value)


def _check_fields(obj, types: dict, where: str, required=()) -> None:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise DatasetError(f"{where}: no {key!r} entry")
    for key, kind in types.items():
        if key in obj and not _is(obj[key], kind):
            raise DatasetError(f"{where}: {key!r} must be {kind}, got {obj[key]!r}")


def check_manifest_size(mpath: str) -> None:
    size = os.path.getsize(mpath)
    if size > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{mpath}: {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may hold")


def check_manifest(manifest: dict, mpath: str) -> None:
    """Every field of our manifest has its type; the files listed are known fields of listed tasks."""
    _check_fields(manifest, MANIFEST_FIELDS, mpath, required=("tasks", "files"))
    tasks = check_task_names(manifest["tasks"], f"{mpath}: tasks")
    speed = manifest.get("collection_env_steps_per_s_per_worker")
    if speed is not None and not _is(speed, _NUM):
        raise DatasetError(f"{mpath}: 'collection_env_steps_per_s_per_worker' must be a number, got {speed!r}")
    for key, fields in (("counts", _COUNT_FIELDS), ("stats", _STATS_FIELDS)):
        per_task = manifest.get(key, {})
        if not isinstance(per_task, dict):
            raise DatasetError(f"{mpath}: {key!r} must be an object {{task: ...}}, got {per_task!r}")
        for task, entry in per_task.items():
            if task not in tasks:
                raise DatasetError(f"{mpath}: {key} of task {task!r}, which is not in tasks")
            _check_fields(entry, fields, f"{mpath}: {key}[{task!r}]", required=fields)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise DatasetError(f"{mpath}: 'files' must be an object {{path: entry}}, got {type(files).__name__}")
    for rel, entry in files.items():
        m = _FILE_KEY.fullmatch(rel)
        if not m or m.group(1) not in tasks or m.group(2) not in FILE_FIELDS:
            raise DatasetError(f"{mpath}: files entry {rel!r} is not {{task}}/{{field}}.npy of a listed task and "
                               f"one of {FILE_FIELDS}")
        where = f"{mpath}: files[{rel!r}]"
        _check_fields(entry, {"sha256": _STR, "bytes": _INT, "dtype": _STR}, where,
                      required=("sha256", "bytes", "shape", "dtype"))
        if not _SHA256.fullmatch(entry["sha256"]):
            raise DatasetError(f"{where}: 'sha256' is not 64 lowercase hex digits")
        shape = entry["shape"]
        if entry["bytes"] < 0 or not isinstance(shape, list) or not all(_is(n, _INT) and n >= 0 for n in shape):
            raise DatasetError(f"{where}: 'bytes' must be >= 0 and 'shape' a list of integers >= 0, got "
                               f"{entry['bytes']!r} and {shape!r}")
        try:
            np.dtype(entry["dtype"])
        except (TypeError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"{where}: 'dtype' {entry['dtype']!r} is not a numpy dtype") from exc
    for task in tasks:
        missing = [f for f in REQUIRED_FIELDS if f"{task}/{f}.npy" not in files]
        if missing:
            raise DatasetError(f"{mpath}: task {task} lists no file for {missing}")


# .npy headers ------------------------------------------------------------------------------------------------------
def npy_header(f, name: str, size: int) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of the .npy header at the start of stream `f`, which holds `size` bytes in all; the data
    they declare must fill exactly the rest. Reads only the header."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, tokenize errors, ...
        raise DatasetError(f"{name}: damaged .npy header ({type(exc).__name__}: {exc})") from exc
    if dtype.hasobject:
        raise DatasetError(f"{name}: dtype {dtype} holds Python objects (never loaded: unpickling runs code)")
    if any(n < 0 for n in shape):
        raise DatasetError(f"{name}: the header declares shape {shape}")
    data = math.prod(shape) * dtype.itemsize
    if f.tell() + data != size:
        raise DatasetError(f"{name}: the header declares shape {shape} {dtype} ({data} bytes) but the file holds "
                           f"{size - f.tell()} bytes of data")
    return shape, dtype


def check_npy_file(path: str) -> None:
    """The .npy file's header declares exactly its size (before it is memory-mapped)."""
    with open(path, "rb") as f:
        npy_header(f, path, os.fstat(f.fileno()).st_size)


def check_npz_episode(fname: str, raw: bytes) -> None:
    """Every member of the episode .npz `raw` declares exactly its size, and they sum to at most
    MAX_EPISODE_FILE_BYTES (before any member is loaded)."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = z.infolist()
            total = sum(m.file_size for m in members)
            if total > MAX_EPISODE_FILE_BYTES:
                raise DatasetError(f"{fname}: its arrays declare {total} bytes, more than the "
                                   f"{MAX_EPISODE_FILE_BYTES} an episode file may hold")
            for m in members:
                if m.filename.endswith(".npy"):
                    with z.open(m) as f:
                        npy_header(f, f"{fname}: {m.filename[:-4]}", m.file_size)
    except DatasetError:
        raise
    except Exception as exc:  # zipfile raises BadZipFile, zlib.error, struct.error, NotImplementedError, ...
        raise DatasetError(f"{fname}: cannot be read as an .npz episode ({type(exc).__name__}: {exc})") from exc


def mtdiff_episode_files(folder: str) -> list[str]:
    """The folder's `{i}.npz` episode files in order of i; a misnamed file or an index named twice is an error."""
    by_index = {}
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".npz"):
            continue
        path = os.path.join(folder, f)
        m = _EPISODE_FILE.fullmatch(f)
        if not m:
            raise DatasetError(f"{path}: episode files must be named {{i}}.npz with an integer i")
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: not a file")
        i = int(m.group(1))
        if i in by_index:
            raise DatasetError(f"{path}: episode {i} is also {by_index[i]}; rename one (ambiguous order)")
        by_index[i] = path
        size = os.path.getsize(path)
        if size > MAX_EPISODE_FILE_BYTES:
            raise DatasetError(f"{path}: {size} bytes, more than the {MAX_EPISODE_FILE_BYTES} an episode file "
                               f"may hold")
    return [by_index[i] for i in sorted(by_index)]


# arrays ------------------------------------------------------------------------------------------------------------
def _check_values(name: str, array: np.ndarray, ok, rule: str) -> None:
    # in blocks: a memory-mapped file is not pulled into memory twice
    flat = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    step = max(1, _BLOCK // max(1, flat.shape[1]))
    for lo in range(0, len(flat), step):
        block = flat[lo : lo + step]
        good = ok(block)
        if not good.all():
            row, col = (int(i) for i in np.argwhere(~good)[0])
            value = block[row, col]
            if block.dtype.kind == "f" and not np.isfinite(value):
                raise DatasetError(f"{name}: non-finite value (first at row {lo + row})")
            raise DatasetError(f"{name}: value {value.item()!r} at row {lo + row} is outside {rule}")


def _bounded(block):
    # float32/64 compare in their own type (1e6 is exact in float32); float16 (1e6 would round to inf) and
    # integers (abs of the minimum wraps) in float64
    own = block.dtype.kind == "f" and block.dtype.itemsize >= 4
    return np.abs(block if own else block.astype(np.float64)) <= MAX_ABS_VALUE


def _zero_one(block):
    return (block == 0) | (block == 1)


_MATRICES = {"observations": "[T, state_dim]", "actions": "[T, act_dim]"}


def validate_episode_arrays(name: str, obs, actions, rewards, dones, success=None, more_flags=None) -> None:
    """Shapes, dtypes, lengths and values of one episode's (or task's) step arrays; `name` is the file named in
    errors. more_flags: {field: array} of other per-step flags, checked like dones."""
    arrays = {"observations": obs, "actions": actions, "rewards": rewards, "dones": dones}
    if success is not None:
        arrays["success"] = success
    flag_fields = ("dones", "success", *(more_flags or {}))
    arrays.update(more_flags or {})
    # any dimensions (the data decides; every task of a dataset must agree, see Dataset.dims)
    for field, arr in arrays.items():
        want = _MATRICES.get(field, "[T]")
        if arr.ndim != want.count(",") + 1 or (arr.ndim == 2 and arr.shape[1] < 1):
            raise DatasetError(f"{name}: {field} have shape {tuple(arr.shape)}, expected {want}")
        flags = field in flag_fields
        if arr.dtype.kind not in ("biuf" if flags else "iuf"):
            raise DatasetError(f"{name}: {field} have dtype {arr.dtype}, expected "
                               f"{'bool or 0/1 numbers' if flags else 'real numbers (float or integer)'}")
    lengths = {field: len(arr) for field, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise DatasetError(f"{name}: arrays have unequal lengths {lengths}")
    if lengths["observations"] == 0:
        raise DatasetError(f"{name}: empty episode (0 steps)")
    for field, arr in arrays.items():
        if field in flag_fields:  # bool bytes too: a memory-mapped file may hold a 2 under a bool dtype
            _check_values(f"{name}: {field}", arr.view(np.uint8) if arr.dtype.kind == "b" else arr, _zero_one,
                          "{0, 1}")
        else:
            _check_values(f"{name}: {field}", arr, _bounded, f"[-{MAX_ABS_VALUE:g}, {MAX_ABS_VALUE:g}]")


def check_episode_starts(path: str, starts: np.ndarray, transitions: int) -> np.ndarray:
    """episode_starts as int64: integer-typed, 0 first, `transitions` last, strictly increasing."""
    if starts.ndim != 1 or starts.dtype.kind not in "iu":
        raise DatasetError(f"{path}: episode_starts have shape {tuple(starts.shape)} dtype {starts.dtype}, "
                           f"expected [E + 1] integers")
    if len(starts) < 2 or starts[0] != 0 or starts[-1] != transitions or np.any(starts < 0) or np.any(
            starts > transitions) or np.any(np.diff(starts.astype(np.int64)) <= 0):
        raise DatasetError(f"{path}: episode starts do not split the {transitions} transitions into non-empty "
                           f"episodes")
    return np.asarray(starts, dtype=np.int64)
