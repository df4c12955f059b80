"""Issue 21: every bad dataset is refused with a DatasetError that names the file and the field or task, before
anything is allocated for it; a collection folder is held by one collection at a time."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast._io import LOCK_FILE, folder_lock
from harmodt_fast.data import collection, validation
from harmodt_fast.data.dataset import FORMAT, MANIFEST, file_sha256

TASK = "reach-v3"


# a small valid dataset of ours, written without Meta-World ------------------------------------------------------
def task_arrays(seed=0, lengths=(3, 4)):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    dones = np.zeros(n, bool)
    dones[np.cumsum(lengths) - 1] = True
    return {"observations": rng.normal(size=(n, 39)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (n, 4)).astype(np.float32),
            "rewards": rng.uniform(0, 10, n).astype(np.float32), "dones": dones, "success": rng.random(n) < 0.3,
            "episode_starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}


def file_entry(path) -> dict:
    with open(path, "rb") as f:  # the header only: object arrays are written too
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    return {"sha256": file_sha256(path), "bytes": os.path.getsize(path), "shape": list(shape), "dtype": str(dtype)}


def write_ours(root, tasks=(TASK,)) -> str:
    """A dataset folder of our format with `tasks`, each of two short episodes."""
    files = {}
    for i, task in enumerate(tasks):
        os.makedirs(os.path.join(root, task), exist_ok=True)
        for field, arr in task_arrays(i).items():
            path = os.path.join(root, task, f"{field}.npy")
            np.save(path, arr)
            files[f"{task}/{field}.npy"] = file_entry(path)
    write_manifest(root, {"format": FORMAT, "tasks": list(tasks), "files": files})
    return str(root)


def read_manifest(root) -> dict:
    with open(os.path.join(root, MANIFEST)) as f:
        return json.load(f)


def write_manifest(root, manifest) -> None:
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f)


def replace_array(root, task, field, arr) -> str:
    """Writes `arr` as the task's field and updates the manifest to match (the checksum does not hide it)."""
    path = os.path.join(root, task, f"{field}.npy")
    np.save(path, arr)
    m = read_manifest(root)
    m["files"][f"{task}/{field}.npy"] = file_entry(path)
    write_manifest(root, m)
    return path


def load_all(path, **kwargs):
    ds = hf.load_dataset(path, **kwargs)
    return {t: ds.arrays(t) for t in ds.tasks}


def refused(path, match, **kwargs) -> str:
    with pytest.raises(hf.DatasetError, match=match) as info:
        load_all(path, **kwargs)
    return str(info.value)


@pytest.fixture
def ours(tmp_path):
    return write_ours(tmp_path / "ours")


def test_the_valid_dataset_loads(ours):
    d = load_all(ours)[TASK]
    assert d.episode_starts.tolist() == [0, 3, 7] and d.observations.shape == (7, 39)


# the manifest ----------------------------------------------------------------------------------------------------
def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _entry(change):
    return lambda m: change(m["files"][f"{TASK}/rewards.npy"])


