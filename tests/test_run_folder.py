"""A run folder one process owns, logs that survive faults, no leftovers, the divergence guard, signals (issue 21's
findings 1, 2, 8 and 9 as regression tests). Child processes make the faults real: a SIGKILL, a SIGTERM, a file
size limit that cuts a log line short."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast import _io
from harmodt_fast._io import LOCK_FILE, atomic_write, read_json_lines
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.checkpoint import load_checkpoint
from harmodt_fast.cli import main
from harmodt_fast.trainer import DivergenceError, Trainer, TrainingError

TASKS = ["reach-v3", "button-press-v3"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1",
             "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(hf.__file__)),
                                                         os.environ.get("PYTHONPATH")]))}


def cfg(**kw):
    base = dict(num_tasks=3, steps=20, mask_interval=5, log_every=1, checkpoint_every=5, precision="fp32")
    return hf.HarmoDTConfig.from_preset("tiny", **{**base, **kw})


def trainer(out, **kw):
    config = cfg(**kw)
    return Trainer(config, SyntheticSampler(config, seed=config.seed), str(out), torch.device("cpu"), "synthetic")


def log_steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def wait_for(condition, child, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert child.poll() is None, child.communicate()
        assert time.time() < deadline, "the child process never got there"
        time.sleep(0.05)


# a child training on synthetic batches: "hold" runs (checkpoint every 5 steps) until killed; "full-log" gets a file
# size limit just after its step-10 checkpoint, so its next log append is cut short by the kernel (EFBIG: a full
# disk's short write, without needing one)
_TRAINER_CHILD = """
import os, resource, signal, sys
import torch
import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.trainer import Trainer, TrainingError

out, mode = sys.argv[1], sys.argv[2]
config = hf.HarmoDTConfig.from_preset("tiny", num_tasks=3, steps=100000 if mode == "hold" else 40, mask_interval=5,
                                      log_every=1, checkpoint_every=5 if mode == "hold" else 10, precision="fp32")
trainer = Trainer(config, SyntheticSampler(config, seed=0), out, torch.device("cpu"), "synthetic")
if mode == "full-log":
    save = trainer.save
    def save_then_fill():
        path = save()
        if trainer.step == 10:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            room = os.path.getsize(trainer.metrics_path) + 40
            resource.setrlimit(resource.RLIMIT_FSIZE, (room, resource.RLIM_INFINITY))
        return path
    trainer.save = save_then_fill
try:
    trainer.run(progress=False)
except TrainingError as exc:
    print(exc, flush=True)
    sys.exit(3)
