"""MultiTaskSampler against slow per-row references: returns-to-go, left padding, normalisation, prompts, held-out
episodes, task segments, RNG state; and a sampled batch through the model."""
import copy

import numpy as np
import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.data import MultiTaskSampler, returns_to_go

# awkward episode lengths: shorter than the context (5) and the prompt (2), longer than max_ep_len (16)
LENGTHS = {"reach-v2": [7, 1, 23, 2, 5, 40, 3], "push-v3": [9, 4, 17], "drawer-open": [6] * 11 + [31]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("sampler")
    for task, lengths in LENGTHS.items():
        (root / task).mkdir()
        offset = rng.normal(size=39) * 3
        for i, T in enumerate(lengths):
            obs = (rng.normal(size=(T, 39)) * rng.uniform(0.5, 2, size=39) + offset).astype(np.float32)
            obs[:, 30] = 0.25  # a constant dimension: std floored
            np.savez(root / task / f"{i}.npz", observations=obs,
                     actions=rng.uniform(-1.3, 1.3, size=(T, 4)).astype(np.float32),  # clipped by the sampler
                     rewards=rng.uniform(0, 10, size=T).astype(np.float32),
                     dones=np.eye(1, T, T - 1, dtype=bool)[0])
    return hf.load_dataset(root)


def config(ds, **kw):
    # most tests here check the held-out split's bookkeeping; test_train_prompt_source covers the default
    kw = {"tasks": ds.tasks, "max_ep_len": 16, "batch_per_task": 6, "dropout": 0.0, "prompt_source": "held-out", **kw}
    return hf.HarmoDTConfig.from_preset("tiny", **kw)


def slow_rtg(rewards, i):
    total = 0.0
    for r in rewards[i:]:
        total += float(r)
    return total


def norm_stats(ds, task):
    obs = np.concatenate([e["observations"] for e in ds.episodes(task)]).astype(np.float64)
    return obs.mean(0), np.maximum(obs.std(0), 1e-2)


def reference_segment(ep, begin, length, mean, std, cfg, scale):
    """The row a slow per-sample loop builds: steps begin..begin+length-1 of `ep`, cut at its end, left-padded."""
    T = len(ep["rewards"])
    steps = list(range(begin, min(begin + length, T)))
    pad = length - len(steps)
    states = np.zeros((length, 39))
    actions = np.zeros((length, 4))
    rtg = np.zeros((length, 1))
    timesteps = np.zeros(length, np.int64)
    mask = np.zeros(length, bool)
    for k, i in enumerate(steps):
        states[pad + k] = (ep["observations"][i] - mean) / std
        actions[pad + k] = np.clip(ep["actions"][i], -1, 1)
        rtg[pad + k, 0] = slow_rtg(ep["rewards"], i) / scale
        timesteps[pad + k] = min(i, cfg.max_ep_len - 1)
        mask[pad + k] = True
    return states, actions, rtg, timesteps, mask


def assert_row(got, ref, where):
    names = ("states", "actions", "returns_to_go", "timesteps", "attention_mask")
    for name, g, r in zip(names, got, ref):
        if name in ("timesteps", "attention_mask"):
            np.testing.assert_array_equal(g, r, err_msg=f"{where} {name}")
        else:
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"{where} {name}")


def fields(obj, i):
    return [getattr(obj, f)[i].numpy() for f in ("states", "actions", "returns_to_go", "timesteps", "attention_mask")]


def test_returns_to_go_vectorised_matches_a_loop():
    rng = np.random.default_rng(3)
    lengths = [1, 2, 37, 1, 500, 3]
    rewards = rng.normal(size=sum(lengths)) * 5
    starts = np.concatenate([[0], np.cumsum(lengths)])
    got = returns_to_go(rewards, starts)
    for e in range(len(lengths)):
        ep = rewards[starts[e] : starts[e + 1]]
        for i in range(len(ep)):
            assert got[starts[e] + i] == pytest.approx(slow_rtg(ep, i), rel=1e-12, abs=1e-9)


def test_held_out_prompt_episodes_are_the_best(data):
    s = MultiTaskSampler(data, config(data), prompt_episodes=2)
    for task in data.tasks:
        returns = [sum(float(r) for r in e["rewards"]) for e in data.episodes(task)]
        best = sorted(range(len(returns)), key=lambda i: (-returns[i], i))[:2]
        assert s.prompt_episodes[task].tolist() == best
        assert sorted(s.train_episodes[task].tolist()) == sorted(set(range(len(returns))) - set(best))
    default = MultiTaskSampler(data, config(data))
    assert {t: len(v) for t, v in default.prompt_episodes.items()} == {"reach-v3": 1, "push-v3": 1,
                                                                       "drawer-open-v3": 1}
    none = MultiTaskSampler(data, config(data, prompt_len=0))
    assert all(len(v) == 0 for v in none.prompt_episodes.values()) and none.eval_prompt() is None


