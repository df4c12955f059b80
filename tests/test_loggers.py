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


def train(config, out):
    trainer = Trainer(config, SyntheticSampler(config, seed=config.seed), str(out), torch.device("cpu"), "synthetic")
    return trainer.run(progress=False)


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


def read_offline_run(root):
    """(config, history rows) of the one W&B offline run under root, parsed from its .wandb record file."""
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(root / "wandb" / "offline-run-*" / "run-*.wandb"))
    # wandb's writer process may still be flushing after run.finish() returns: the run is whole once its exit
    # record is on disk
    deadline = time.monotonic() + 60
    while True:
        records = [wandb_internal_pb2.Record.FromString(data) for data in wandb_records(path)]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    config, history = {}, []
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return config, history


def test_wandb_offline_run_mirrors_the_log(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
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
