"""hf.train, the train CLI and the demo on real (short) Meta-World data."""
import json
import os

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.checkpoint import load_checkpoint
from harmodt_fast.cli import main

TASKS = ["reach-v3", "button-press-v3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "two-tasks"
    return hf.collect(TASKS, out, episodes_per_task=4, quality="near-optimal", seed=0, workers=1,
                      episode_steps=60, progress=False, verbose=False)


def test_train_writes_checkpoint_history_and_resumes(dataset, tmp_path):
    res = hf.train(dataset, tmp_path, preset="tiny", steps=6, mask_interval=3, log_every=2, progress=False,
                   stop_at=4)
    assert res.step == 4 and isinstance(res.masks, hf.TaskMasks)
    assert [h["step"] for h in res.history] == [1, 2, 4] and all("loss" in h for h in res.history)
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["tasks"] == TASKS and ckpt["state_mean"].shape == (2, 39)
    assert ckpt["eval_prompts"]["states"].shape[:2] == (2, 2)
    assert ckpt["dataset_fingerprint"] == hf.load_dataset(dataset).fingerprint
    res = hf.train(dataset, tmp_path, preset="tiny", steps=6, mask_interval=3, log_every=2, progress=False)
    assert res.step == 6 and [h["step"] for h in res.history] == [1, 2, 4, 6]
    lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert any("mask_update" in l for l in lines)


def _outcome(report: dict) -> dict:
    """A report without its timings (and the source: a file for one, the trainer's run state for the other)."""
    timing = {"env_steps_per_s", "model_time_share", "model_share_of_rollout", "checkpoint"}
    return {k: v for k, v in json.loads(json.dumps(report)).items() if k not in timing and not k.endswith("_s")}


def test_evaluation_during_training_uses_the_live_model(dataset, tmp_path, monkeypatch):
    """The periodic evaluation rolls out the trainer's model and run state, not the checkpoint file: its reports
    are those of evaluating the saved checkpoint, the model is left in its mode and on its device, and training
    goes on with its own random streams: a run resumed after an evaluated step, and one that never evaluates,
    train exactly as the uninterrupted run."""
    import harmodt_fast.checkpoint as checkpoint
    import harmodt_fast.evaluation as evaluation

    real, calls = evaluation.evaluate, []

    def spy(source, **kw):
        model = kw["model"]
        before = (model.training, next(model.parameters()).device)
        report = real(source, **kw)
        calls.append((type(source).__name__, before, (model.training, next(model.parameters()).device)))
        return report

    kw = dict(preset="tiny", steps=4, mask_interval=3, eval_every=2, eval_episodes=2, eval_max_steps=6,
              eval_workers=0, progress=False, precision="fp32", device="cpu")
    again = dict(episodes=2, max_episode_steps=6, workers=0, seed=0, device="cpu")
    monkeypatch.setattr(evaluation, "evaluate", spy)
    with monkeypatch.context() as m:  # a fresh run reads no checkpoint: the evaluation must not either
        m.setattr(checkpoint, "_read_file", lambda *a: pytest.fail("the evaluation read the checkpoint file"))
        first = hf.train(dataset, tmp_path / "a", stop_at=2, **kw)
    saved = json.load(open(tmp_path / "a" / "evaluation_step2.json"))
    assert saved["checkpoint"] == first.checkpoint and saved["step"] == 2
    assert _outcome(saved) == _outcome(real(first.checkpoint, **again))
    resumed = hf.train(dataset, tmp_path / "a", **kw)
    saved = json.load(open(tmp_path / "a" / "evaluation_step4.json"))
    assert saved["step"] == 4 and _outcome(saved) == _outcome(real(resumed.checkpoint, **again))
    cpu = torch.device("cpu")
    assert calls == [("RunState", (True, cpu), (True, cpu))] * 2
    straight = hf.train(dataset, tmp_path / "b", **kw)
    losses = {h["step"]: h["loss"] for h in resumed.history}  # it also logged step 2, where it stopped
    assert len(calls) == 4 and all(h["loss"] == losses[h["step"]] for h in straight.history)
    unevaluated = hf.train(dataset, tmp_path / "c", **{**kw, "eval_every": 0})  # evaluation leaves training be
    assert len(calls) == 4 and not any(n.startswith("evaluation") for n in os.listdir(tmp_path / "c"))
    a = load_checkpoint(straight.checkpoint)["model"]
    for other in (resumed, unevaluated):
        b = load_checkpoint(other.checkpoint)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_checks_dataset_before_work(dataset, tmp_path):
    with pytest.raises(ValueError, match=r"not in the dataset"):
        hf.train(dataset, tmp_path, preset="tiny", steps=2, tasks=["reach-v3", "push-v3"])
    with pytest.raises(ValueError, match=r"dataset dims \(state 39, action 4\) do not match"):
        hf.train(dataset, tmp_path, preset="tiny", steps=2, state_dim=20)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint.pt"))


def test_cli_train_with_overrides(dataset, tmp_path, capsys):
    code = main(["train", str(dataset), "--out", str(tmp_path), "--preset", "tiny", "--steps", "3",
                 "--set", "method=prompt-dt", "--set", "lr=3e-4", "--no-progress"])
    assert code == 0
    assert "step 3" in capsys.readouterr().out
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["config"]["method"] == "prompt-dt" and ckpt["config"]["lr"] == 3e-4
    assert main(["train", str(dataset), "--out", str(tmp_path / "x"), "--set", "learning_rate=1"]) == 2
    assert "unknown config field 'learning_rate'" in capsys.readouterr().err


def test_demo_end_to_end_short(tmp_path, capsys):
    report = hf.demo.run_demo(root=str(tmp_path), tasks="reach-v3,button-press-v3", episodes_per_task=2,
                              steps=4, eval_episodes=1, workers=1, episode_steps=40)
    out = capsys.readouterr().out
    assert set(report["per_task"]) == set(TASKS)
    assert "reach-v3" in out and os.path.isfile(tmp_path / "run" / "eval_report.json")
    assert os.path.isfile(tmp_path / "run" / "loss.png")
    assert os.path.isfile(tmp_path / "run" / "success_per_task.png")


def test_bench_command_runs_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--preset", "tiny", "--tasks", "3", "--seconds", "0.01", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    whats = [r["what"] for r in result["rows"]]
    assert sum(w.startswith("linear ") for w in whats) == 4 * 3  # tiny: 64->192, 64->64, 64->256, 256->64; 3 paths
    assert "train step (mixed)" in whats and "train step (round-robin)" in whats
    masked = [r for r in result["rows"] if r["path"] == "masked (auto)"]
    assert all(r["backend"] == "cpp" for r in masked)  # the CPU fast path, not a silent fallback
    assert all(r["ms"] > 0 for r in result["rows"])


def test_random_masks_keep_their_masks_and_data_max_targets_each_tasks_best(dataset, tmp_path):
    """The mechanism ablation: random-masks trains through the same per-task masks as harmodt from the same seed,
    but never updates them. target_mode data-max conditions each task on its best return in the data."""
    kw = dict(preset="tiny", steps=6, mask_interval=2, log_every=2, progress=False, precision="fp32")
    fixed = hf.train(dataset, tmp_path / "harmodt", **kw)
    frozen = hf.train(dataset, tmp_path / "random", method="random-masks", target_mode="data-max", **kw)
    initial = hf.train(dataset, tmp_path / "initial", **{**kw, "steps": 1}).masks  # before any update
    assert frozen.masks == initial and fixed.masks != initial
    lines = [json.loads(l) for l in open(os.path.join(tmp_path / "random", "metrics.jsonl"))]
    assert lines and not any("mask_update" in l for l in lines)

    data = hf.load_dataset(dataset)
    best = {t: max(sum(float(r) for r in e["rewards"]) for e in data.episodes(t)) for t in TASKS}
    policy = hf.load_policy(frozen.checkpoint, device="cpu")
    assert policy.target_return == pytest.approx(best)
    policy.reset(TASKS)
    assert policy.current_rtg.tolist() == pytest.approx([best[t] / 1000.0 for t in TASKS], rel=1e-6)
    assert hf.load_policy(frozen.checkpoint, device="cpu", target_return=4500).target_return == 4500
    assert hf.load_policy(fixed.checkpoint, device="cpu").target_return == 4500


def test_a_checkpoint_without_prompt_source_resumes_as_held_out(dataset, tmp_path):
    """Runs from before prompt_source held their prompt episodes out: so does the config read from their files."""
    res = hf.train(dataset, tmp_path, preset="tiny", steps=2, progress=False, prompt_source="held-out")
    state = hf.checkpoint.RunState.load(res.checkpoint).to_dict()
    del state["config"]["prompt_source"]
    assert hf.checkpoint.RunState.from_dict(state).harmodt_config().prompt_source == "held-out"