@pytest.mark.parametrize("change, match", [
    (_set("files", []), r"'files' must be an object"),  # was AttributeError
    (_entry(lambda e: e.pop("bytes")), r"files\['reach-v3/rewards\.npy'\]: no 'bytes' entry"),  # was KeyError
    (lambda m: m["files"].__setitem__(f"{TASK}/rewards.npy", "abc"),
     r"files\['reach-v3/rewards\.npy'\]: expected a JSON object"),  # was TypeError
    (_set("tasks", 5), r"tasks must be a non-empty list of names, got 5"),  # was TypeError
    (_set("tasks", []), r"tasks must be a non-empty list of names, got \[\]"),  # was StopIteration
    (_set("tasks", [TASK, 7]), r"task name 7 is not a non-empty string"),
    (_entry(lambda e: e.update(bytes="12")), r"rewards\.npy'\]: 'bytes' must be an integer"),
    (_entry(lambda e: e.update(bytes=True)), r"rewards\.npy'\]: 'bytes' must be an integer"),
    (_entry(lambda e: e.update(sha256=5)), r"rewards\.npy'\]: 'sha256' must be a string"),
    (_entry(lambda e: e.update(sha256="ab")), r"rewards\.npy'\]: 'sha256' is not 64"),
    (_entry(lambda e: e.update(shape=[7.5])), r"rewards\.npy'\]: 'bytes' must be >= 0 and 'shape' a list"),
    (_entry(lambda e: e.update(dtype="float33")), r"rewards\.npy'\]: 'dtype' 'float33' is not a numpy dtype"),
    (lambda m: m["files"].pop(f"{TASK}/dones.npy"), r"task reach-v3 lists no file for \['dones'\]"),
    (lambda m: m["files"].__setitem__("../x/rewards.npy", m["files"][f"{TASK}/rewards.npy"]),
     r"files entry '\.\./x/rewards\.npy' is not \{task\}/\{field\}\.npy"),
    (lambda m: m["files"].__setitem__(f"{TASK}/evil.npy", m["files"][f"{TASK}/rewards.npy"]),
     r"files entry 'reach-v3/evil\.npy'"),
    (_set("seed", "7"), r"'seed' must be an integer, got '7'"),
    (_set("stats", {TASK: {"episodes": 2}}), r"stats\['reach-v3'\]: no 'transitions' entry"),
    (_set("stats", {"push-v3": {}}), r"stats of task 'push-v3', which is not in tasks"),
    (_set("counts", []), r"'counts' must be an object"),
    (_set("collection_env_steps_per_s_per_worker", "fast"), r"'collection_env_steps_per_s_per_worker' must be"),
])
def test_bad_manifest_fields(ours, change, match):
    m = read_manifest(ours)
    change(m)
    write_manifest(ours, m)
    message = refused(ours, match)
    assert message.startswith(os.path.join(ours, MANIFEST))


def test_manifest_nested_too_deeply_or_too_large(ours, monkeypatch):
    path = os.path.join(ours, MANIFEST)
    with open(path, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)  # RecursionError inside json
    assert refused(ours, r"cannot be read as JSON \(nested too deeply\)").startswith(path)
    monkeypatch.setattr(validation, "MAX_MANIFEST_BYTES", 1000)
    assert refused(ours, r"200000 bytes, more than the 1000 a manifest may hold").startswith(path)


@pytest.mark.parametrize("name", ["../outside-xyz", "/tmp/abs-task", "a/b", "a\\b", "", ".", "..", ".hidden",
                                  "c:x", "tab\tname"])
def test_task_names_that_are_paths_are_refused(ours, name):
    m = read_manifest(ours)
    m["tasks"] = [TASK, name]
    write_manifest(ours, m)
    message = refused(ours, "task name .* is not")
    assert repr(name) in message and MANIFEST in message


@pytest.mark.parametrize("tasks, twice", [([TASK, TASK], TASK), ([TASK, "reach-v2"], "reach-v2"),
                                          (["alpha", "alpha"], "alpha")])
def test_duplicate_task_names_are_refused(tmp_path, tasks, twice):
    root = write_ours(tmp_path / "d", tasks=tasks)
    message = refused(root, "is listed twice")
    assert f"task {twice!r}" in message


# .npy files of ours ----------------------------------------------------------------------------------------------
def _corrupt_header(path, old: bytes, new: bytes) -> None:
    raw = open(path, "rb").read()
    assert raw.count(old) == 1 and len(old) == len(new)
    open(path, "wb").write(raw.replace(old, new))


def test_damaged_header_of_the_same_size_without_verify(ours):
    path = os.path.join(ours, TASK, "rewards.npy")
    _corrupt_header(path, b"}", b" ")  # numpy's parser fell through to tokenize: tokenize.TokenError
    message = refused(ours, r"damaged \.npy header", verify=False)
    assert message.startswith(path)
    assert "checksum mismatch" in refused(ours, path)  # with verify, the checksum sees it first


def test_header_declaring_more_than_the_file_holds(ours):
    path = os.path.join(ours, TASK, "observations.npy")
    _corrupt_header(path, b"(7, 39)", b"(9, 39)")
    m = read_manifest(ours)
    m["files"][f"{TASK}/observations.npy"].update(sha256=file_sha256(path), shape=[9, 39])
    write_manifest(ours, m)
    message = refused(ours, r"the header declares shape \(9, 39\) float32 \(1404 bytes\) but the file holds 1092")
    assert message.startswith(path)


