"""Evaluation: the rollout machinery counts success right (scripted-expert oracle against a plain loop), the model
path matches an independent one-episode-at-a-time reference, determinism, unseen tasks through the consensus mask,
clear errors, the CLI report and figures."""
import json
import os

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import Batch, Prompt
from harmodt_fast.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, model_from_checkpoint,
                                     prompt_from_dict, save_atomic)
from harmodt_fast.envs import make_env, scripted_policy
from harmodt_fast.evaluation import ScriptedPolicy, rollout

TASKS = ["reach-v3", "button-press-v3"]
PROMPT_FIELDS = ["states", "actions", "returns_to_go", "timesteps", "attention_mask"]


def scripted_prompt(task, config, mean, std, steps=8):
    """The last prompt_len steps of a short scripted rollout (goal variant 7), normalised like training data."""
    env, expert = make_env(task, 7), scripted_policy(task)
    obs, _ = env.reset()
    states, actions, rewards = [], [], []
    for _ in range(steps):
        a = np.clip(expert.get_action(obs), -1, 1)
        states.append(obs)
        actions.append(a)
        obs, r, *_ = env.step(a)
        rewards.append(r)
    Kp = config.prompt_len
    rtg = np.cumsum(rewards[::-1])[::-1] / config.rtg_scale
    return Prompt(
        states=((torch.tensor(np.array(states[-Kp:]), dtype=torch.float32) - mean) / std)[None],
        actions=torch.tensor(np.array(actions[-Kp:]), dtype=torch.float32)[None],
        returns_to_go=torch.tensor(rtg[-Kp:].copy(), dtype=torch.float32)[None, :, None],
        timesteps=torch.arange(steps - Kp, steps)[None],
        attention_mask=torch.ones(1, Kp, dtype=torch.bool),
    )


def make_checkpoint(path, tasks, seed=0, **overrides):
    """An untrained tiny model with random (awkward) state statistics and scripted prompts, in the trainer's format."""
    cfg = hf.HarmoDTConfig.from_preset("tiny", tasks=tasks, seed=seed, **overrides)
    torch.manual_seed(seed)
    model = hf.HarmoDT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    T = len(tasks)
    mean = 0.1 * torch.randn(T, 39, generator=g)
    std = 0.5 + 1.5 * torch.rand(T, 39, generator=g)
    prompts = None
    if cfg.use_prompt:
        rows = [scripted_prompt(t, cfg, mean[i], std[i]) for i, t in enumerate(tasks)]
        prompts = {f: torch.cat([getattr(r, f) for r in rows]) for f in PROMPT_FIELDS}
    ckpt = {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": model.state_dict(), "step": 7,
            "tasks": list(tasks), "state_mean": mean, "state_std": std, "eval_prompts": prompts,
            "dataset_fingerprint": "test"}
    return save_atomic(ckpt, str(path))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval") / "checkpoint.pt", TASKS)


def reference_returns(model, config, task_id, num_segments, mean, std, prompt, task, goal, steps, target):
    """One episode, one row, the model called on a freshly built left-padded window every step (no shared buffers,
    no batching): what the evaluator must reproduce."""
    K = config.context
    env = make_env(task, goal)
    obs, _ = env.reset()
    S, A, R, TS = [], [], [], []
    rtg, total, success = target / config.rtg_scale, 0.0, False
    offsets = torch.tensor([0 if i <= task_id else 1 for i in range(num_segments + 1)])
    for t in range(steps):
        S.append((torch.tensor(obs, dtype=torch.float32) - mean) / std)
        A.append(torch.zeros(4))
        R.append(rtg)
        TS.append(min(t, config.max_ep_len - 1))
        k = min(len(S), K)
        states, actions = torch.zeros(1, K, 39), torch.zeros(1, K, 4)
        rtgs, times, mask = torch.zeros(1, K, 1), torch.zeros(1, K, dtype=torch.int64), torch.zeros(1, K, dtype=torch.bool)
        states[0, K - k:], actions[0, K - k:] = torch.stack(S[-k:]), torch.stack(A[-k:])
        rtgs[0, K - k:, 0], times[0, K - k:], mask[0, K - k:] = torch.tensor(R[-k:]), torch.tensor(TS[-k:]), True
        with torch.no_grad():
            a = model(Batch(states, actions, rtgs, times, mask, task_offsets=offsets, prompt=prompt))[0, -1]
        A[-1] = a
        obs, r, _, _, info = env.step(np.clip(a.numpy().astype(np.float64), -1, 1))
        total += r
        success |= bool(info["success"])
        rtg -= r / config.rtg_scale
    return total, success


