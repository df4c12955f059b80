"""Data-parallel training with real torch.distributed processes on localhost (gloo on CPU): torchrun + the CLI
against one process on the same global batch, resumes on other process counts, the slices of the global batch,
and the collectives of harmodt_fast/distributed.py."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.checkpoint import load_checkpoint
from harmodt_fast.data import MultiTaskSampler
from harmodt_fast.distributed import Distributed

TASKS = ["reach-v3", "button-press-v3"]
# a global batch of 6 rows per task splits over 1, 2 and 3 processes; dropout 0 and fp32: the runs can agree
SAME_RUN = dict(steps=8, batch_per_task=6, dropout=0.0, precision="fp32", mask_interval=2, log_every=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cwd, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "harmodt_fast", *args]
    # the processes import the same harmodt_fast this test imported (an installed copy or the source tree)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(hf.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-data") / "two-tasks"
    return hf.collect(TASKS, out, episodes_per_task=4, quality="near-optimal", seed=0,
                      workers=1, episode_steps=50, progress=False, verbose=False)


def _assert_same_model(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{what} {key}: {m}")
        else:  # the packed task masks: identical
            assert torch.equal(got[key], want[key]), f"{what}: {key} differs"


def test_torchrun_processes_match_one_process_and_resume_on_other_counts(dataset, tmp_path):
    """Steps 1-3 on 2 processes, 4-6 on 3, 7-8 on 1 (mask updates at 2, 4 and 6) give the parameters, masks and
    logged losses of one process on the same global batch, stopped and resumed at the same steps."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    want = {}
    for stop in (3, 6, 8):
        hf.train(dataset, ref, preset="tiny", stop_at=stop, progress=False, **SAME_RUN)
        want[stop] = load_checkpoint(str(ref))["model"]
    # the run streams its mask updates one task per micro-batch (a budget below one task's gradient row), its
    # shards reduce-scattered over the ranks; the reference holds the whole [T, P] buffer: the same masks
    streamed = {**SAME_RUN, "mask_update_memory_mb": 0.01}
    cli = ["train", str(dataset), "--out", str(run), "--preset", "tiny", "--steps", str(SAME_RUN["steps"]),
           "--no-progress", *[a for k, v in streamed.items() if k != "steps" for a in ("--set", f"{k}={v}")]]
    for world, stop in ((2, 3), (3, 6)):
        done = _torchrun(cli + ["--stop-at", str(stop)], cwd=tmp_path, nproc=world)
        assert done.returncode == 0, done.stderr[-3000:]
        ckpt = load_checkpoint(str(run))
        assert ckpt["step"] == stop and ckpt["world_size"] == world
        assert isinstance(ckpt["sampler"], dict)  # one sampler state: every rank draws the same global batch
        assert len(ckpt["rng"]) == world  # but every rank its own dropout stream
        # every save has checked by hash that the ranks hold the same parameters, masks and sampler state
        _assert_same_model(ckpt["model"], want[stop], f"{world} processes, step {stop}:")
    result = hf.train(dataset, run, preset="tiny", progress=False, **streamed)  # and the last steps on one
    assert result.step == 8
    ckpt = load_checkpoint(str(run))
    _assert_same_model(ckpt["model"], want[8], "1 process after 2 and 3, step 8:")
    # rank 0 logs each step once, across both resumes; the logged loss is the whole global batch's
    logged = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    expected = [json.loads(line) for line in open(ref / "metrics.jsonl") if '"loss"' in line]
    assert [e["step"] for e in logged] == list(range(1, 9))
    assert [e["loss"] for e in logged] == pytest.approx([e["loss"] for e in expected], rel=1e-4)
    assert [e["task_loss"][TASKS[1]] for e in logged] == pytest.approx(
        [e["task_loss"][TASKS[1]] for e in expected], rel=1e-4)
    masks = hf.checkpoint.model_from_checkpoint(ckpt)[0].task_masks()
    assert abs(masks.density() - 0.8) < 0.01
    updates = [json.loads(line)["mask_update"] for line in open(run / "metrics.jsonl") if "mask_update" in line]
    assert len(updates) == 3 and sum(u["flips"] for u in updates) > 0  # the masks moved, and identically
    assert [u["tasks_per_pass"] for u in updates] == [1, 1, 1]