def test_object_arrays_are_never_loaded(ours):
    path = replace_array(ours, TASK, "rewards", np.array([object()] * 7))
    assert refused(ours, "holds Python objects").startswith(path)


@pytest.mark.parametrize("field, value, match", [
    ("rewards", np.full(7, 3e38, np.float32), r"rewards: value 3\.\d+e\+38 at row 0 is outside \[-1e\+06, 1e\+06\]"),
    ("observations", np.full((7, 39), -2e6), r"observations: value -2000000\.0 at row 0 is outside"),
    ("actions", np.full((7, 4), np.nan, np.float32), r"actions: non-finite value \(first at row 0\)"),
    ("rewards", np.array([0, 0, 0, np.inf, 0, 0, 0], np.float16), r"rewards: non-finite value \(first at row 3\)"),
    ("observations", np.full((7, 39), np.iinfo(np.int64).min), r"observations: value -9223372036854775808 at row 0"),
    ("observations", np.ones((7, 39), np.complex64), r"observations have dtype complex64, expected real numbers"),
    ("dones", np.array([0, 0, 1, 0, 0, 0, np.nan]), r"dones: non-finite value \(first at row 6\)"),
    ("dones", np.array(["no"] * 7), r"dones have dtype <U2, expected bool or 0/1 numbers"),
    ("success", np.array([0, 0, 2, 0, 0, 0, 1]), r"success: value 2 at row 2 is outside \{0, 1\}"),
    ("success", np.array([0, 2, 0, 0, 0, 0, 1], np.uint8).view(bool), r"success: value 2 at row 1 is outside"),
    ("episode_starts", np.array([0.0, 3.5, 7.0]), r"episode_starts have shape \(3,\) dtype float64, expected"),
    ("episode_starts", np.array([0, 5, 3, 7], np.uint64), "episode starts do not split the 7 transitions"),
    ("rewards", np.float32(1.0), r"rewards have shape \(\), expected \[T\]"),
])
def test_bad_values_in_ours(ours, field, value, match):
    replace_array(ours, TASK, field, value)
    message = refused(ours, match)
    assert message.startswith(os.path.join(ours, TASK)) and field in message


def test_zero_one_numbers_are_flags(ours):
    replace_array(ours, TASK, "dones", np.array([0, 0, 1, 0, 0, 0, 1], np.float32))
    assert load_all(ours)[TASK].dones.tolist() == [0, 0, 1, 0, 0, 0, 1]


# the MTDiff layout ------------------------------------------------------------------------------------------------
def _episode(T=4, **change):
    rng = np.random.default_rng(T)
    d = {"observations": rng.normal(size=(T, 39)).astype(np.float32), "actions": rng.uniform(-1, 1, (T, 4)),
         "rewards": rng.uniform(0, 1, T), "terminals": (np.arange(T) == T - 1).astype(np.float32)}
    d.update(change)
    return d


def _mtdiff(root, episodes: dict) -> str:
    os.makedirs(root / "reach-v2", exist_ok=True)
    for name, d in episodes.items():
        np.savez(root / "reach-v2" / name, **d)
    return str(root)


def test_float_terminals_of_zero_and_one_are_read(tmp_path):
    d = load_all(_mtdiff(tmp_path, {"0.npz": _episode(), "1.npz": _episode(5)}))[TASK]
    assert d.dones.dtype == bool and d.dones.tolist() == [False] * 3 + [True] + [False] * 4 + [True]


