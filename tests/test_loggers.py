"""config.logger: names checked, W&B offline runs (the real wandb package) hold the run config and every logged
number of metrics.jsonl, read back from the run's own files."""
import glob
import json
import struct
import time

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.loggers import parse_loggers, scalars
from harmodt_fast.trainer import Trainer


def cfg(**kw):
    base = dict(num_tasks=2, steps=6, mask_interval=3, log_every=2, checkpoint_every=100, precision="fp32")
    base.update(kw)
    return hf.HarmoDTConfig.from_preset("tiny", **base)


def train(config, out, stop_at=None):
    trainer = Trainer(config, SyntheticSampler(config, seed=config.seed), str(out), torch.device("cpu"), "synthetic")
    return trainer.run(stop_at=stop_at, progress=False)


def test_logger_names_are_checked():
    assert cfg(logger="wandb").logger == ("wandb",)
    assert cfg(logger=["tensorboard", "wandb"]).logger == ("tensorboard", "wandb")
    assert cfg(logger="tensorboard,wandb").logger == ("tensorboard", "wandb")
    assert cfg(logger=None).logger is None and cfg(logger=[]).logger is None
    assert cfg(tensorboard=True).logger == ("tensorboard",)  # the older boolean spelling
    with pytest.raises(ValueError, match=r"unknown logger 'mlflow'"):
        cfg(logger=["wandb", "mlflow"])
    with pytest.raises(ValueError, match=r"unknown logger 'tensorbord'"):
        parse_loggers("tensorbord")
    # a config survives its JSON form (checkpoints and exports keep it as a list)
    c = cfg(logger=["wandb"])
    assert hf.HarmoDTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def wandb_records(path):
    """The protobuf records of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks, records
    split into FULL/FIRST/MIDDLE/LAST chunks with a 7-byte header each), read directly because wandb no longer
    ships a Python reader for it."""
    data = open(path, "rb").read()
    if len(data) < 7:  # not written yet
        return []
    assert data[:4] == b":W&B", path
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:
            records.append(pending + chunk)
        else:
            raise AssertionError(f"{path}: chunk type {kind} at {pos}")
    return records


def read_offline_runs(folder):
    """(run id, config, history rows) of each W&B offline run directory under folder, oldest session first, from
    its .wandb record file (a resumed offline run is one directory per session, all with the run's id)."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(glob.glob(str(folder / "offline-run-*" / "run-*.wandb"))):
        # wandb's writer process may still be flushing after run.finish() returns: the run is whole once its exit
        # record is on disk
        deadline = time.monotonic() + 60
        while True:
            records = [wandb_internal_pb2.Record.FromString(data) for data in wandb_records(path)]
            if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        run_id, started, config, history = None, None, {}, []
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id, started = record.run.run_id, record.run.start_time.ToNanoseconds()
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        assert started, f"{path}: no run record with a start time"
        runs.append((started, run_id, config, history))
    # oldest first by the session's start (directory names are only second-resolution timestamps)
    return [run[1:] for run in sorted(runs, key=lambda run: run[0])]


def read_offline_run(root):
    """(config, history rows) of the one W&B offline run under root."""
    [(_, config, history)] = read_offline_runs(root / "wandb")
    return config, history


def offline_wandb(monkeypatch, folder):
    """W&B offline, its files (and its config and cache) under folder, as a user's WANDB_* variables set it. wandb
    reads them once a process (at its first wandb.init): teardown makes the next init read them again."""
    import wandb

    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(folder / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(folder / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def logged_scalars(out):
    """{step: {tag: number}} of the run's metrics.jsonl: what every logger must hold."""
    expected = {}
    for line in open(out / "metrics.jsonl"):
        entry = json.loads(line)
        expected.setdefault(entry["step"], {}).update(dict(scalars(entry)))
    return expected


