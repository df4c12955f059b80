"""Kept checkpoints (checkpoints/step_<N>/, best/) and callbacks, on real tiny runs of synthetic batches. The
periodic evaluation is replaced by a scripted one (synthetic tasks have no environment; hf.evaluate on Meta-World
is tested in test_evaluation.py and test_train_e2e.py), so which evaluation is best is known."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import harmodt_fast as hf
import harmodt_fast.evaluation as evaluation
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.callbacks import Callback, StopAtSuccess, check_callbacks
from harmodt_fast.checkpoint import load_checkpoint
from harmodt_fast.trainer import Trainer


def cfg(**kw):
    base = dict(num_tasks=3, steps=12, mask_interval=5, log_every=5, checkpoint_every=2, eval_every=3,
                keep_checkpoints=2, precision="fp32")
    base.update(kw)
    return hf.HarmoDTConfig.from_preset("tiny", **base)


def run(config, out, stop_at=None, callbacks=()):
    trainer = Trainer(config, SyntheticSampler(config, seed=config.seed), str(out), torch.device("cpu"),
                      "synthetic", callbacks=callbacks)
    return trainer.run(stop_at=stop_at, progress=False), trainer


@pytest.fixture
def scripted(monkeypatch):
    """evaluate() -> a report whose mean success is successes[step] (set by the test); records the steps."""
    successes, steps = {}, []

    def fake(state, **kw):
        steps.append(state.step)
        s = successes[state.step]
        return {"step": state.step, "mean_success": s, "per_task": {t: {"success_rate": s} for t in state.tasks}}

    monkeypatch.setattr(evaluation, "evaluate", fake)
    return successes, steps


class Snapshots(Callback):
    """The model's weights at each checkpoint (the last one written at a step)."""

    def __init__(self):
        self.weights = {}

    def on_checkpoint(self, trainer, path):
        self.weights[trainer.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_export_holds(folder, weights):
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in saved)


def test_keeps_the_last_step_exports_and_the_best_evaluation(tmp_path, scripted):
    successes, steps = scripted
    successes.update({3: 0.2, 6: 0.5, 9: 0.5, 12: 0.1})  # best: step 6 (step 9 ties: the earlier stays)
    snaps = Snapshots()
    result, trainer = run(cfg(), tmp_path, callbacks=[snaps])
    assert steps == [3, 6, 9, 12] and result.step == 12 and not result.stopped_early
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_10", "step_12"]
    assert os.path.isfile(tmp_path / "checkpoint.pt") and load_checkpoint(str(tmp_path))["step"] == 12
    best = json.load(open(tmp_path / "best" / "evaluation.json"))
    assert best["mean_success"] == max(successes.values()) and best["step"] == 6
    assert best == json.load(open(tmp_path / "evaluation_step6.json"))  # the report, copied
    assert json.load(open(tmp_path / "best" / "config.json"))["step"] == 6
    assert_export_holds(tmp_path / "best", snaps.weights[6])
    for step in (10, 12):
        assert_export_holds(tmp_path / "checkpoints" / f"step_{step}", snaps.weights[step])
    for folder in (tmp_path / "best", tmp_path / "checkpoints" / "step_10", tmp_path / "checkpoints" / "step_12",
                   tmp_path):
        policy = hf.load_policy(str(folder), device="cpu")
        assert policy.tasks == trainer.sampler.tasks and isinstance(policy, hf.Policy)
    assert not [p for p in tmp_path.rglob(".tmp-*")]  # no temporary file or folder left


def test_off_by_default_and_best_only_with_evaluation(tmp_path, scripted):
    successes, _ = scripted
    run(cfg(keep_checkpoints=0, eval_every=0), tmp_path / "plain")
    assert not os.path.exists(tmp_path / "plain" / "checkpoints") and not os.path.exists(tmp_path / "plain" / "best")
    successes.update({3: 0.0, 6: 0.0, 9: 0.0, 12: 0.0})
    run(cfg(keep_checkpoints=0), tmp_path / "evaluated")  # best/ follows evaluation, not keep_checkpoints
    assert not os.path.exists(tmp_path / "evaluated" / "checkpoints")
    assert json.load(open(tmp_path / "evaluated" / "best" / "evaluation.json"))["step"] == 3
    with pytest.raises(ValueError, match="keep_checkpoints >= 0"):
        cfg(keep_checkpoints=-1)


@pytest.mark.parametrize("later, best_step", [(0.4, 6), (0.9, 9)])
def test_a_resumed_run_keeps_its_best(tmp_path, scripted, later, best_step):
    successes, steps = scripted
    successes.update({3: 0.2, 6: 0.5})
    first, _ = run(cfg(), tmp_path, stop_at=7)
    assert first.step == 7 and json.load(open(tmp_path / "best" / "evaluation.json"))["step"] == 6
    successes.update({9: later, 12: 0.1})
    resumed, _ = run(cfg(), tmp_path)
    assert resumed.step == 12 and steps == [3, 6, 9, 12]
    best = json.load(open(tmp_path / "best" / "evaluation.json"))
    assert best["step"] == best_step and json.load(open(tmp_path / "best" / "config.json"))["step"] == best_step
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_10", "step_12"]