"""

# a child killed while atomic_write is writing: it leaves a real temporary file
_KILLED_WRITER = """
import sys, time
from harmodt_fast._io import atomic_write
def write(f):
    f.write(b"half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
atomic_write(sys.argv[1], write)
"""


def test_a_held_run_folder_is_refused_at_once_and_a_killed_holder_does_not_block(tmp_path, capsys):
    """Finding 2: a second training into a folder in use is refused before it reads anything (the data path here
    does not even exist), by hf.train, a Trainer and the CLI, naming the folder and the holder; after a SIGKILL of
    the holder the stale lock file does not block, and the run resumes from the holder's last checkpoint."""
    out = str(tmp_path / "run")
    child = subprocess.Popen([sys.executable, "-c", _TRAINER_CHILD, out, "hold"], env=CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "checkpoint.pt")), child)
        busy = rf"{out}: in use by process {child.pid} on .*\(lock {out}/{LOCK_FILE}\)"
        with pytest.raises(TrainingError, match=busy):
            hf.train(str(tmp_path / "no-such-data"), out, preset="tiny", progress=False)
        with pytest.raises(TrainingError, match=busy):
            trainer(out, steps=100000)
        capsys.readouterr()
        assert main(["train", str(tmp_path / "no-such-data"), "--out", out, "--preset", "tiny",
                     "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "harmodt-fast train: error: " in err and f"process {child.pid}" in err
    finally:
        child.kill()  # SIGKILL: no clean-up runs
        child.wait()
    assert f"process {child.pid} on" in open(os.path.join(out, LOCK_FILE)).read()  # stale, and no obstacle
    resumed = trainer(out, steps=100000)
    start = resumed.step
    assert start >= 5 and start % 5 == 0
    assert resumed.run(stop_at=start + 2, progress=False).step == start + 2
    assert log_steps(out) == list(range(1, start + 3))  # each step once: the killed run's extra lines dropped
    assert not os.path.exists(os.path.join(out, LOCK_FILE))  # released


def test_two_trainers_in_one_process_and_release_after_run_or_failure(tmp_path):
    """The lock is per holder, not per process; a trainer releases the folder when run() returns or its
    construction fails, and a run() again takes it again."""
    first = trainer(tmp_path, steps=4)
    with pytest.raises(TrainingError, match=rf"{tmp_path}: in use by process {os.getpid()} on "):
        trainer(tmp_path, steps=4)
    first.run(stop_at=2, progress=False)
    with pytest.raises(hf.checkpoint.CheckpointError):  # another config: refused, and the folder released
        trainer(tmp_path, steps=4, lr=0.5)
    second = trainer(tmp_path, steps=4)
    assert second.step == 2 and second.run(progress=False).step == 4
    assert first.run(progress=False).step == 4  # run() takes the folder again (its own state: step 2 -> 4)


def test_temporary_files_of_killed_writers_are_removed_at_the_next_start(tmp_path):
    """Finding 8: a kill during an atomic write leaves `.tmp-*`; the next run in the folder removes it (with a
    warning), but not a temporary file a live writer is still writing, nor files of other names."""
    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out / "checkpoint.pt")], env=CHILD_ENV,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        assert _io.remove_stale_temporaries(str(out)) == []  # a live writer's temporary file is left alone
    finally:
        child.kill()
        child.wait()
    (dead,) = [p for p in out.iterdir() if p.name.startswith(_io.TEMPORARY_PREFIX)]
    assert dead.read_bytes() == b"half a checkpoint" and not (out / "checkpoint.pt").exists()
    live = out / f"{_io.TEMPORARY_PREFIX}live.json"
    (out / "notes.tmp-1").write_text("mine")
    import fcntl

    with open(live, "w") as writer:
        fcntl.flock(writer, fcntl.LOCK_SH)  # as atomic_write holds its temporary file
        with pytest.warns(UserWarning, match=rf"removed {dead}: a temporary file left by a run killed"):
            trainer(out, steps=2).run(progress=False)
    assert not dead.exists() and live.exists() and (out / "notes.tmp-1").exists()


def test_files_are_written_with_the_process_umask(tmp_path):
    """Finding 8: checkpoints, logs and atomically written files get 0666 less the umask, not mkstemp's 0600."""
    old = os.umask(0o027)
    try:
        trainer(tmp_path, steps=5).run(progress=False)
        atomic_write(str(tmp_path / "other.json"), lambda f: f.write("{}"), binary=False)
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "metrics.jsonl", "other.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o640, name