def test_scripted_oracle_counts_success_like_a_plain_loop():
    """The rollout machinery (worker processes, batched policy calls) driven by Meta-World's scripted experts:
    >= 80% success on reach and button-press, and per-episode success and return identical to a plain loop."""
    steps, episodes = 100, 10
    stats = rollout(TASKS, episodes, ScriptedPolicy(TASKS), max_episode_steps=steps, workers=2)
    assert stats["env_steps"] == len(TASKS) * episodes * steps
    assert stats["model_calls"] == steps  # one policy call per step for all 20 episodes
    assert stats["max_rows_per_call"] == len(TASKS) * episodes
    for i, task in enumerate(TASKS):
        assert stats["success"][i].mean() >= 0.8, (task, stats["success"][i])
        expert = scripted_policy(task)
        for goal in range(episodes):
            env = make_env(task, goal)
            obs, _ = env.reset()
            total, success = 0.0, False
            for _ in range(steps):
                # the vector env's action space is float32: round the expert's action the same way
                action = np.clip(expert.get_action(obs), -1, 1).astype(np.float32).astype(np.float64)
                obs, r, _, _, info = env.step(action)
                total += r
                success |= bool(info["success"])
            assert stats["success"][i, goal] == success, (task, goal)
            assert stats["returns"][i, goal] == pytest.approx(total, rel=1e-9), (task, goal)
            assert stats["lengths"][i, goal] == steps


def test_tiny_model_end_to_end_matches_reference(tiny_ckpt):
    steps = 13  # tiny context K=5: the 2K window buffer wraps twice
    report = hf.evaluate(tiny_ckpt, episodes=2, max_episode_steps=steps, workers=1, precision="fp32")
    assert report["tasks"] == TASKS and report["episodes"] == 2 and report["step"] == 7
    assert report["env_steps"] == len(TASKS) * 2 * steps
    assert report["model_calls"] == steps and report["max_rows_per_call"] == 4
    assert report["precision"] == "fp32" and report["device"] == "cpu"
    assert report["masked_linear_backend"] == hf.ops.last_backend("masked_linear")
    assert report["masked_linear_backend"] in hf.ops.available_backends()
    assert 0 < report["model_time_share"] < 1 and report["env_steps_per_s"] > 0
    json.dumps(report)  # JSON-able as it is

    ckpt = load_checkpoint(tiny_ckpt)
    model, cfg = model_from_checkpoint(ckpt)
    prompts = prompt_from_dict(ckpt["eval_prompts"])
    for t, task in enumerate(TASKS):
        r = report["per_task"][task]
        assert r["lengths"] == [steps, steps] and r["seen"]
        assert r["success_rate"] == pytest.approx(np.mean(r["successes"]))
        assert r["mean_return"] == pytest.approx(np.mean(r["returns"]))
        prompt = Prompt(**{f: getattr(prompts, f)[t : t + 1] for f in PROMPT_FIELDS})
        for goal in range(2):
            total, success = reference_returns(model, cfg, t, len(TASKS), ckpt["state_mean"][t], ckpt["state_std"][t],
                                               prompt, task, goal, steps, cfg.target_return)
            assert r["returns"][goal] == pytest.approx(total, rel=1e-4, abs=1e-4), (task, goal)
            assert r["successes"][goal] == int(success)


def test_deterministic_for_a_seed(tiny_ckpt):
    kw = dict(episodes=2, max_episode_steps=8, seed=0, precision="fp32")
    a = hf.evaluate(tiny_ckpt, workers=2, **kw)
    b = hf.evaluate(tiny_ckpt, workers=2, **kw)
    assert a["per_task"] == b["per_task"]
    # in-process environments, episodes in two waves of one per task: the same episodes, the same outcomes
    c = hf.evaluate(tiny_ckpt, workers=0, max_envs=len(TASKS), **kw)
    assert c["waves"] == 2 and c["max_rows_per_call"] == len(TASKS)
    for task in TASKS:
        assert c["per_task"][task]["successes"] == a["per_task"][task]["successes"]
        np.testing.assert_allclose(c["per_task"][task]["returns"], a["per_task"][task]["returns"], rtol=1e-5)