@pytest.mark.parametrize("change, match", [
    (dict(rewards=np.float64(1.0)), r"rewards have shape \(\), expected \[T\]"),  # was TypeError
    (dict(terminals=np.float32(0.0)), r"dones have shape \(\), expected \[T\]"),  # was TypeError
    (dict(rewards=np.full(4, 3e38)), r"rewards: value 3e\+38 at row 0 is outside"),
    (dict(observations=np.ones((4, 39), np.complex128)), r"observations have dtype complex128"),
    (dict(terminals=np.array([0, np.nan, 0, 1])), r"dones: non-finite value \(first at row 1\)"),
    (dict(terminals=np.array(["a", "b", "c", "d"])), r"dones have dtype <U1"),
    (dict(success=np.array([0, 0, 0.5, 1])), r"success: value 0\.5 at row 2 is outside \{0, 1\}"),
])
def test_bad_mtdiff_episodes(tmp_path, change, match):
    root = _mtdiff(tmp_path, {"0.npz": _episode(), "1.npz": _episode(**change)})
    message = refused(root, match)
    assert message.startswith(str(tmp_path / "reach-v2" / "1.npz"))


def _npy_bytes(header_shape, data: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": data.dtype.str, "fortran_order": False,
                                             "shape": header_shape})
    return f.getvalue() + data.tobytes()


def test_npz_member_declaring_a_huge_shape_is_refused_before_allocation(tmp_path):
    folder = tmp_path / "reach-v2"
    folder.mkdir()
    good = _episode()
    with zipfile.ZipFile(folder / "0.npz", "w") as z:
        for k, v in good.items():
            shape = (5_000_000_000, 39) if k == "observations" else v.shape  # 726 GiB, MemoryError before
            z.writestr(k + ".npy", _npy_bytes(shape, np.asarray(v)))
    message = refused(tmp_path, r"observations: the header declares shape \(5000000000, 39\) float32 "
                                r"\(780000000000 bytes\) but the file holds 624")
    assert message.startswith(str(folder / "0.npz"))


def test_episode_files_over_the_size_limit(tmp_path, monkeypatch):
    root = str(tmp_path)
    (tmp_path / "reach-v2").mkdir()
    # compressed: the members declare far more bytes than the file has (what a zip bomb does)
    np.savez_compressed(tmp_path / "reach-v2" / "0.npz", **_episode(400, observations=np.zeros((400, 39))))
    raw_size = os.path.getsize(tmp_path / "reach-v2" / "0.npz")
    assert raw_size * 2 < 400 * 39 * 8
    monkeypatch.setattr(validation, "MAX_EPISODE_FILE_BYTES", raw_size * 2)
    assert refused(root, r"its arrays declare \d+ bytes, more than the").startswith(
        str(tmp_path / "reach-v2" / "0.npz"))
    monkeypatch.setattr(validation, "MAX_EPISODE_FILE_BYTES", raw_size - 1)
    with pytest.raises(hf.DatasetError, match=rf"0\.npz: {raw_size} bytes, more than the"):
        hf.load_dataset(root)


@pytest.mark.parametrize("names, match", [
    (("1.npz", "01.npz"), r"1\.npz: episode 1 is also .*01\.npz; rename one"),
    (("0.npz", "000.npz"), r"episode 0 is also"),
    (("0.npz", "\u0661.npz"), r"\u0661\.npz: episode files must be named"),  # an Arabic-Indic digit one
    (("0.npz", "-1.npz"), r"-1\.npz: episode files must be named"),
])
def test_episode_file_names_are_parsed_strictly(tmp_path, names, match):
    root = _mtdiff(tmp_path, {n: _episode() for n in names})
    with pytest.raises(hf.DatasetError, match=match) as info:
        hf.load_dataset(root)
    assert str(tmp_path / "reach-v2") in str(info.value)


def test_an_episode_file_that_is_a_folder(tmp_path):
    root = _mtdiff(tmp_path, {"0.npz": _episode()})
    (tmp_path / "reach-v2" / "1.npz").mkdir()
    with pytest.raises(hf.DatasetError, match=r"1\.npz: not a file"):
        hf.load_dataset(root)


def test_two_folders_of_one_task(tmp_path):
    root = _mtdiff(tmp_path, {"0.npz": _episode()})
    (tmp_path / "reach-v3").mkdir()
    np.savez(tmp_path / "reach-v3" / "0.npz", **_episode())
    with pytest.raises(hf.DatasetError, match=r"task 'reach-v3' is listed twice \(as 'reach-v2' and 'reach-v3'\)"):
        hf.load_dataset(root)