def test_stop_at_success_stops_at_the_first_evaluation_with_a_checkpoint(tmp_path, scripted):
    successes, steps = scripted
    successes.update({3: 0.0})
    result, trainer = run(cfg(keep_checkpoints=0), tmp_path, callbacks=[StopAtSuccess(threshold=0.0)])
    assert steps == [3] and result.step == 3 and result.stopped_early
    assert result.stop_reason.startswith("StopAtSuccess: mean success 0.000 >= 0.000 at step 3")
    assert load_checkpoint(result.checkpoint)["step"] == 3
    successes.update({6: 0.0, 9: 0.0, 12: 0.0})
    resumed, _ = run(cfg(keep_checkpoints=0), tmp_path)  # resumable: goes on to the end without the callback
    assert resumed.step == 12 and not resumed.stopped_early and resumed.stop_reason == ""
    with pytest.raises(ValueError, match="threshold"):
        StopAtSuccess(1.5)


class Recorder:
    """A plain object (no base class) with every event: records (event, step, what)."""

    def __init__(self, stop_on_log_at=None):
        self.calls, self.stop_on_log_at = [], stop_on_log_at

    def on_log(self, trainer, entry):
        self.calls.append(("on_log", trainer.step, "mask_update" if "mask_update" in entry else "loss"))
        return trainer.step == self.stop_on_log_at

    def on_mask_update(self, trainer, info):
        self.calls.append(("on_mask_update", trainer.step, info["flips"] >= 0))

    def on_checkpoint(self, trainer, path):
        self.calls.append(("on_checkpoint", trainer.step, os.path.basename(path)))

    def on_evaluation(self, trainer, report):
        self.calls.append(("on_evaluation", trainer.step, report["mean_success"]))


def test_a_callback_sees_the_events_in_order_and_may_stop(tmp_path, scripted):
    rec = Recorder()
    result, _ = run(cfg(steps=10, checkpoint_every=5, eval_every=0, keep_checkpoints=0), tmp_path / "a",
                    callbacks=[rec])
    assert rec.calls == [
        ("on_log", 1, "loss"),
        ("on_mask_update", 5, True), ("on_log", 5, "mask_update"), ("on_log", 5, "loss"),
        ("on_checkpoint", 5, "checkpoint.pt"),
        ("on_log", 10, "loss"), ("on_checkpoint", 10, "checkpoint.pt"),
        ("on_checkpoint", 10, "checkpoint.pt")]  # the periodic checkpoint, then the final one
    assert not result.stopped_early
    stopper = Recorder(stop_on_log_at=5)  # True from on_log: stops after step 5
    result, _ = run(cfg(steps=10, checkpoint_every=100, eval_every=0, keep_checkpoints=0), tmp_path / "b",
                    callbacks=[stopper, rec])
    assert result.step == 5 and result.stopped_early and load_checkpoint(result.checkpoint)["step"] == 5
    assert result.stop_reason == "Recorder.on_log returned True at step 5"
    assert stopper.calls[-1] == ("on_checkpoint", 5, "checkpoint.pt")


def test_an_object_with_no_event_is_refused(tmp_path):
    with pytest.raises(TypeError, match="a callback needs at least one of on_log.*; object has none"):
        check_callbacks([object()])
    with pytest.raises(TypeError, match="int has none"):
        run(cfg(), tmp_path, callbacks=[3])
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_a_folder_write_cut_short_is_cleaned_or_put_back(tmp_path):
    """A kill inside the folder write: its temporary folder goes; an old best/ set aside, its replacement not yet
    renamed in, comes back."""
    from harmodt_fast.callbacks import RunCheckpoints

    (tmp_path / "checkpoints" / ".tmp-step_4").mkdir(parents=True)
    (tmp_path / ".tmp-best").mkdir()
    (tmp_path / ".tmp-best-old").mkdir()
    (tmp_path / ".tmp-best-old" / "evaluation.json").write_text(json.dumps({"step": 3, "mean_success": 0.25}))
    kept = RunCheckpoints(str(tmp_path), keep=2, resumed_step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints"]
    assert os.listdir(tmp_path / "checkpoints") == [] and kept.best_success == 0.25
    assert RunCheckpoints(str(tmp_path), keep=2, resumed_step=None).best_success is None  # a fresh run: not its


class StopOnLog(Callback):
    """Asks to stop at the log of step `at` and records every call (to show rank 1 gets none)."""

    def __init__(self, at):
        self.at, self.calls = at, []

    def on_log(self, trainer, entry):
        self.calls.append(trainer.step)
        return trainer.step == self.at


def _stopping_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """hf.train as under torchrun with a callback asking to stop at step 3 (on rank 0, where callbacks run)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    callback = StopOnLog(at=3)
    try:
        result = hf.train(data, out, preset="tiny", steps=40, batch_per_task=2, mask_interval=4, log_every=1,
                          progress=False, callbacks=[callback])
        # the ranks check for stop requests every 10 steps: both stop after step 10
        assert result.step == 10 and result.stopped_early, (rank, result.step)
        if rank == 0:
            assert result.stop_reason == "StopOnLog.on_log returned True at step 3" and callback.calls[:3] == [1, 2, 3]
        else:
            assert result.stop_reason == "a callback on data-parallel rank 0" and callback.calls == []
    finally:
        dist.destroy_process_group()


def test_a_stop_request_on_rank_0_stops_every_data_parallel_rank(tmp_path):
    import socket

    data = hf.collect(["reach-v3", "button-press-v3"], tmp_path / "data", episodes_per_task=4, quality="near-optimal",
                      seed=0, workers=1, episode_steps=50, progress=False, verbose=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_stopping_worker, args=(2, port, str(data), str(tmp_path / "run")), nprocs=2)
    assert load_checkpoint(str(tmp_path / "run"))["step"] == 10