def test_wandb_offline_run_mirrors_the_log(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    offline_wandb(monkeypatch, tmp_path)
    config = cfg(logger="wandb", seed=3)
    train(config, tmp_path)
    run_config, history = read_offline_run(tmp_path)
    for key in ("steps", "mask_interval", "seed", "method", "density"):
        value = run_config[key]
        assert (value["value"] if isinstance(value, dict) else value) == config.to_dict()[key], key

    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    expected = {}
    for entry in logged:
        expected.setdefault(entry["step"], {}).update(dict(scalars(entry)))
    assert any("mask_update/flips" in v for v in expected.values())  # the mask updates are in the log ...
    assert sorted(by_step) == sorted(expected)
    for step, values in expected.items():  # ... and every number of it is in the W&B run, at its step
        for tag, value in values.items():
            assert by_step[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)


def test_wandb_resumed_run_continues_its_run_in_the_users_wandb_dir(tmp_path, monkeypatch):
    """Stopped at step 3 and resumed: one W&B run (the id kept in the run folder) holding every logged step once,
    its files under the user's WANDB_DIR, none under the run folder."""
    pytest.importorskip("wandb")
    user_dir = tmp_path / "user-wandb"
    offline_wandb(monkeypatch, user_dir)
    out = tmp_path / "run"
    config = cfg(logger="wandb", steps=8, seed=5)
    train(config, out, stop_at=3)
    run_id = (out / "wandb_run_id").read_text().strip()
    assert [r[0] for r in read_offline_runs(user_dir / "wandb")] == [run_id]
    train(config, out)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert not (out / "wandb").exists()  # WANDB_DIR, set by the user, is where the files land

    runs = read_offline_runs(user_dir / "wandb")
    assert [r[0] for r in runs] == [run_id, run_id]  # one W&B run, one offline directory per session
    steps = [row["_step"] for _, _, history in runs for row in history]
    assert steps == sorted(set(steps)), steps  # every step once, in order across the two sessions
    expected = logged_scalars(out)
    assert min(expected) <= 3 < max(expected)  # both sessions logged
    by_step = {row["_step"]: row for _, _, history in runs for row in history}
    assert sorted(by_step) == sorted(expected)
    for step, values in expected.items():
        for tag, value in values.items():
            assert by_step[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)


def test_wandb_fresh_start_is_a_new_run_and_user_variables_win(tmp_path, monkeypatch):
    """A run folder whose log is empty (a run killed before its first checkpoint starts over) gets a new W&B run;
    WANDB_RUN_ID and WANDB_PROJECT set by the user are used, and then the folder keeps no id."""
    pytest.importorskip("wandb")
    offline_wandb(monkeypatch, tmp_path)
    out = tmp_path / "run"
    config = cfg(logger="wandb", steps=2, log_every=1, mask_interval=2)
    train(config, out)
    first = (out / "wandb_run_id").read_text().strip()
    (out / "checkpoint.pt").unlink()  # as if killed before its first checkpoint: the run and its log start over
    train(config, out)
    second = (out / "wandb_run_id").read_text().strip()
    assert second != first
    assert sorted(r[0] for r in read_offline_runs(tmp_path / "wandb")) == sorted([first, second])

    monkeypatch.setenv("WANDB_RUN_ID", "users-own-id")
    monkeypatch.setenv("WANDB_PROJECT", "users-project")
    offline_wandb(monkeypatch, tmp_path)  # read again
    other = tmp_path / "other"
    train(config, other)
    assert not (other / "wandb_run_id").exists()
    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*-users-own-id" / "run-*.wandb"))
    from wandb.proto import wandb_internal_pb2

    [run] = [r.run for r in map(wandb_internal_pb2.Record.FromString, wandb_records(path))
             if r.WhichOneof("record_type") == "run"][:1]
    assert run.run_id == "users-own-id" and run.project == "users-project"


def tensorboard_scalars(folder, tag):
    """The (step, value) events of one tag in a TensorBoard log folder, as TensorBoard reads them (purges
    included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_tensorboard_resumed_run_continues_its_log_without_duplicate_steps(tmp_path):
    """Killed after logging steps 5-6 but before checkpointing them (simulated: the step-4 checkpoint put back),
    the resumed run redoes them in the same log folder; TensorBoard shows each step once."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    config = cfg(logger="tensorboard", steps=8, log_every=1, mask_interval=3, seed=2)
    train(config, out, stop_at=4)
    saved = (out / "checkpoint.pt").read_bytes()
    train(config, out, stop_at=6)
    assert [s for s, _ in tensorboard_scalars(out / "tensorboard", "loss")] == [1, 2, 3, 4, 5, 6]
    (out / "checkpoint.pt").write_bytes(saved)
    train(config, out)
    assert len(glob.glob(str(out / "tensorboard" / "events.*"))) == 3  # one folder, one file per session
    expected = logged_scalars(out)
    for tag in ("loss", "mask_update/flips"):
        events = tensorboard_scalars(out / "tensorboard", tag)
        steps = [s for s, _ in events]
        assert steps == sorted(set(steps)), (tag, steps)  # each step once
        assert steps == sorted(s for s, values in expected.items() if tag in values), tag
        for step, value in events:
            assert value == pytest.approx(expected[step][tag], rel=1e-6), (tag, step)