class _DiskFullAfter:
    """A file whose disk fills up after `room` bytes: the short write, then ENOSPC, as write(2) does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_during_a_checkpoint_write_names_the_file_and_keeps_the_last_one(tmp_path, monkeypatch):
    """Finding 8: torch.save's `RuntimeError [enforce fail at inline_container.cc]` on a full disk becomes a
    TrainingError naming the checkpoint and the full disk; the step-5 checkpoint stays, no temporary file is left.
    (A monkeypatched write raising ENOSPC: no small filesystem can be mounted without root.)"""
    run = trainer(tmp_path, steps=20)
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        return _DiskFullAfter(f, 4096) if run.step >= 10 else f

    monkeypatch.setattr(_io.os, "fdopen", fdopen)
    with pytest.raises(TrainingError, match=rf"checkpoint of step 10 not written: \[Errno {errno.ENOSPC}\] cannot "
                                            rf"write {tmp_path}/checkpoint.pt: .* \(the disk is full\)"):
        run.run(progress=False)
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path))["step"] == 5
    assert not [p for p in os.listdir(tmp_path) if p.startswith(_io.TEMPORARY_PREFIX)]


def test_a_log_line_cut_short_by_a_full_disk_is_dropped_on_resume(tmp_path):
    """Finding 1: the append after the step-10 checkpoint is cut short by the kernel; the run stops with an error
    naming the log; the resume drops the partial last line with a warning naming the file and line, and the log
    ends up with every step once."""
    out = str(tmp_path)
    child = subprocess.run([sys.executable, "-c", _TRAINER_CHILD, out, "full-log"], env=CHILD_ENV,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 3, child.stderr
    log = os.path.join(out, "metrics.jsonl")
    assert f"cannot append to {log}: [Errno {errno.EFBIG}]" in child.stdout
    text = open(log).read()
    lines = text.split("\n")
    assert not text.endswith("\n") and lines[-1].startswith('{"step": 11') and len(lines[-1]) == 40
    with pytest.raises(ValueError):
        json.loads(lines[-1])
    assert load_checkpoint(out)["step"] == 10
    with pytest.warns(UserWarning, match=rf"{log}, line {len(lines)}: dropped the damaged last line"):
        resumed = trainer(out, steps=40, checkpoint_every=10)
    assert resumed.run(progress=False).step == 40
    assert log_steps(out) == list(range(1, 41))
    assert all(json.loads(line) for line in open(log))


def test_a_damaged_line_before_the_last_is_refused_naming_file_and_line(tmp_path):
    """Appends never damage a line in the middle: something else changed the log, so the resume refuses to rewrite
    it (the file is left as it was)."""
    trainer(tmp_path, steps=20, checkpoint_every=10).run(stop_at=10, progress=False)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[3] = '{"step": 4, "lo\n'
    log.write_text("".join(lines))
    with pytest.raises(TrainingError, match=rf"{log}, line 4: damaged"):
        trainer(tmp_path, steps=20, checkpoint_every=10)
    assert log.read_text() == "".join(lines)
    lines[3] = "[1, 2]\n"  # valid JSON, not a log entry
    log.write_text("".join(lines))
    with pytest.raises(TrainingError, match=rf"{log}, line 4: damaged \(a JSON list"):
        read_json_lines(str(log), TrainingError)


def test_a_partial_last_line_without_a_checkpoint_starts_a_fresh_log(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "mask_u')
    with pytest.warns(UserWarning, match="line 2: dropped the damaged last line"):
        trainer(tmp_path, steps=3).run(progress=False)
    assert log_steps(tmp_path) == [1, 2, 3]


# ---- the divergence guard (finding 9) ------------------------------------------------------------------------
def _poison(run, at_step, poison):
    """Makes the losses of 0-based step `at_step` poison(losses); records the model and optimiser state then."""
    losses_fn, before = run._step_losses, {}

    def losses(batch):
        out = losses_fn(batch)
        if run.step == at_step:
            before["model"] = {k: v.clone() for k, v in run.model.state_dict().items()}
            before["adam"] = {i: {k: v.clone() for k, v in s.items()} for i, s in run.optimizer.state.items()}
            out = poison(out)
        return out

    run._step_losses = losses
    return before


def test_a_non_finite_task_loss_stops_the_step_before_the_optimiser_moves(tmp_path):
    run = trainer(tmp_path, steps=20)
    before = _poison(run, 7, lambda losses: losses * torch.tensor([1.0, float("inf"), 1.0]))
    with pytest.raises(DivergenceError, match=r"training diverged at step 8: the loss of task\(s\) task-1 is not "
                                              rf"finite; the optimiser did not take the step; the checkpoint of step "
                                              rf"5 in {tmp_path} is kept") as info:
        run.run(progress=False)
    assert info.value.step == 8 and info.value.tasks == ["task-1"]
    after = run.model.state_dict()
    assert all(torch.equal(after[k], before["model"][k]) for k in after)  # nothing moved, moments neither
    for i, state in run.optimizer.state.items():
        assert all(torch.equal(v, before["adam"][i][k]) for k, v in state.items())
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert log_steps(tmp_path) == list(range(1, 8))
    assert trainer(tmp_path, steps=20).step == 5  # the folder is free again; the run resumes from step 5


def test_where_a_step_must_not_wait_for_the_device_the_guard_reads_back_at_the_next_log(tmp_path):
    """CUDA's steps never synchronise (test_cuda_step.py), so there the guard is read back at the steps that do
    (logs, mask updates, checkpoints): the run stops there, naming the first bad step and its tasks, and the
    weights the later steps moved never reach a checkpoint. The same path forced on the CPU here."""
    run = trainer(tmp_path, steps=20, log_every=4, mask_interval=100)
    assert run._watch.before_step  # the CPU: read back in every step, as tested above
    run._watch.before_step = False
    _poison(run, 5, lambda losses: losses * torch.tensor([float("nan"), 1.0, float("inf")]))
    with pytest.raises(DivergenceError, match=r"training diverged at step 6: the loss of task\(s\) task-0, task-2 is "
                                              r"not finite; found at step 8 .*the checkpoint of step 5 .* is kept"):
        run.run(progress=False)
    assert not all(torch.isfinite(p).all() for p in run.model.parameters())  # moved in memory only
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert log_steps(tmp_path) == [1, 4]


def test_a_non_finite_gradient_with_finite_losses_is_refused(tmp_path):
    run = trainer(tmp_path, steps=20)
    weight = next(run.model.parameters())
    # sqrt(0 * w): the value 0, the gradient 0 * inf = NaN
    _poison(run, 2, lambda losses: losses + torch.sqrt(weight.sum() * 0))
    with pytest.raises(DivergenceError, match=r"step 3: the gradient norm is nan; .*no checkpoint was written") as info:
        run.run(progress=False)
    assert info.value.tasks == [] and not os.path.exists(tmp_path / "checkpoint.pt")


def test_non_finite_weights_are_never_saved(tmp_path):
    run = trainer(tmp_path, steps=20)
    run.run(stop_at=5, progress=False)
    with torch.no_grad():
        next(run.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(DivergenceError, match="step 5: the weights are not finite, so no checkpoint is written"):
        run.save()
    assert all(torch.isfinite(v).all() for v in load_checkpoint(str(tmp_path))["model"].values()
               if v.is_floating_point())


# ---- the CLI: one line, the exit status (findings 6-9) ---------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "two-tasks"
    return hf.collect(TASKS, out, episodes_per_task=2, quality="near-optimal", seed=0, workers=1, episode_steps=20,
                      progress=False, verbose=False)


def test_cli_divergence_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    task_losses = hf.HarmoDT.task_losses
    monkeypatch.setattr(hf.HarmoDT, "task_losses",
                        lambda self, batch: task_losses(self, batch) * torch.tensor([1.0, float("nan")]))
    assert main(["train", dataset, "--out", str(tmp_path), "--preset", "tiny", "--steps", "4", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("harmodt-fast train: error: training diverged at step 1: the loss of task(s) "
                          "button-press-v3 is not finite")


def _cli_child(dataset, out):
    return subprocess.Popen([sys.executable, "-m", "harmodt_fast", "train", dataset, "--out", out, "--preset", "tiny",
                             "--steps", "100000", "--no-progress", "--set", "log_every=1",
                             "--set", "checkpoint_every=100000"],
                            env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signalled_cli_child(dataset, out, signum):
    """(exit status, stderr) of a CLI training sent `signum` once it has logged a step."""
    child = _cli_child(dataset, out)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), child)
        child.send_signal(signum)
        _, stderr = child.communicate(timeout=300)
    finally:
        child.kill()
    return child.returncode, stderr


def test_sigterm_checkpoints_and_exits_as_sigterm_in_one_line(dataset, tmp_path):
    """Finding 8: SIGTERM: the checkpoint, one line, exit status 128 + 15 (it was a KeyboardInterrupt traceback)."""
    out = str(tmp_path)
    returncode, stderr = _signalled_cli_child(dataset, out, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = [l for l in stderr.splitlines() if "harmodt-fast" in l]
    step = load_checkpoint(out)["step"]
    assert line == (f"harmodt-fast train: training stopped by SIGTERM at step {step}; the checkpoint in {out} "
                    f"resumes it")
    assert step >= 1 and not os.path.exists(os.path.join(out, LOCK_FILE))


def test_sigint_keeps_its_keyboard_interrupt(dataset, tmp_path):
    """Ctrl-C as before: the checkpoint, then the KeyboardInterrupt (TrainingStopped) traceback, exit status 1."""
    out = str(tmp_path)
    returncode, stderr = _signalled_cli_child(dataset, out, signal.SIGINT)
    assert returncode == 1, stderr
    assert "Traceback" in stderr and "TrainingStopped: training stopped by SIGINT at step" in stderr
    assert load_checkpoint(out)["step"] >= 1


_FULL_FROM_THE_START = """
import os, resource, signal, sys
from harmodt_fast.run_folder import prepare
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
try:
    prepare(sys.argv[1])
except ValueError as exc:
    print(exc)
"""


def test_the_write_probe_of_a_full_disk_is_not_left_behind(tmp_path):
    """A full disk at the start: the output folder is refused, and its write probe is removed (it was left)."""
    child = subprocess.run([sys.executable, "-c", _FULL_FROM_THE_START, str(tmp_path)], env=CHILD_ENV,
                           capture_output=True, text=True, timeout=300)
    assert f"cannot write to the output folder {tmp_path}: [Errno {errno.EFBIG}]" in child.stdout, child.stderr
    assert os.listdir(tmp_path) == []