# Minari and any object with .episodes(task) ----------------------------------------------------------------------
@pytest.mark.parametrize("source, match", [
    ({"reach-v2": "minari:a-v0", "reach-v3": "minari:b-v0"}, r"task 'reach-v3' is listed twice"),
    ({"": "minari:a-v0"}, r"task name '' is not a non-empty string"),
    ({3: "minari:a-v0"}, r"task name 3 is not a non-empty string"),
    ({"reach": 5}, r"task 'reach' names 5, not a dataset id or folder"),
])
def test_minari_task_mappings(source, match):
    with pytest.raises(hf.DatasetError, match=match) as info:
        hf.load_dataset(source)
    assert "{task: Minari dataset} mapping" in str(info.value)


def test_sampler_checks_episodes_of_any_object(ours):
    from harmodt_fast.data import MultiTaskSampler

    data = hf.load_dataset(ours)

    class Plain:
        tasks, path = [TASK], "plain-object"

        def episodes(self, task):
            eps = [dict(e) for e in data.episodes(task)]
            eps[1]["rewards"] = np.full(len(eps[1]["rewards"]), 3e38, np.float32)
            return eps

    cfg = hf.HarmoDTConfig.from_preset("tiny", tasks=[TASK], prompt_len=0)
    with pytest.raises(hf.DatasetError, match=r"plain-object: task reach-v3: rewards: value 3\.\d+e\+38 at row 3"):
        MultiTaskSampler(Plain(), cfg)


def test_cli_prints_one_line_for_a_bad_dataset(ours, tmp_path, capsys):
    from harmodt_fast.cli import main

    m = read_manifest(ours)
    m["tasks"] = ["../outside-xyz"]
    write_manifest(ours, m)
    assert main(["train", ours, "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1",
                 "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'../outside-xyz' is not a plain name" in err and ours in err


# collection -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (dict(seed=-1), r"seed must be an integer in 0\.\., got -1"),
    (dict(seed=1.5), r"seed must be an integer"),
    (dict(episodes_per_task=2.7), r"episodes_per_task must be an integer in 1\.\., got 2\.7"),
    (dict(episode_steps=True), r"episode_steps must be an integer"),
    (dict(chunk_episodes=0), r"chunk_episodes must be an integer in 1\.\., got 0"),
    (dict(workers=-2), r"workers must be an integer in 0\.\., got -2"),
    (dict(format="minari", minari_id="no-task-v0"), r"dataset_id must contain '\{task\}'"),
])
def test_collection_arguments_are_checked_before_anything_is_written(tmp_path, change, match):
    out = tmp_path / "never"
    args = dict(tasks=[TASK], out=out, episodes_per_task=1, episode_steps=5, workers=1, progress=False,
                verbose=False)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        hf.collect(**args)
    assert not out.exists()


def test_two_collections_into_one_folder_at_once(tmp_path):
    out = tmp_path / "busy"
    with folder_lock(str(out), hf.DatasetError):
        with pytest.raises(hf.DatasetError, match=rf"{out}: in use by process {os.getpid()} on "):
            hf.collect([TASK], out, 1, episode_steps=5, workers=1, progress=False, verbose=False)
    assert not (out / collection.PARTIAL).exists()
    hf.collect([TASK], out, 1, episode_steps=5, workers=1, progress=False, verbose=False)  # free again
    assert not (out / LOCK_FILE).exists() and hf.load_dataset(out).tasks == [TASK]


_HOLDER = """
import sys, time
from harmodt_fast._io import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_folder_lock_across_processes_and_after_the_holder_dies(tmp_path):
    folder = str(tmp_path / "f")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, folder], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(hf.DatasetError, match=rf"{folder}: in use by process {holder.pid} on .*lock "
                                                  rf"{folder}/{LOCK_FILE}"):
            with folder_lock(folder, hf.DatasetError):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock
        holder.wait()
    assert "process" in open(os.path.join(folder, LOCK_FILE)).read()  # the dead holder's stale file is there
    with folder_lock(folder, hf.DatasetError):
        assert f"process {os.getpid()} on" in open(os.path.join(folder, LOCK_FILE)).read()
    assert not os.path.exists(os.path.join(folder, LOCK_FILE))
