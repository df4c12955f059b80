"""hf.load_dataset: the MTDiff per-episode layout (fixture written here), our format, and the errors for damaged
or inconsistent files (each names the file)."""
import json
import os
import shutil

import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast.data import collection
from harmodt_fast.tasks import V2_TO_V3, to_v3


def _episode(rng, T, done_key="dones", column=False, **extra):
    d = {"observations": rng.normal(size=(T, 39)).astype(np.float32),
         "actions": rng.uniform(-1, 1, size=(T, 4)).astype(np.float32),
         "rewards": rng.uniform(0, 10, size=(T, 1) if column else T).astype(np.float32),
         done_key: np.eye(1, T, T - 1, dtype=bool).reshape((T, 1) if column else T)}
    d.update(extra)
    return d


@pytest.fixture
def mtdiff(tmp_path):
    """reach-v2: episodes 0, 1, 2, 10 (numeric order, not text order); push-v2: `terminals`, [T, 1] columns."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mtdiff"
    eps = {"reach-v2": {i: _episode(rng, T) for i, T in [(0, 5), (1, 1), (2, 9), (10, 3)]},
           "push-v2": {i: _episode(rng, T, done_key="terminals", column=True) for i, T in [(0, 4), (1, 6)]}}
    for task, files in eps.items():
        (root / task).mkdir(parents=True)
        for i, d in files.items():
            np.savez(root / task / f"{i}.npz", **d)
    (root / "notes.txt").write_text("not a task")
    return root, eps


def test_mtdiff_layout(mtdiff):
    root, eps = mtdiff
    ds = hf.load_dataset(root)
    assert ds.kind == "mtdiff" and ds.tasks == ["reach-v3", "push-v3"]  # MT50 order, not folder-name order
    got = ds.episodes("reach-v3")
    assert [len(e["rewards"]) for e in got] == [5, 1, 9, 3]
    for e, i in zip(got, [0, 1, 2, 10]):
        src = eps["reach-v2"][i]
        np.testing.assert_array_equal(e["observations"], src["observations"])
        np.testing.assert_array_equal(e["actions"], src["actions"])
        np.testing.assert_array_equal(e["rewards"], src["rewards"])
        np.testing.assert_array_equal(e["dones"], src["dones"])
        assert e["success"].dtype == bool and not e["success"].any()
    push = ds.episodes("push-v2")  # v2 names are accepted for lookups too
    assert push[1]["rewards"].shape == (6,) and push[1]["dones"].tolist() == [False] * 5 + [True]
    np.testing.assert_array_equal(push[1]["rewards"], eps["push-v2"][1]["rewards"][:, 0])
    assert ds.num_episodes("push-v3") == 2
    first = hf.load_dataset(root, max_episodes=2)
    assert [len(e["rewards"]) for e in first.episodes("reach-v3")] == [5, 1]
    assert first.fingerprint != ds.fingerprint


def test_mtdiff_fingerprint_follows_the_data(mtdiff):
    root, eps = mtdiff
    before = hf.load_dataset(root).fingerprint
    assert hf.load_dataset(root).fingerprint == before
    d = dict(eps["push-v2"][0])
    d["rewards"] = d["rewards"] + 1
    np.savez(root / "push-v2" / "0.npz", **d)
    assert hf.load_dataset(root).fingerprint != before


def _write(root, task, i, d):
    os.makedirs(root / task, exist_ok=True)
    np.savez(root / task / f"{i}.npz", **d)
    return str(root / task / f"{i}.npz")


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(observations=d["observations"][:, :38]), r"observations have shape \(6, 38\)"),
    (lambda d: d.update(actions=np.zeros((6, 3), np.float32)), r"actions have shape \(6, 3\)"),
    (lambda d: d.update(rewards=d["rewards"][:5]), "unequal lengths"),
    (lambda d: d["observations"].__setitem__((4, 7), np.nan), "observations: non-finite value .first at row 4"),
    (lambda d: d["actions"].__setitem__((2, 0), np.inf), "actions: non-finite"),
    (lambda d: d.pop("dones"), r"missing arrays \['dones/terminals'\]"),
    (lambda d: d.pop("actions"), r"missing arrays \['actions'\]"),
    (lambda d: d.update(observations=np.zeros((0, 39), np.float32), actions=np.zeros((0, 4), np.float32),
                        rewards=np.zeros(0, np.float32), dones=np.zeros(0, bool)), "empty episode"),
])
def test_mtdiff_bad_episode_names_the_file(tmp_path, change, match):
    rng = np.random.default_rng(1)
    _write(tmp_path, "reach-v2", 0, _episode(rng, 4))
    d = _episode(rng, 6)
    change(d)
    bad = _write(tmp_path, "reach-v2", 1, d)
    ds = hf.load_dataset(tmp_path)
    with pytest.raises(hf.DatasetError, match=match) as info:
        ds.episodes("reach-v3")
    assert str(info.value).startswith(bad)


def test_mtdiff_unreadable_and_misnamed_files(tmp_path):
    rng = np.random.default_rng(2)
    _write(tmp_path, "reach-v2", 0, _episode(rng, 4))
    junk = tmp_path / "reach-v2" / "1.npz"
    junk.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(hf.DatasetError, match="cannot be read") as info:
        hf.load_dataset(tmp_path).episodes("reach-v3")
    assert str(junk) in str(info.value)
    junk.unlink()
    (tmp_path / "reach-v2" / "last.npz").write_bytes(b"")
    with pytest.raises(hf.DatasetError, match=r"last\.npz: episode files must be named"):
        hf.load_dataset(tmp_path)
    (tmp_path / "reach-v2" / "last.npz").unlink()
    _write(tmp_path, "fly-v2", 0, _episode(rng, 3))  # not a Meta-World name: a task of its own, after them
    assert hf.load_dataset(tmp_path).tasks == ["reach-v3", "fly-v2"]
    with pytest.raises(hf.DatasetError, match="no such dataset folder"):
        hf.load_dataset(tmp_path / "absent")


def test_task_name_mapping():
    assert to_v3("reach-v2") == "reach-v3" and to_v3("peg-insert-side") == "peg-insert-side-v3"
    assert to_v3("button-press-topdown-wall-v1") == "button-press-topdown-wall-v3"
    assert len(V2_TO_V3) == 50 and V2_TO_V3["stick-pull-v2"] == "stick-pull-v3"
    with pytest.raises(ValueError, match="not a Meta-World MT50 task"):
        to_v3("reach-v2-goal-observable")


# our format ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "ds"
    return collection.collect(["reach-v3"], out, 2, quality="expert", seed=3, workers=1, episode_steps=15,
                              progress=False, verbose=False)


@pytest.fixture
def copy(ours, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(ours, dst)
    return dst


def test_ours_reads_memory_mapped(ours):
    ds = hf.load_dataset(ours)
    arr = ds.arrays("reach-v3")
    assert isinstance(arr.observations, np.memmap) and arr.observations.shape == (30, 39)
    assert arr.episode_starts.tolist() == [0, 15, 30]
    eps = ds.episodes("reach-v3")
    assert len(eps) == 2 and np.shares_memory(eps[1]["observations"], arr.observations)
    assert set(eps[0]) == {"observations", "actions", "rewards", "dones", "success"}
    with pytest.raises(KeyError, match="push-v3"):
        ds.episodes("push-v3")


@pytest.mark.parametrize("where", [0.05, 0.5, 0.999])
def test_ours_damage_anywhere_is_reported(copy, where):
    path = copy / "reach-v3" / "observations.npy"
    raw = bytearray(path.read_bytes())
    raw[int(where * (len(raw) - 1))] ^= 0x01
    path.write_bytes(bytes(raw))
    ds = hf.load_dataset(copy)
    with pytest.raises(hf.DatasetError, match="checksum mismatch") as info:
        ds.episodes("reach-v3")
    assert str(path) in str(info.value)
    # without verification the damage goes unseen, which is why it is on by default
    hf.load_dataset(copy, verify=False).episodes("reach-v3")


def test_ours_truncated_missing_and_inconsistent(copy):
    rew = copy / "reach-v3" / "rewards.npy"
    rew.write_bytes(rew.read_bytes()[:-4])
    with pytest.raises(hf.DatasetError, match=r"rewards\.npy: \d+ bytes, the manifest says"):
        hf.load_dataset(copy).episodes("reach-v3")
    rew.unlink()
    with pytest.raises(hf.DatasetError, match=r"rewards\.npy: missing"):
        hf.load_dataset(copy).episodes("reach-v3")


def test_ours_inconsistent_arrays_and_manifest(copy):
    # a well-formed file whose content disagrees with the others, checksum updated to match: the checks still see it
    from harmodt_fast.data.dataset import file_sha256

    starts = copy / "reach-v3" / "episode_starts.npy"
    np.save(starts, np.array([0, 20, 30], np.int64))
    np.save(copy / "reach-v3" / "actions.npy", np.zeros((29, 4), np.float32))
    m = json.loads((copy / "manifest.json").read_text())
    for rel in ("reach-v3/episode_starts.npy", "reach-v3/actions.npy"):
        m["files"][rel].update(sha256=file_sha256(copy / rel), bytes=os.path.getsize(copy / rel))
    m["files"]["reach-v3/actions.npy"]["shape"] = [29, 4]
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(hf.DatasetError, match=r"reach-v3: arrays have unequal lengths"):
        hf.load_dataset(copy).episodes("reach-v3")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(hf.DatasetError, match=r"manifest\.json: cannot be read as JSON"):
        hf.load_dataset(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(hf.DatasetError, match="not a harmodt_fast dataset manifest"):
        hf.load_dataset(copy)


def test_dataset_error_is_a_value_error():
    assert issubclass(hf.DatasetError, ValueError)