def test_train_prompt_source(data):
    """The default (as published): prompts come from the best episodes, and every episode trains, those too."""
    s = MultiTaskSampler(data, config(data, prompt_source="train"), prompt_episodes=3)
    held = MultiTaskSampler(data, config(data), prompt_episodes=2)
    for task in data.tasks:
        returns = [sum(float(r) for r in e["rewards"]) for e in data.episodes(task)]
        assert s.train_episodes[task].tolist() == list(range(len(returns)))  # push-v3: 3 prompts of 3 episodes
        assert s.prompt_episodes[task].tolist() == sorted(range(len(returns)), key=lambda i: (-returns[i], i))[:3]
        assert s.best_return[task] == pytest.approx(max(returns)) == held.best_return[task]
    assert s.num_transitions == held.num_transitions
    torch.testing.assert_close(s.eval_prompt().states, held.eval_prompt().states)  # the best episode's tail
    assert s.sample().prompt is not None


def test_rows_match_the_slow_reference_at_every_position(data):
    """Every training transition of every task as a row start (all padding cases), against the reference."""
    cfg = config(data, context=5, prompt_len=3)
    s = MultiTaskSampler(data, cfg, prompt_episodes=2)
    K, scale = cfg.context, cfg.rtg_scale
    torch.testing.assert_close(s.state_mean, torch.tensor(np.stack([norm_stats(data, t)[0] for t in s.tasks]),
                                                          dtype=torch.float32))
    for t, task in enumerate(s.tasks):
        eps = data.episodes(task)
        mean, std = norm_stats(data, task)
        torch.testing.assert_close(s.state_std[t], torch.tensor(std, dtype=torch.float32))
        starts = [(e, i) for e in sorted(s.train_episodes[task]) for i in range(len(eps[e]["rewards"]))]
        rows = torch.full((len(starts),), t)
        choice = torch.arange(len(starts))
        batch = s._gather(rows, torch.arange(len(starts)), choice)
        for n, (e, i) in enumerate(starts):
            assert_row(fields(batch, n), reference_segment(eps[e], i, K, mean, std, cfg, scale), f"{task} ep {e} @{i}")
            pe = s.prompt_episodes[task][n % 2]
            T = len(eps[pe]["rewards"])
            ref = reference_segment(eps[pe], max(0, T - cfg.prompt_len), cfg.prompt_len, mean, std, cfg, scale)
            assert_row(fields(batch.prompt, n), ref, f"{task} prompt ep {pe}")


def test_sample_rows_come_from_training_episodes_of_their_task(data):
    cfg = config(data, context=6, batch_per_task=40)
    s = MultiTaskSampler(data, cfg, seed=5, prompt_episodes=2)
    b = s.sample()
    T = len(s.tasks)
    assert b.task_offsets.tolist() == [40 * t for t in range(T + 1)] and b.task_offsets.device.type == "cpu"
    assert b.states.shape == (40 * T, 6, 39) and b.returns_to_go.shape == (40 * T, 6, 1)
    assert b.timesteps.dtype == torch.int64 and b.attention_mask.dtype == torch.bool
    assert b.prompt.states.shape == (40 * T, cfg.prompt_len, 39)
    used = {task: set() for task in s.tasks}
    for row in range(b.num_rows):
        t = int(b.task_ids[row])
        task = s.tasks[t]
        mask = b.attention_mask[row].numpy()
        L = int(mask.sum())
        assert L >= 1 and mask.tolist() == [False] * (6 - L) + [True] * L  # padding on the left
        for f in ("states", "actions", "returns_to_go", "timesteps"):
            assert not getattr(b, f)[row, : 6 - L].any(), f
        raw = b.states[row, 6 - L :].double().numpy() * s.state_std[t].double().numpy() + s.state_mean[t].double().numpy()
        matches = []
        for e, ep in enumerate(data.episodes(task)):
            obs = ep["observations"]
            for i in range(len(obs) - L + 1):
                if np.allclose(obs[i : i + L], raw, atol=1e-4) and (i + L == len(obs) or L == 6):
                    matches.append((e, i))
        assert len(matches) == 1, (task, row, matches)
        e, i = matches[0]
        assert e in s.train_episodes[task] and e not in s.prompt_episodes[task]
        used[task].add(e)
        want = np.minimum(np.arange(i, i + L), cfg.max_ep_len - 1)
        np.testing.assert_array_equal(b.timesteps[row, 6 - L :].numpy(), want)
    assert all(len(v) >= min(2, len(s.train_episodes[t])) for t, v in used.items())


