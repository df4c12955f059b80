"""Data-parallel training with real torch.distributed processes on localhost: torchrun + the CLI, gloo on CPU."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.checkpoint import CheckpointError, load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "harmodt_fast", *args]
    # the processes import the same harmodt_fast this test imported (an installed copy or the source tree)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(hf.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-data") / "two-tasks"
    return hf.collect(["reach-v3", "button-press-v3"], out, episodes_per_task=4, quality="near-optimal", seed=0,
                      workers=1, episode_steps=50, progress=False, verbose=False)


def test_torchrun_two_processes_train_stop_and_resume(dataset, tmp_path):
    run = tmp_path / "run"
    common = ["train", str(dataset), "--out", str(run), "--preset", "tiny", "--steps", "6", "--no-progress",
              "--set", "mask_interval=2", "--set", "log_every=1", "--set", "precision=fp32"]
    first = _torchrun(common + ["--stop-at", "3"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = load_checkpoint(str(run))
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    assert len(ckpt["sampler"]) == 2
    assert ckpt["sampler"][0]["seed"] != ckpt["sampler"][1]["seed"]  # each rank draws its own batches
    # every save checks that both ranks hold the same parameters and masks (a RuntimeError otherwise)
    second = _torchrun(common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    ckpt = load_checkpoint(str(run))
    assert ckpt["step"] == 6
    lines = [l for l in open(run / "metrics.jsonl") if '"loss"' in l]
    assert len(lines) == 6  # rank 0 logs each step once, across the stop and the resume
    model, _ = hf.checkpoint.model_from_checkpoint(ckpt)
    masks = model.task_masks()
    assert abs(masks.density() - 0.8) < 0.01
    assert torch.isfinite(torch.tensor([h["loss"] for h in ckpt["history"]])).all()
    # a single process may not resume a 2-process run
    with pytest.raises(CheckpointError, match="2 data-parallel process"):
        hf.train(dataset, run, preset="tiny", steps=6, mask_interval=2, log_every=1, precision="fp32",
                 progress=False)
