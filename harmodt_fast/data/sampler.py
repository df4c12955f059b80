"""MultiTaskSampler: one training batch for all tasks at once, by index arithmetic on device-resident tensors.

The whole dataset is held as flat tensors on `device` (states already normalised per task, actions clipped,
returns-to-go precomputed once per episode and divided by rtg_scale). A batch is a handful of tensor ops:
random integers -> transition positions (searchsorted over the training episodes' cumulative lengths) -> one
gather of [rows, K] positions. No per-sample Python, no host round trip: with device="cuda" a training step never
waits on the host; device="cpu" runs the same code.

Sampling (as in Decision Transformer / Prompt-DT): a training row is the K steps starting at a transition drawn
uniformly from the task's training transitions (so an episode is drawn with probability proportional to its
length and a start uniformly inside it), cut at the episode's end and padded on the LEFT with zeros. Its prompt
is the last prompt_len steps of one of the task's best episodes (its prompt episodes), drawn uniformly.

Prompt episodes: when prompt_len > 0, each task's `prompt_episodes` episodes with the highest return (ties: the
lower index; default min(5, max(1, E // 10)) of E episodes). With config.prompt_source "train" (the default, as
the published code does) they are also trained on; with "held-out" they are kept out of the training segments,
for every method, so MTDT and Prompt-DT/HarmoDT train on the same transitions. The evaluation prompt of a task is
the last prompt_len steps of its best episode.

Data parallel (rank, world): every process's sampler has the same seed and draws the same GLOBAL batch
(batch_per_task rows per task), then gathers only its slice: rows [rank*b, (rank+1)*b) of each task's segment,
b = batch_per_task / world. The slice carries each task's valid steps in the whole batch (Batch.global_task_steps,
cheap: the episodes' lengths, no data), so its losses are normalised as the whole batch's would be.

State normalisation: per task, mean and standard deviation over all its transitions, the deviation floored at
`min_std` (dimensions that are constant in the data, e.g. an absent second object, stay at 0 instead of blowing
up on slightly different evaluation states).
"""
from __future__ import annotations

import numpy as np
import torch

from harmodt_fast.batch import Batch, Prompt, offsets_from_counts, rows_per_slice
from harmodt_fast.data.dataset import STEP_FIELDS, DatasetError, TaskData, common_dims
from harmodt_fast.data.validation import check_episode_starts, validate_episode_arrays

_BLOCK = 1 << 20  # rows per host->device copy while building


def returns_to_go(rewards: np.ndarray, episode_starts: np.ndarray) -> np.ndarray:
    """Undiscounted return-to-go of every transition within its episode, float64, vectorised over episodes."""
    r = np.asarray(rewards, dtype=np.float64)
    suffix = np.cumsum(r[::-1])[::-1]  # suffix[i] = sum of r[i:]
    suffix = np.concatenate([suffix, [0.0]])
    ends = np.asarray(episode_starts[1:], dtype=np.int64)
    lengths = np.diff(episode_starts)
    return suffix[:-1] - np.repeat(suffix[ends], lengths)


def _task_data(dataset, task: str) -> TaskData:
    if hasattr(dataset, "arrays"):
        return dataset.arrays(task)
    episodes = dataset.episodes(task)  # any object with the contract's .episodes(task)
    if not episodes:
        raise DatasetError(f"task {task}: no episodes")
    lengths = [len(e["rewards"]) for e in episodes]
    cat = {f: np.concatenate([np.asarray(e[f]) if f in e else np.zeros(len(e["rewards"]), bool) for e in episodes])
           for f in STEP_FIELDS}
    # the checks a loaded dataset passes, on the episodes this object gave
    where = f"{getattr(dataset, 'path', 'the dataset')}: task {task}"
    validate_episode_arrays(where, *(cat[f] for f in STEP_FIELDS))
    starts = check_episode_starts(where, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                                  len(cat["observations"]))
    return TaskData(**cat, episode_starts=starts)


def _mean_std(obs: np.ndarray, min_std: float) -> tuple[np.ndarray, np.ndarray]:
    n = len(obs)
    total = np.zeros(obs.shape[1], np.float64)
    for lo in range(0, n, _BLOCK):
        total += obs[lo : lo + _BLOCK].sum(0, dtype=np.float64)
    mean = total / n
    sq = np.zeros_like(mean)
    for lo in range(0, n, _BLOCK):
        sq += ((obs[lo : lo + _BLOCK].astype(np.float64) - mean) ** 2).sum(0)
    std = np.maximum(np.sqrt(sq / n), min_std)
    return mean, std