def test_round_robin_task_and_eval_prompt(data):
    cfg = config(data)
    s = MultiTaskSampler(data, cfg, prompt_episodes=2)
    b = s.sample(task=2)
    assert b.task_offsets.tolist() == [0, 0, 0, cfg.batch_per_task] and b.num_rows == cfg.batch_per_task
    assert b.prompt.states.shape[0] == cfg.batch_per_task
    with pytest.raises(ValueError, match="task id 3 out of range"):
        s.sample(task=3)
    p = s.eval_prompt()
    assert p.states.shape == (3, cfg.prompt_len, 39)
    for t, task in enumerate(s.tasks):
        eps = data.episodes(task)
        best = s.prompt_episodes[task][0]
        mean, std = norm_stats(data, task)
        T = len(eps[best]["rewards"])
        ref = reference_segment(eps[best], max(0, T - cfg.prompt_len), cfg.prompt_len, mean, std, cfg, cfg.rtg_scale)
        assert_row(fields(p, t), ref, f"eval prompt {task}")
    again = MultiTaskSampler(data, cfg, seed=99, prompt_episodes=2).eval_prompt()
    torch.testing.assert_close(again.states, p.states)


def test_rng_state_round_trip_and_seeds(data):
    cfg = config(data)
    a = MultiTaskSampler(data, cfg, seed=3)
    for _ in range(3):
        a.sample()
    state = copy.deepcopy(a.state_dict())
    want = [a.sample(), a.sample(task=1)]
    b = MultiTaskSampler(data, cfg, seed=1234)
    b.load_state_dict(state)
    got = [b.sample(), b.sample(task=1)]
    for w, g in zip(want, got):
        torch.testing.assert_close(w.states, g.states)
        torch.testing.assert_close(w.prompt.timesteps, g.prompt.timesteps)
    c = MultiTaskSampler(data, cfg, seed=3)
    first = a.__class__(data, cfg, seed=3).sample()
    torch.testing.assert_close(c.sample().states, first.states)
    assert not torch.equal(MultiTaskSampler(data, cfg, seed=4).sample().states, first.states)
    with pytest.raises(ValueError, match="sampler state is for tasks"):
        MultiTaskSampler(data, config(data, tasks=["push-v3"])).load_state_dict(state)


def test_task_selection_and_errors(data):
    s = MultiTaskSampler(data, config(data, tasks=["drawer-open-v3", "reach-v3"]))
    assert s.tasks == ["drawer-open-v3", "reach-v3"]
    assert s.sample().task_offsets.tolist() == [0, 6, 12]
    with pytest.raises(hf.DatasetError, match=r"\['basketball-v3'\] are not in the dataset"):
        MultiTaskSampler(data, config(data, tasks=["reach-v3", "basketball-v3"]))
    with pytest.raises(hf.DatasetError, match="task push-v3: 3 episode"):
        MultiTaskSampler(data, config(data), prompt_episodes=3)
    with pytest.raises(ValueError, match="state dim"):
        MultiTaskSampler(data, config(data, state_dim=40))


def test_contract_only_dataset_object(data):
    """Any object with .tasks and .episodes(task) works (the loader's flat arrays are an optimisation)."""

    class Plain:
        tasks = data.tasks

        def episodes(self, task):
            return [dict(e) for e in data.episodes(task)]

    cfg = config(data)
    a, b = MultiTaskSampler(Plain(), cfg, seed=1), MultiTaskSampler(data, cfg, seed=1)
    torch.testing.assert_close(a.sample().states, b.sample().states)


def test_sampled_batch_through_the_model(data):
    cfg = config(data)
    s = MultiTaskSampler(data, cfg)
    model = hf.HarmoDT(cfg)
    batch = s.sample()
    losses = model.task_losses(batch)
    assert losses.shape == (3,) and torch.isfinite(losses).all() and torch.all(losses > 0)
    assert hf.ops.last_backend("masked_linear") in hf.ops.available_backends()
    losses.sum().backward()
    one = model.task_losses(s.sample(task=1))
    assert one[0] == 0 and one[2] == 0 and one[1] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_resident_matches_cpu(data):
    cfg = config(data, batch_per_task=64)
    cpu, gpu = MultiTaskSampler(data, cfg), MultiTaskSampler(data, cfg, device="cuda")
    assert gpu._obs.is_cuda
    rows = torch.arange(3).repeat_interleave(50)
    r = torch.randint(0, 2**40, (150,)) % cpu._task_train_n[rows]
    choice = torch.randint(0, 100, (150,))
    want = cpu._gather(rows, r, choice)
    got = gpu._gather(rows.cuda(), r.cuda(), choice.cuda())
    for f in ("states", "actions", "returns_to_go", "timesteps", "attention_mask"):
        torch.testing.assert_close(getattr(got, f).cpu(), getattr(want, f))
        torch.testing.assert_close(getattr(got.prompt, f).cpu(), getattr(want.prompt, f))
    b = gpu.sample()
    assert b.states.is_cuda and b.task_offsets.device.type == "cpu"
    state = gpu.state_dict()
    nxt = gpu.sample()
    gpu.load_state_dict(state)
    torch.testing.assert_close(gpu.sample().states, nxt.states)
