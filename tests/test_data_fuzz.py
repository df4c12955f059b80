"""Fuzzing the dataset readers (issue 21): mutated manifests and mutated .npy/.npz bytes (header fields, shapes,
dtypes, truncation, flipped bytes) of a small valid dataset either load as finite, consistently shaped data or are
refused with a DatasetError; nothing else ever comes out. Derandomized, so a failure reproduces."""
import io
import os
import struct
import tempfile
import zipfile

import numpy as np
import pytest

import harmodt_fast as hf
from harmodt_fast.data.validation import MAX_ABS_VALUE
from test_data_validation import TASK, file_entry, read_manifest, write_manifest, write_ours

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
FUZZ = hypothesis.settings(max_examples=200, deadline=None, derandomize=True, database=None,
                           suppress_health_check=list(hypothesis.HealthCheck))
FIELDS = ("observations", "actions", "rewards", "dones", "success", "episode_starts")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["float32", "bool", "int64", "<c8", "|O", "../x", "reach-v3", "", "/"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
# header text worth putting into a .npy header: other shapes, dtypes and broken syntax
header_text = st.sampled_from(["(5000000000, 39)", "(-1, 39)", "()", "(7,)", "(0, 39)", "'<c8'", "'|O'", "'<U3'",
                               "'<f8'", "'|b1'", "'<i8'", "True", "{", "}", "'''", "\\x00", "(7, 39, 1)"])


def check_loaded(path, **kwargs) -> None:
    """Loads every task: a DatasetError, or arrays that keep the readers' promises."""
    try:
        ds = hf.load_dataset(path, **kwargs)
        data = {t: ds.arrays(t) for t in ds.tasks}
        dims = ds.dims()
    except hf.DatasetError:
        return
    for task, d in data.items():
        n = d.num_transitions
        assert d.observations.shape == (n, dims[0]) and d.actions.shape == (n, dims[1]), task
        assert d.rewards.shape == d.dones.shape == d.success.shape == (n,), task
        assert d.episode_starts.dtype == np.int64 and d.episode_starts[0] == 0 and np.all(d.episode_lengths > 0)
        for field in ("observations", "actions", "rewards"):
            values = np.asarray(getattr(d, field), np.float64)
            assert np.isfinite(values).all() and np.abs(values).max() <= MAX_ABS_VALUE, (task, field)
        for field in ("dones", "success"):
            assert set(np.unique(np.asarray(getattr(d, field), np.float64))) <= {0.0, 1.0}, (task, field)


def _manifest_paths(m):
    """(container, key) of every value in the manifest, the containers themselves included."""
    out = []

    def walk(container):
        for key in (range(len(container)) if isinstance(container, list) else list(container)):
            out.append((container, key))
            if isinstance(container[key], (dict, list)):
                walk(container[key])
    walk(m)
    return out


@FUZZ
@hypothesis.given(data=st.data())
def test_mutated_manifests(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = write_ours(os.path.join(tmp, "ds"), tasks=(TASK, "alpha"))
        m = read_manifest(root)
        m.update(quality="expert", seed=0, episode_steps=4, expert_noise=0.1,
                 collection_env_steps_per_s_per_worker=None, counts={TASK: {"episodes": 2, "transitions": 7}},
                 stats={TASK: {"episodes": 2, "transitions": 7, "mean_return": 1.5, "success_rate": 0.5}})
        for _ in range(data.draw(st.integers(1, 2))):
            paths = _manifest_paths(m)
            container, key = data.draw(st.sampled_from(paths))
            action = data.draw(st.sampled_from(["replace", "delete", "rename", "add"]))
            if action == "add":  # a field of a later version: ignored
                m[data.draw(st.sampled_from(["note", "version", "extra"]))] = data.draw(json_values)
            elif action == "replace" or isinstance(container, list):
                container[key] = data.draw(json_values)
            elif action == "delete":
                del container[key]
            else:
                container[data.draw(st.text(max_size=12))] = container.pop(key)
        write_manifest(root, m)
        check_loaded(root, verify=data.draw(st.booleans()))


def _mutate_bytes(data, raw: bytes) -> bytes:
    kind = data.draw(st.sampled_from(["flip", "value", "truncate", "header", "append", "replace"]))
    if kind == "value":  # a float32's bytes somewhere in the data (NaN, inf, huge, or a non-0/1 byte in a flag)
        start = raw.find(b"\n") + 1
        i = data.draw(st.integers(start, max(start, len(raw) - 4)))
        return raw[:i] + struct.pack("<f", data.draw(st.floats(width=32))) + raw[i + 4:]
    if kind == "flip":
        raw = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 4))):
            # mostly in the header (the first 128 bytes), sometimes in the data
            i = data.draw(st.integers(0, min(127, len(raw) - 1)) | st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "truncate":
        return raw[: data.draw(st.integers(0, len(raw) - 1))]
    if kind == "append":
        return raw + data.draw(st.binary(min_size=1, max_size=64))
    if kind == "replace":
        return data.draw(st.binary(max_size=200))
    # rewrite one field of the header's dict text, keeping or not keeping its length
    end = raw.find(b"}")
    header = raw[:end + 1] if end > 0 else raw[:128]
    for token in (b"(7, 39)", b"(7, 4)", b"(7,)", b"(3,)", b"'<f4'", b"'|b1'", b"'<i8'", b"False"):
        if token in header:
            new = data.draw(header_text).encode()
            if data.draw(st.booleans()):
                new = new[: len(token)].ljust(len(token))  # same length: the file keeps its size
            return raw.replace(token, new, 1)
    return raw


@FUZZ
@hypothesis.given(data=st.data())
def test_mutated_npy_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        root = write_ours(os.path.join(tmp, "ds"))
        field = data.draw(st.sampled_from(FIELDS))
        path = os.path.join(root, TASK, f"{field}.npy")
        with open(path, "rb") as f:
            raw = f.read()
        with open(path, "wb") as f:
            f.write(_mutate_bytes(data, raw))
        if data.draw(st.booleans()):  # make the manifest agree, so the checksum does not stop it first
            m = read_manifest(root)
            try:
                m["files"][f"{TASK}/{field}.npy"] = file_entry(path)
            except Exception:  # the header cannot be read: only the size and checksum follow
                from harmodt_fast.data.dataset import file_sha256

                m["files"][f"{TASK}/{field}.npy"].update(sha256=file_sha256(path), bytes=os.path.getsize(path))
            write_manifest(root, m)
        check_loaded(root, verify=data.draw(st.booleans()))


def _episode_npz(members: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, raw in members.items():
            z.writestr(name + ".npy", raw)
    return out.getvalue()


@FUZZ
@hypothesis.given(data=st.data())
def test_mutated_mtdiff_episodes(data):
    rng = np.random.default_rng(0)
    T = 7
    arrays = {"observations": rng.normal(size=(T, 39)).astype(np.float32),
              "actions": rng.uniform(-1, 1, (T, 4)).astype(np.float32), "rewards": rng.random(T).astype(np.float32),
              data.draw(st.sampled_from(["dones", "terminals"])): np.arange(T) == T - 1}
    members = {}
    for name, arr in arrays.items():
        f = io.BytesIO()
        np.save(f, arr)
        members[name] = f.getvalue()
    where = data.draw(st.sampled_from(["member", "archive"]))
    if where == "member":
        name = data.draw(st.sampled_from(sorted(members)))
        members[name] = _mutate_bytes(data, members[name])
        raw = _episode_npz(members)
    else:
        raw = _mutate_bytes(data, _episode_npz(members))
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "reach-v2"))
        with open(os.path.join(tmp, "reach-v2", "0.npz"), "wb") as f:
            f.write(raw)
        check_loaded(tmp)