def test_slices_of_the_global_batch_make_it_whole(dataset):
    """Each rank's slice is its share of every task's rows of the one-process batch, and the mean of the ranks'
    per-task losses is the one-process loss (each slice normalised by the whole batch's valid steps)."""
    config = hf.HarmoDTConfig.from_preset("tiny", tasks=TASKS, batch_per_task=6, dropout=0.0)
    model, data = hf.HarmoDT(config), hf.load_dataset(dataset)
    whole = MultiTaskSampler(data, config, seed=3)
    parts = [MultiTaskSampler(data, config, seed=3, rank=r, world=3) for r in range(3)]
    for task in (None, 1, None):
        batch = whole.sample(task=task)
        slices = [p.sample(task=task) for p in parts]
        offsets = [int(o) for o in batch.task_offsets]
        for t in range(len(TASKS)):
            lo, hi = offsets[t], offsets[t + 1]
            got = torch.cat([s.states[int(s.task_offsets[t]) : int(s.task_offsets[t + 1])] for s in slices])
            assert torch.equal(got, batch.states[lo:hi])
        assert all(s.num_slices == 3 and s.num_rows == batch.num_rows // 3 for s in slices)
        mean = torch.stack([model.task_losses(s) for s in slices]).mean(0)
        torch.testing.assert_close(mean, model.task_losses(batch), rtol=1e-5, atol=1e-7)
    assert all(torch.equal(p.state_dict()["generator"], whole.state_dict()["generator"]) for p in parts)


def test_world_size_not_dividing_the_batch_fails_before_work(dataset, tmp_path, monkeypatch):
    config = hf.HarmoDTConfig.from_preset("tiny", tasks=TASKS, batch_per_task=6)
    with pytest.raises(ValueError, match=r"batch_per_task \(6\).*processes \(4\)"):
        MultiTaskSampler(hf.load_dataset(dataset), config, rank=0, world=4)
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun --nproc-per-node=4 sets: refused before reading data
    with pytest.raises(ValueError, match=r"batch_per_task \(6\).*processes \(4\)"):
        hf.train(str(tmp_path / "no-such-data"), tmp_path / "out", preset="tiny", batch_per_task=6)
    assert not (tmp_path / "out").exists()


def _signalled_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """hf.train as under torchrun; rank 1 gets a SIGTERM during step 4. The masks are compared by hash after each
    mask update (steps 4 and 8), as the mask update does."""
    import torch.distributed as dist

    from harmodt_fast.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    step = Trainer._train_step

    def signalled(self):
        if self.dist.rank == 1 and self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)

    Trainer._train_step = signalled
    update = Trainer._mask_update
    checked = []

    def update_and_check(self):
        info = update(self)
        self._check_masks_in_sync()
        checked.append(self.step)
        return info

    Trainer._mask_update = update_and_check
    try:
        hf.train(data, out, preset="tiny", steps=40, batch_per_task=2, mask_interval=4, progress=False)
    except KeyboardInterrupt as exc:
        assert "at step 10" in str(exc), str(exc)
        assert checked == [4, 8]
    else:
        raise AssertionError(f"rank {rank} was not stopped")
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(dataset, tmp_path):
    """The ranks ask each other every 10 steps: a signal at step 4 on rank 1 stops both after step 10, with a
    checkpoint."""
    torch.multiprocessing.spawn(_signalled_worker, args=(2, _free_port(), str(dataset), str(tmp_path)), nprocs=2)
    assert load_checkpoint(str(tmp_path))["step"] == 10


def _collectives_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        d = Distributed(rank, world)
        # sum_: in place, every dtype kept, non-contiguous tensors too
        a, b, c = torch.full((2, 3), rank + 1.0), torch.tensor([rank, 1]), torch.ones(3, 4).t() * rank
        d.sum_([a, b, c])
        total = sum(range(world))
        assert torch.equal(a, torch.full((2, 3), float(total + world)))
        assert b.dtype == torch.int64 and b.tolist() == [total, world]
        assert torch.equal(c, torch.full((4, 3), float(total)))
        # shard_range: shards of ceil(n / world), the last ones shorter or empty
        sizes = [Distributed(r, world).shard_range(n) for n in (10, 4, 0) for r in range(world)]
        assert sizes == [(0, 4), (4, 8), (8, 10), (0, 2), (2, 4), (4, 4), (0, 0), (0, 0), (0, 0)]
        # reduce_scatter_mean: this rank's columns of the mean over the ranks
        for n in (10, 4):
            base = torch.arange(3.0 * n).view(3, n)
            lo, hi = d.shard_range(n)
            got = d.reduce_scatter_mean(base * (rank + 1))
            torch.testing.assert_close(got, base[:, lo:hi] * (world + 1) / 2)
        # all_gather_tensor: every rank's tensor in rank order
        assert [t.tolist() for t in d.all_gather_tensor(torch.tensor([rank, -rank]))] == [
            [r, -r] for r in range(world)]
        # check_same: equal data passes, a difference names the ranks, the step and the entry
        d.check_same("the same bytes", b"abc", step=5)
        d.check_same("the same tensors", {"w": torch.ones(3), "m": torch.zeros(2, dtype=torch.int32)}, step=5)
        cases = ((torch.tensor([float(rank > 0)]), "rank(s) [1, 2]"),
                 ({"w": torch.ones(3), "m": torch.tensor([rank == 2])}, "rank(s) [2] differ from rank 0 in m"))
        for data, wanted in cases:
            try:
                d.check_same("the parameters", data, step=7)
            except RuntimeError as exc:
                assert "the parameters at step 7" in str(exc) and wanted in str(exc), str(exc)
            else:
                raise AssertionError("check_same let different data through")
        # DDP's hooks act only after a forward through the wrapper: a backward of the plain module stays local
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        ddp = d.data_parallel(model, model, torch.device("cpu"))
        x = torch.full((2, 3), float(rank + 1))
        local = x.sum(0, keepdim=True)  # d(sum of outputs)/dW on this rank's rows
        mean = torch.full((1, 3), 2.0 * (world + 1) / 2)
        for through_ddp in (True, False, True):
            model.zero_grad(set_to_none=True)
            (ddp(x) if through_ddp else model(x)).sum().backward()
            torch.testing.assert_close(model.weight.grad, mean if through_ddp else local)
    finally:
        dist.destroy_process_group()


def test_collectives_on_three_processes():
    torch.multiprocessing.spawn(_collectives_worker, args=(3, _free_port()), nprocs=3, join=True)


def test_one_process_collectives_are_the_identity():
    d = Distributed()
    x = torch.arange(6.0).view(2, 3)
    d.sum_([x])
    assert d.reduce_scatter_mean(x) is x and d.shard_range(5) == (0, 5)
    assert d.all_gather_tensor(x)[0] is x and len(d.all_gather_tensor(x)) == 1
    d.check_same("anything", b"x", step=0)