def test_mismatched_tasks_are_a_clear_error(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"door-open-v3.*not in the checkpoint's task list"):
        hf.evaluate(tiny_ckpt, tasks=["reach-v3", "door-open-v3"], episodes=1, max_episode_steps=2, workers=0)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        hf.evaluate(tiny_ckpt, tasks=["reach-v9"], episodes=1, workers=0)
    ckpt = load_checkpoint(tiny_ckpt)
    ckpt["tasks"] = ["reach-v3", "button-press-v3", "door-open-v3"]  # a task list that is not the model's
    bad = save_atomic(ckpt, str(tmp_path / "bad.pt"))
    with pytest.raises(CheckpointError, match=r"bad\.pt.*num_tasks is 2 but the task list has 3"):
        hf.evaluate(bad, episodes=1, workers=0)
    with pytest.raises(ValueError, match="episodes"):
        hf.evaluate(tiny_ckpt, episodes=0, workers=0)
    with pytest.raises(ValueError, match="max_episode_steps"):
        hf.evaluate(tiny_ckpt, episodes=1, max_episode_steps=501, workers=0)


def test_unseen_task_uses_the_consensus_mask(tiny_ckpt):
    steps, unseen = 7, "door-open-v3"
    report = hf.evaluate(tiny_ckpt, tasks=["button-press-v3", unseen], episodes=1, max_episode_steps=steps,
                         workers=0, unseen=True, merge_threshold=2, precision="fp32")
    assert report["unseen_tasks"] == [unseen] and report["merge_threshold"] == 2
    assert not report["per_task"][unseen]["seen"] and report["per_task"]["button-press-v3"]["seen"]
    assert report["env_steps"] == 2 * steps

    # reference: a model whose only mask is the consensus (weights kept by both tasks), computed independently
    ckpt = load_checkpoint(tiny_ckpt)
    model, cfg = model_from_checkpoint(ckpt)
    masks = model.task_masks()
    both = {n: (masks.to_dense(n, 0) & masks.to_dense(n, 1))[None] for n in masks.names}
    model.set_masks(hf.TaskMasks.from_dense(both))
    mean, std = ckpt["state_mean"].mean(0), ckpt["state_std"].mean(0)
    from harmodt_fast.policy import demo_prompt

    prompt = demo_prompt(unseen, cfg, mean, std)
    assert prompt.states.shape == (1, cfg.prompt_len, 39) and bool(prompt.attention_mask.all())
    total, success = reference_returns(model, cfg, 0, 1, mean, std, prompt, unseen, 0, steps, cfg.target_return)
    assert report["per_task"][unseen]["returns"][0] == pytest.approx(total, rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="merge threshold"):
        hf.evaluate(tiny_ckpt, tasks=[unseen], episodes=1, max_episode_steps=2, workers=0, unseen=True,
                    merge_threshold=3)


def test_cli_writes_report_and_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from harmodt_fast.cli import main

    run = tmp_path / "run"
    path = make_checkpoint(run / "checkpoint.pt", TASKS, seed=3)
    ckpt = load_checkpoint(path)
    ckpt["task_agreement"] = torch.tensor([[1.0, -0.25], [-0.25, 1.0]], dtype=torch.float64)
    save_atomic(ckpt, path)
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 5, "loss": 0.5}) + "\n")
        for step, rate in ((10, 0.0), (20, 0.5)):
            f.write(json.dumps({"step": step, "eval": {"mean_success": rate}}) + "\n")
    out = tmp_path / "report.json"
    rc = main(["evaluate", str(run), "--episodes", "1", "--max-steps", "3", "--workers", "0", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "reach-v3" in text and "button-press-v3" in text and "mean over 2 tasks" in text
    report = json.loads(out.read_text())
    assert set(report["per_task"]) == set(TASKS) and report["env_steps"] == 6
    from harmodt_fast.plots import read_eval_log

    assert read_eval_log(str(run / "metrics.jsonl")) == [(10, 0.0), (20, 0.5)]
    for name in ("success_per_task", "success_vs_step", "mask_overlap", "task_agreement"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert main(["evaluate", str(run), "--tasks", "door-open-v3", "--workers", "0", "--no-plots"]) == 2
    assert "not in the checkpoint's task list" in capsys.readouterr().err