class MultiTaskSampler:
    def __init__(self, dataset, config, device="cpu", seed: int = 0, prompt_episodes: int | None = None,
                 min_std: float = 1e-2, *, rank: int = 0, world: int = 1):
        self.config = config
        self.device = torch.device(device)
        self.slice_rows = rows_per_slice(config.batch_per_task, world)  # before any work: a ValueError
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.rank, self.world = int(rank), int(world)
        tasks = list(config.tasks) if config.tasks is not None else list(dataset.tasks)
        missing = [t for t in tasks if t not in dataset.tasks]
        if missing:
            raise DatasetError(f"task(s) {missing} are not in the dataset {getattr(dataset, 'path', '')!s} "
                               f"(it has {list(dataset.tasks)})")
        if prompt_episodes is not None and prompt_episodes < 1:
            raise ValueError(f"prompt_episodes must be >= 1, got {prompt_episodes}")
        self.tasks = tasks
        self.seed = int(seed)
        T, K, Kp = len(tasks), config.context, config.prompt_len
        hold_out = Kp > 0 and config.prompt_source == "held-out"

        datas = [_task_data(dataset, t) for t in tasks]
        where = getattr(dataset, "path", "the dataset")
        self.state_dim, self.act_dim = S, A = common_dims(dict(zip(tasks, datas)), where)
        if (config.state_dim, config.act_dim) != (S, A):
            raise ValueError(f"the data has state dim {S} and action dim {A}; the config says "
                             f"{config.state_dim} and {config.act_dim}")
        sizes = [d.num_transitions for d in datas]
        N = int(sum(sizes))
        dev = self.device
        self._obs = torch.empty((N, S), dtype=torch.float32, device=dev)
        self._act = torch.empty((N, A), dtype=torch.float32, device=dev)
        self._rtg = torch.empty((N,), dtype=torch.float32, device=dev)
        means, stds = [], []
        train_start, train_end, train_len = [], [], []
        task_train_n = []
        p_rows = []
        self.train_episodes: dict[str, np.ndarray] = {}
        self.prompt_episodes: dict[str, np.ndarray] = {}
        self.best_return: dict[str, float] = {}  # each task's highest episode return (target_mode data-max)
        base = 0
        for t, (task, d) in enumerate(zip(tasks, datas)):
            E = d.num_episodes
            P = min(E, prompt_episodes if prompt_episodes is not None else min(5, max(1, E // 10))) if Kp else 0
            if hold_out and E < P + 1:
                raise DatasetError(f"task {task}: {E} episode(s); the sampler holds {P} out for prompts "
                                   f"(prompt_source held-out) and needs at least one more for training")
            returns = d.episode_returns()
            order = np.lexsort((np.arange(E), -returns))  # best return first, ties to the lower index
            held = order[:P]  # the prompt episodes
            train = np.setdiff1d(np.arange(E), held) if hold_out else np.arange(E)
            self.best_return[task] = float(returns[order[0]])
            self.prompt_episodes[task] = held
            self.train_episodes[task] = train

            mean, std = _mean_std(d.observations, min_std)
            means.append(mean)
            stds.append(std)
            m32 = torch.as_tensor(mean, dtype=torch.float32, device=dev)
            s32 = torch.as_tensor(std, dtype=torch.float32, device=dev)
            rtg = returns_to_go(d.rewards, d.episode_starts) / float(config.rtg_scale)
            n = d.num_transitions
            for lo in range(0, n, _BLOCK):
                hi = min(n, lo + _BLOCK)
                obs = torch.from_numpy(np.array(d.observations[lo:hi], dtype=np.float32)).to(dev)
                self._obs[base + lo : base + hi] = (obs - m32) / s32
                act = torch.from_numpy(np.array(d.actions[lo:hi], dtype=np.float32)).to(dev)
                self._act[base + lo : base + hi] = act.clamp_(-1.0, 1.0)
                self._rtg[base + lo : base + hi] = torch.from_numpy(rtg[lo:hi].astype(np.float32)).to(dev)

            starts = np.asarray(d.episode_starts, dtype=np.int64) + base
            train_start.append(starts[:-1][train])
            train_end.append(starts[1:][train])
            train_len.append(np.diff(d.episode_starts)[train])
            task_train_n.append(int(train_len[-1].sum()))
            p_rows.append((starts[:-1][held], starts[1:][held]))
            base += n

        Pmax = max([len(a) for a, _ in p_rows] + [1])
        prompt_start = np.zeros((T, Pmax), np.int64)
        prompt_end = np.ones((T, Pmax), np.int64)
        prompt_count = np.zeros(T, np.int64)
        for t, (a, b) in enumerate(p_rows):
            prompt_start[t, : len(a)], prompt_end[t, : len(b)] = a, b
            prompt_count[t] = len(a)

        as_dev = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.int64, device=dev)  # noqa: E731
        tl = np.concatenate(train_len)
        self._train_start = as_dev(np.concatenate(train_start))
        self._train_end = as_dev(np.concatenate(train_end))
        cum = np.concatenate([[0], np.cumsum(tl)])
        self._train_cum = as_dev(cum[:-1])
        self._train_cum_end = as_dev(cum[1:])
        task_n = np.array(task_train_n, np.int64)
        self._task_train_lo = as_dev(np.concatenate([[0], np.cumsum(task_n)[:-1]]))
        self._task_train_n = as_dev(task_n)
        self._prompt_start = as_dev(prompt_start)
        self._prompt_end = as_dev(prompt_end)
        self._prompt_count = as_dev(np.maximum(prompt_count, 1))
        self._has_prompts = Kp > 0
        self.state_mean = torch.as_tensor(np.stack(means), dtype=torch.float32)
        self.state_std = torch.as_tensor(np.stack(stds), dtype=torch.float32)
        self.num_transitions = N

        B, b = config.batch_per_task, self.slice_rows
        self._rows_all = torch.arange(T, device=dev).repeat_interleave(B)
        self._offsets_all = offsets_from_counts([b] * T)  # of this process's slice (the whole batch on one)
        # positions of this slice's rows among one task's B rows, and among the mixed batch's T * B rows
        self._mine_one = torch.arange(rank * b, (rank + 1) * b, device=dev)
        self._mine_all = (torch.arange(T, device=dev)[:, None] * B + self._mine_one[None, :]).reshape(-1)
        self._arange_K = torch.arange(K, device=dev)
        self._arange_Kp = torch.arange(max(Kp, 1), device=dev)
        self._gen = torch.Generator(device=dev)
        self._gen.manual_seed(self.seed)

    # sampling ----------------------------------------------------------------------------------------------------
    def _segments(self, begin, end, ep_start, arange):
        """Steps [begin, end) (end - begin <= length) right-aligned in `length` slots, zeros on the left."""
        length = arange.numel()
        pad = length - (end - begin)
        valid = arange[None, :] >= pad[:, None]
        idx = begin[:, None] + arange[None, :] - pad[:, None]
        idx = torch.where(valid, idx, begin[:, None])  # in range; zeroed below
        flat = idx.reshape(-1)
        weight = valid.reshape(-1).to(torch.float32)
        rows = idx.shape
        states = self._take(self._obs, flat, weight).view(*rows, self.state_dim)
        actions = self._take(self._act, flat, weight).view(*rows, self.act_dim)
        rtg = self._take(self._rtg[:, None], flat, weight).view(*rows, 1)
        steps = (idx - ep_start[:, None]).clamp_(max=self.config.max_ep_len - 1) * valid
        return states, actions, rtg, steps, valid

    def _take(self, table, flat, weight):
        """table[flat] * weight[:, None], gathered straight into one output. On the CPU in pieces below torch's
        parallel grain size (32768 elements): this gather moves ~1 MB, too little for threads to pay, and a
        parallel region waits for every intra-op thread, which on a busy machine means waiting for cores other
        processes hold (measured: 25-60 ms per MT50 batch with 2 threads on 2 loaded cores, 0.8 ms serial)."""
        n, width = flat.numel(), table.shape[1]
        out = torch.empty((n, width), dtype=table.dtype, device=table.device)
        step = n if table.device.type != "cpu" else max(1, 32767 // width)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            torch.index_select(table, 0, flat[lo:hi], out=out[lo:hi])
            out[lo:hi].mul_(weight[lo:hi, None])
        return out

    def _episode_of(self, g):
        """Index of the training episode holding global training transition g. On the CPU 200 queries at a time:
        searchsorted goes parallel above that (same reason as in _take)."""
        if g.device.type != "cpu" or g.numel() <= 200:
            return torch.searchsorted(self._train_cum_end, g, right=True)
        return torch.cat([torch.searchsorted(self._train_cum_end, part, right=True) for part in g.split(200)])

    def _prompt_for(self, row_task, choice) -> Prompt:
        Kp = self.config.prompt_len
        j = choice % self._prompt_count[row_task]
        ep_start = self._prompt_start[row_task, j]
        end = self._prompt_end[row_task, j]
        begin = torch.maximum(end - Kp, ep_start)
        return Prompt(*self._segments(begin, end, ep_start, self._arange_Kp[:Kp]))

    def _gather(self, row_task, r, choice=None, episode=None) -> Batch:
        """Rows for tasks `row_task` starting at training transition `r` (per task, 0..n_t-1) and, when the
        config uses prompts, prompt episode `choice` (any int64, taken modulo the task's prompt count).
        episode: the training episode of each row, when the caller has it already (_episode_of)."""
        K = self.config.context
        g = self._task_train_lo[row_task] + r
        j = self._episode_of(g) if episode is None else episode
        ep_start = self._train_start[j]
        begin = ep_start + (g - self._train_cum[j])
        end = torch.minimum(self._train_end[j], begin + K)
        batch = Batch(*self._segments(begin, end, ep_start, self._arange_K), task_offsets=None)
        if self.config.use_prompt:
            batch.prompt = self._prompt_for(row_task, choice)
        return batch

    def sample(self, task: int | None = None) -> Batch:
        """batch_per_task rows for every task (rows grouped by task), or for task `task` only; with world > 1
        this process's slice of them (the same global draws on every process)."""
        T = len(self.tasks)
        if task is None:
            rows, offsets, mine = self._rows_all, self._offsets_all.clone(), self._mine_all
        else:
            if not 0 <= int(task) < T:
                raise ValueError(f"task id {task} out of range 0..{T - 1}")
            rows = torch.full((self.config.batch_per_task,), int(task), dtype=torch.int64, device=self.device)
            counts = [0] * T
            counts[int(task)] = self.slice_rows
            offsets, mine = offsets_from_counts(counts), self._mine_one
        draws = torch.randint(0, 2**62, (rows.numel(), 2), generator=self._gen, device=self.device)
        r = draws[:, 0] % self._task_train_n[rows]
        if self.world == 1:
            batch = self._gather(rows, r, draws[:, 1])
            batch.task_offsets, batch.row_tasks = offsets, rows
            return batch
        # the whole batch's valid steps per task: a row starting at training transition g of episode j has
        # min(K, steps left in j) of them
        g = self._task_train_lo[rows] + r
        j = self._episode_of(g)
        steps = torch.clamp(self._train_cum_end[j] - g, max=self.config.context).to(torch.float32)
        total = torch.zeros(T, device=self.device).index_add_(0, rows, steps)
        batch = self._gather(rows[mine], r[mine], draws[mine, 1], episode=j[mine])
        batch.task_offsets, batch.row_tasks = offsets, rows[mine]
        batch.global_task_steps, batch.num_slices = total, self.world
        return batch

    def eval_prompt(self) -> Prompt | None:
        """One prompt per task (the last prompt_len steps of its best held-out episode), [T, prompt_len, ...];
        None when prompt_len is 0."""
        if not self._has_prompts:
            return None
        rows = torch.arange(len(self.tasks), device=self.device)
        return self._prompt_for(rows, torch.zeros_like(rows))

    # state -------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"tasks": list(self.tasks), "seed": self.seed, "generator": self._gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if list(state.get("tasks", [])) != list(self.tasks):
            raise ValueError(f"sampler state is for tasks {state.get('tasks')}, this sampler has {self.tasks}")
        self._gen.set_state(state["generator"].cpu() if hasattr(state["generator"], "cpu") else state["generator"])
