"""Step-for-step agreement with the published HarmoDT code, imported at run time from a clone the user gives:

    git clone https://github.com/charleshsc/HarmoDT /tmp/HarmoDT
    pip install "transformers==4.11.3" --no-deps && pip install sacremoses   # what its GPT-2 file imports
    python -m harmodt_fast.benchmarks.published_agreement --published /tmp/HarmoDT \
        --out benchmarks/results/published_agreement

Ours is our training loop (Trainer.run, round-robin, fp32, dropout 0); theirs its model and PromptSequenceTrainer
with main.py's AdamW and warm-up: same initial weights and masks (theirs: float masks over every parameter, ours
on the block weights and ones elsewhere), same batches; every step's losses and parameter deviation are recorded,
then one mask update runs on each side from the same state. docs/agreement.md says what the results show.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import types

import torch

from harmodt_fast import method, ops
from harmodt_fast.batch import Batch
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.data import MultiTaskSampler, collect, load_dataset
from harmodt_fast.masks import TaskMasks
from harmodt_fast.model import HarmoDT
from harmodt_fast.ops.harmony_rows import HarmonyRows
from harmodt_fast.trainer import Trainer

PARAM_TOL = 1e-5  # a tensor agrees while max |Δw| <= PARAM_TOL * max(1, max |w|): a tenth of one lr=1e-4 step
LOSS_TOL = 1e-5  # a step's losses agree while |Δloss| <= LOSS_TOL * max(1, |loss|)
TASKS = ("reach-v3", "push-v3", "pick-place-v3")
PUBLISHED_FILES = ("prompt_dt/prompt_decision_transformer.py", "prompt_dt/prompt_seq_trainer.py",
                   "prompt_dt/fl_utils.py", "prompt_dt/trajectory_gpt2.py")
# our prefix -> theirs; the block weights ending in _CONV1D are transposed (GPT-2's Conv1D stores [in, out])
_PREFIXES = [(f"{e}.{o}.", f"{e}_{t}.") for e in ("embed", "prompt_embed") for o, t in (
    ("timestep", "timestep"), ("ret", "return"), ("state", "state"), ("action", "action"))] + [
    ("embed_ln.", "embed_ln."), ("blocks.", "transformer.h."), ("ln_f.", "transformer.ln_f."),
    ("predict_action.", "predict_action.")]
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


# ---- names, layouts and masks ---------------------------------------------------------------------------------------
def published_name(name: str) -> tuple[str, bool]:
    """Our parameter name -> (the published model's name, whether its layout is our tensor transposed)."""
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):], name.startswith("blocks.") and name.endswith(_CONV1D)
    raise KeyError(f"no published counterpart for parameter {name!r}")


def _layout(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.t().contiguous() if transposed else t.clone()


def to_published_state(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameters (name -> tensor) in the published names and layouts."""
    return {published_name(n)[0]: _layout(v, published_name(n)[1]) for n, v in ours.items()}


def from_published_state(theirs: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """The published tensors of our parameters `names`, in our layout (published-only ones are left out)."""
    return {n: _layout(theirs[published_name(n)[0]], published_name(n)[1]) for n in names}


def published_masks(masks: TaskMasks, task: int, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Task `task`'s mask as the published code keeps it: float32 over every published parameter (`shapes`, in
    its order), ours on the block weights, ones elsewhere (embeddings, LayerNorms, biases, heads)."""
    ours = {published_name(n)[0]: _layout(masks.to_dense(n, task).float(), published_name(n)[1]) for n in masks.names}
    return {n: ours.get(n, torch.ones(s)) for n, s in shapes.items()}


def flat_positions(masks: TaskMasks, shapes: dict[str, tuple]) -> torch.Tensor:
    """For each entry of our flat layout (masks.flat_packed's / masked_weights_flat's, [P]), its position in the
    published flat vectors (parameters_to_vector over `shapes`, in the published parameter order)."""
    starts = dict(zip(shapes, [0] + torch.tensor([math.prod(s) for s in shapes.values()]).cumsum(0).tolist()))
    parts = []
    for name in masks.names:  # ours: row-major [out, in]; theirs row-major [in, out] when transposed
        (pub, transposed), (out_f, in_f) = published_name(name), masks.shapes[name]
        f = torch.arange(out_f * in_f)
        parts.append(starts[pub] + (f % in_f * out_f + f // in_f if transposed else f))
    return torch.cat(parts)


def published_batch(batch: Batch) -> tuple[list, list]:
    """Our batch as the published get_prompt_batch returns it: (prompt, batch) tuples, float masks, returns-to-go
    with the extra last step it drops (rtg[:, :-1]); rewards and dones, which its forward does not read, are zeros."""
    def seq(b, extra_step: int):  # copies: the published forward clamps the prompt's timesteps in place
        B, K = b.states.shape[:2]
        rtg = torch.cat([b.returns_to_go.float(), torch.zeros(B, extra_step, 1)], dim=1)
        return [b.states.float().clone(), b.actions.float().clone(), torch.zeros(B, K, 1), torch.zeros(B, K), rtg,
                b.timesteps.long().clone(), b.attention_mask.float()]
    return seq(batch.prompt, 0), seq(batch, 1)  # its flatten_prompt has dropped the prompt's extra step already


# ---- the published code ---------------------------------------------------------------------------------------------
def load_published(path: str) -> types.SimpleNamespace:
    """Imports the published model, trainer and mask functions from a clone at `path` (a clear error otherwise)."""
    path = os.path.abspath(path)
    missing = [f for f in PUBLISHED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"--published {path}: not a clone of charleshsc/HarmoDT (missing {missing}); "
                                f"get it with: git clone https://github.com/charleshsc/HarmoDT")
    try:  # its GPT-2 file imports names that transformers 4.12 changed
        import transformers
        from transformers.file_utils import add_code_sample_docstrings  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"the published GPT-2 needs transformers 4.11 ({exc}): pip install "
                          "'transformers==4.11.3' --no-deps && pip install sacremoses") from exc
    sys.path[:0] = [] if path in sys.path else [path]
    # its data/environment module (gym, old metaworld): a stand-in with the one name the trainer imports from it,
    # for its evaluation, which we never run
    stand_in = types.ModuleType("prompt_dt.prompt_utils")
    stand_in.flatten_prompt = None
    sys.modules.setdefault("prompt_dt.prompt_utils", stand_in)
    return types.SimpleNamespace(
        model=importlib.import_module("prompt_dt.prompt_decision_transformer"),
        trainer=importlib.import_module("prompt_dt.prompt_seq_trainer"),
        fl=importlib.import_module("prompt_dt.fl_utils"), commit=_git_head(path), path=path,
        transformers=transformers.__version__)


@contextlib.contextmanager
def _patched(owner, name: str, value):
    """owner.name = value inside (the published code's device calls and its hard-coded clip, see the callers)."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


def _cpu_cuda_calls():
    """The published mask functions call .cuda() on new tensors; on a machine without CUDA they stay on the CPU."""
    return contextlib.nullcontext() if torch.cuda.is_available() else _patched(torch.Tensor, "cuda",
                                                                                lambda self, *a, **k: self)


class PublishedSide:
    """The published model and trainer at our config's shape, from our model's weights and masks."""

    def __init__(self, pub, model: HarmoDT, config: HarmoDTConfig, clip_off: bool = False):
        self.pub, self.config, self.tasks, self.clip_off = pub, config, list(config.tasks), clip_off
        info = {t: {"state_dim": config.state_dim, "act_dim": config.act_dim} for t in self.tasks}
        self.model = pub.model.PromptDecisionTransformer(  # main.py's arguments, dropout 0 everywhere
            env_name_list=self.tasks, info=info, special_embedding=False, max_length=config.context,
            max_ep_len=config.max_ep_len, hidden_size=config.hidden, n_layer=config.layers, n_head=config.heads,
            n_inner=config.mlp_hidden, activation_function=config.activation, n_positions=1024,
            resid_pdrop=config.dropout, attn_pdrop=config.dropout, embd_pdrop=config.dropout)
        self.shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        self.load(model)
        self.masks = {t: published_masks(model.task_masks(), i, self.shapes) for i, t in enumerate(self.tasks)}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(  # main.py's warm-up
            self.optimizer, lambda s: min((s + 1) / max(1, config.warmup_steps), 1))
        self.trainer = pub.trainer.PromptSequenceTrainer(
            model=self.model, optimizer=self.optimizer, batch_size=config.batch_per_task, get_batch=None,
            scheduler=scheduler, loss_fn=lambda s_hat, a_hat, r_hat, s, a, r: torch.mean((a_hat - a) ** 2),
            get_prompt=lambda *a, **k: None, get_prompt_batch=self._batch, logger=None,
            variant={"eta_min": config.eta_min, "eta_max": config.eta_max, "sparsity": 1 - config.density})

    def _batch(self, batch_size=None, index=None):  # its get_prompt_batch: (prompt, batch + [task name])
        return self.batches[index][0], [*self.batches[index][1], index]

    def load(self, model: HarmoDT) -> None:
        """Our model's weights into the published model (published-only parameters keep theirs)."""
        state = self.model.state_dict()
        state.update(to_published_state({n: p.detach() for n, p in model.named_parameters()}))
        self.model.load_state_dict(state)

    def step(self, batch: Batch, task: int, step: int) -> float:
        name = self.tasks[task]
        self.batches, masks, norms = {name: published_batch(batch)}, self.masks[name], {}

        def clip(params, max_norm, *args, **kw):  # its clip (0.25, hard-coded), watched; the control turns it off
            grads = [(p.grad * masks[n]).flatten() for n, p in self.model.named_parameters() if p.grad is not None]
            norms["masked"] = float(torch.cat(grads).norm())  # the norm ours clips: inactive entries' grads are 0
            norms["published"] = float(original(params, float("inf") if self.clip_off else max_norm, *args, **kw))
            return norms["published"]
        with _patched(torch.nn.utils, "clip_grad_norm_", clip) as original:
            logs, _ = self.trainer.pure_train_iteration_mix(num_steps=1, no_prompt=False, masks=masks, env_name=name)
        self.last_norms = norms  # the step's gradient norms, as published and as ours would clip
        return float(logs["training/train_loss_mean"])

    def parameters(self, names) -> dict[str, torch.Tensor]:
        return from_published_state(dict(self.model.named_parameters()), names)

    def mask_update(self, batch: Batch, k: int) -> dict:
        """main.py's mask update (its order of calls), each task's gradient from its own rows of `batch`."""
        fl, slices = self.pub.fl, [published_batch(batch.task_slice(i, i + 1)) for i in range(len(self.tasks))]
        self.batches = dict(zip(self.tasks, slices))
        with _cpu_cuda_calls():
            grads = {t: self.trainer.update_gradient(no_prompt=False, masks=self.masks[t], env_name=t)
                     for t in self.tasks}
            first_before = grads[self.tasks[0]].clone()
            gbar = fl.get_harmo_gradient(grads)  # the sum accumulates into the first task's vector (in place)
            vectors = {t: fl.dict_to_vector(self.masks[t]) for t in self.tasks}
            weights = torch.nn.utils.parameters_to_vector(self.model.parameters())
            grow = fl.mask_dead_harmo(gbar, grads, vectors, k)
            prune = fl.mask_generate_harmo(gbar, grads, vectors, weights, gamma=self.config.gamma, change_num=k,
                                           mode=self.config.score)
        return {"grads": grads, "first_task_grad": first_before, "gbar": gbar, "prune": prune, "grow": grow}


class OursReference:
    """Our own steps outside the trainer (method.inner_step on a copy): the harness's self-check and CI's side."""

    def __init__(self, model: HarmoDT, config: HarmoDTConfig, fused: bool = True):
        self.model, self.config = copy.deepcopy(model), config
        # fused=False: the same AdamW, computed per tensor as the published one is: a rounding-level difference
        self.optimizer = method.make_optimizer(self.model, config) if fused else torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False)

    def step(self, batch: Batch, task: int, step: int) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = method.learning_rate(self.config, step - 1)
        frozen = method.frozen_entries(self.model, task, method.unused_entries(self.model))
        loss, _ = method.inner_step(self.model, self.optimizer, batch, self.config, frozen,
                                    losses_fn=self.model.task_losses, amp_dtype=None)
        return float(loss)

    def parameters(self, names) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if n in names}


# ---- the lockstep run ------------------------------------------------------------------------------------------------
def _recording(sampler):
    """The sampler, keeping the last batch it gave in sampler.last (the trainer's batch of the step)."""
    draw = sampler.sample

    def sample(task=None):
        sampler.last = draw(task=task)
        return sampler.last
    sampler.sample = sample
    return sampler


def deviation(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """max |Δ|, that over max |ours|, and whether it is within PARAM_TOL."""
    d, scale = (ours.detach().double() - theirs.double()).abs().max().item(), ours.detach().abs().max().item()
    return {"max_abs": d, "max_rel": d / max(scale, 1e-30), "within_tol": d <= PARAM_TOL * max(1.0, scale)}


class Lockstep:
    """A trainer callback: after each of our steps, the reference side takes the same step on the same batch."""

    def __init__(self, checkpoint_every: int):
        self.every, self.reference, self.sampler = checkpoint_every, None, None
        self.steps, self.checkpoints, self.first_exceed = [], [], None

    def on_log(self, trainer, entry):
        if "loss" not in entry:
            return
        step, task = entry["step"], method.step_task(trainer.config, entry["step"] - 1)
        theirs = self.reference.step(self.sampler.last, task, step)
        ref = self.reference.parameters([n for n, _ in trainer.model.named_parameters()])
        dev = {n: deviation(p, ref[n]) for n, p in trainer.model.named_parameters()}
        worst, dloss = max(dev, key=lambda n: dev[n]["max_abs"]), abs(entry["loss"] - theirs)
        self.steps.append({"step": step, "task": task, "loss_ours": entry["loss"], "loss_theirs": theirs,
                           "loss_abs_diff": dloss, "param_max_abs": dev[worst]["max_abs"], "param_worst": worst,
                           "grad_norm": getattr(self.reference, "last_norms", None)})
        bad = sorted((n for n, d in dev.items() if not d["within_tol"]), key=lambda n: -dev[n]["max_abs"])
        if self.first_exceed is None and (bad or dloss > LOSS_TOL * max(1.0, abs(entry["loss"]))):
            self.first_exceed = {"step": step, "task": task, "loss_abs_diff": dloss,
                                 "parameter": bad[0] if bad else None, "parameters_over_tol": bad}
        if step % self.every == 0 or step == 1:
            rel = max(d["max_rel"] for d in dev.values())
            self.checkpoints.append({"step": step, "per_tensor": dev, "overall_max_abs": dev[worst]["max_abs"],
                                     "overall_worst": worst, "overall_max_rel": rel})


def agreement_config(tasks, state_dim: int, act_dim: int, steps: int, **overrides) -> HarmoDTConfig:
    """Small, published-shaped (K 20, prompt 5, its optimiser; a short warm-up), round-robin, fp32, dropout 0;
    `2 * steps` in all: step `steps` is the flip schedule's peak, and no mask update falls before it."""
    values = dict(tasks=tuple(tasks), state_dim=state_dim, act_dim=act_dim, hidden=64, layers=2, heads=4,
                  mlp_hidden=256, dropout=0.0, context=20, prompt_len=5, max_ep_len=1000, schedule="round-robin",
                  steps=2 * steps, mask_interval=2 * steps, checkpoint_every=2 * steps, log_every=1,
                  batch_per_task=8, lr=1e-4, weight_decay=1e-4, warmup_steps=100, grad_clip=0.25,
                  precision="fp32", eta_min=0, eta_max=100, seed=0)
    return HarmoDTConfig.from_dict({**values, **overrides})


def run_lockstep(config: HarmoDTConfig, dataset, make_reference, steps: int, every: int, workdir: str):
    """Our Trainer for `steps` steps with the reference side in lockstep; returns (trainer, lockstep, sampler)."""
    lock = Lockstep(every)
    lock.sampler = sampler = _recording(MultiTaskSampler(dataset, config, seed=config.seed))
    trainer = Trainer(config, sampler, workdir, torch.device("cpu"), fingerprint=str(dataset.fingerprint),
                      callbacks=[lock])
    lock.reference = make_reference(trainer.model)
    trainer.run(stop_at=steps, progress=False)
    return trainer, lock, sampler


# ---- the mask update ---------------------------------------------------------------------------------------------
def compare_mask_update(trainer, published: PublishedSide, batch: Batch, step: int) -> dict:
    """One mask update on each side from the same state (ours copied into theirs) and batch, ours by
    method.mask_update (the trainer's), theirs as main.py; then both selections fed the published inputs."""
    cfg, model, names = trainer.config, trainer.model, published.tasks
    _sets = lambda x: [set(torch.nonzero(row).flatten().tolist()) for row in x]  # noqa: E731  per row: True entries
    _jaccard = lambda a, b: [len(x & y) / max(1, len(x | y)) for x, y in zip(a, b)]  # noqa: E731
    published.load(model)
    # a copy: model.task_masks() holds the layers' own buffers, which the update flips in place
    before = TaskMasks.from_state_dict(copy.deepcopy(model.task_masks().state_dict()))
    positions, T, P = flat_positions(before, published.shapes), before.num_tasks, before.numel
    flat = lambda m: torch.cat([m.to_dense(n).flatten(1) for n in m.names], dim=1)  # noqa: E731  bool [T, P]
    old, k = flat(before), method.flips_per_task(cfg, step, before)
    _, info, _ = method.mask_update(model, batch, cfg, step, losses_fn=model.task_losses, amp_dtype=trainer.amp_dtype)
    new = flat(model.task_masks())
    ours_prune, ours_grow = _sets(old & ~new), _sets(~old & new)
    theirs = published.mask_update(batch, k)

    # where the published picks land: in our masked weights (as our flat indices), or in which other parameter
    sizes = [math.prod(s) for s in published.shapes.values()]
    to_ours = torch.full((sum(sizes),), -1, dtype=torch.long).index_copy_(0, positions, torch.arange(P))
    ends, pub_names = torch.tensor(sizes).cumsum(0), list(published.shapes)

    def picks(vectors):
        got = [torch.nonzero(vectors[t]).flatten() for t in names]
        inside = [set(to_ours[g][to_ours[g] >= 0].tolist()) for g in got]
        outside = [torch.bucketize(g[to_ours[g] < 0], ends, right=True).tolist() for g in got]
        return inside, [{pub_names[j]: o.count(j) for j in sorted(set(o))} for o in outside]
    (pub_prune, prune_outside), (pub_grow, _) = picks(theirs["prune"]), picks(theirs["grow"])  # regrow: inactive only

    # same inputs: what the published scoring saw (its gradients, task 0's replaced by the sum, and its ḡ) on our
    # masked entries, to our selection engine and to the published functions
    rows, gbar = torch.stack([theirs["grads"][t][positions] for t in names]).float(), theirs["gbar"][positions].double()
    engine = HarmonyRows(T, P, before.flat_packed(), k, cfg.gamma, cfg.score)
    engine.feed_rows(model.masked_weights_flat(), rows, gbar, 0, 0)  # ḡ given: not re-summed from the rows
    cands = engine.candidates()
    with _cpu_cuda_calls():
        sub, sub_masks = dict(zip(names, rows)), {t: old[i].float() for i, t in enumerate(names)}
        rule_prune = published.pub.fl.mask_generate_harmo(gbar.float(), sub, sub_masks, model.masked_weights_flat(),
                                                          gamma=cfg.gamma, change_num=k, mode=cfg.score)
        rule_grow = published.pub.fl.mask_dead_harmo(gbar.float(), sub, sub_masks, k)
    rule_prune, rule_grow = (_sets(torch.stack([v[t] for t in names]) > 0) for v in (rule_prune, rule_grow))
    engine_prune, engine_grow = ([set(c.tolist()) for c in i] for i in (cands.prune_i, cands.grow_i))
    agreement32, inactive = gbar.float() * rows, ~old  # the published regrow key is agreement32 + 1 in float32
    return {
        "step": step, "k_ours": k, "ours_flips": info["flips"], "ours_backend": info["backend"],
        # its main.py: the raised cosine at (step-1)/steps, truncated; ours (method.flip_count): step/steps, rounded
        "k_published_schedule": int(cfg.eta_max + 0.5 * (cfg.eta_min - cfg.eta_max) * (
            1 + math.cos(2 * math.pi * (step - 1) / cfg.steps))),
        "end_to_end": {
            "prune_jaccard": _jaccard(ours_prune, pub_prune), "regrow_jaccard": _jaccard(ours_grow, pub_grow),
            "published_prune_outside_our_masked_weights": prune_outside,
            "ours_vs_published_rule_on_our_entries_prune_jaccard": _jaccard(ours_prune, rule_prune),
            "ours_vs_published_rule_on_our_entries_regrow_jaccard": _jaccard(ours_grow, rule_grow)},
        "same_inputs": {
            "prune_identical": [a == b for a, b in zip(engine_prune, rule_prune)],
            "regrow_jaccard": _jaccard(engine_grow, rule_grow),
            "inactive_entries": inactive.sum(1).tolist(),
            "inactive_entries_with_zero_gradient": ((rows == 0) & inactive).sum(1).tolist(),
            "inactive_entries_whose_key_rounds_to_a_tie": (((agreement32 + 1.0) == 1.0) & inactive).sum(1).tolist()},
        "published_inputs": {
            "task0_gradient_replaced_by_mean": bool(torch.equal(theirs["grads"][names[0]], theirs["gbar"])),
            "task0_own_gradient_vs_mean_max_abs": float((theirs["first_task_grad"][positions] - gbar).abs().max())},
    }


# ---- the run and its report ------------------------------------------------------------------------------------------
def _git_head(path: str) -> str:
    head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return head or "unknown (not a git checkout)"


def _summary(lock: Lockstep) -> dict:
    worst = max(lock.steps, key=lambda s: s["loss_abs_diff"])
    norms = [s["grad_norm"] for s in lock.steps if s["grad_norm"]]
    ratios = sorted(n["published"] / n["masked"] for n in norms)
    return {"steps": len(lock.steps), "first_exceeding_tolerance": lock.first_exceed,
            "max_loss_abs_diff": worst["loss_abs_diff"], "max_loss_abs_diff_step": worst["step"],
            "final_param_max_abs": lock.checkpoints[-1]["overall_max_abs"],
            "final_param_worst": lock.checkpoints[-1]["overall_worst"],
            "published_clip_norm_over_masked_norm_median": ratios[len(ratios) // 2] if ratios else None,
            "steps_published_norm_over_clip": sum(n["published"] > 0.25 for n in norms) if norms else None,
            "per_step": lock.steps, "checkpoints": lock.checkpoints}


# label -> (config overrides, reference side); "published" sides are our own steps in a self-check
RUNS = {"as_published": ({}, "published"), "clip_off_control": ({"grad_clip": 1e30}, "published-clip-off"),
        "rounding_floor": ({}, "ours-unfused-adamw")}


def run(published_path: str | None, steps: int, every: int, episodes: int, episode_steps: int, work: str,
        reference: str = "published") -> dict:
    """The whole comparison as a JSON-able record: data, the RUNS, the mask update. reference="ours": every
    "published" side is our own steps (the self-check CI runs)."""
    pub = load_published(published_path) if reference == "published" else None
    dataset = load_dataset(collect(list(TASKS), os.path.join(work, "data"), episodes_per_task=episodes,
                                         quality="expert", seed=0, workers=1, episode_steps=episode_steps,
                                         progress=False, verbose=False))
    state_dim, act_dim = dataset.dims(list(TASKS))
    record = {"runs": {}}
    for label, (overrides, side) in RUNS.items():
        config = agreement_config(TASKS, state_dim, act_dim, steps, **overrides)
        make = ((lambda m, c=config, off=side.endswith("off"): PublishedSide(pub, m, c, clip_off=off))
                if side.startswith("published") and pub is not None else
                (lambda m, c=config, f=side != "ours-unfused-adamw": OursReference(m, c, fused=f)))
        trainer, lock, sampler = run_lockstep(config, dataset, make, steps, every, os.path.join(work, label))
        record["runs"][label] = _summary(lock)
        if label == "as_published":
            record["config"], record["our_backend"] = config.to_dict(), ops.last_backend("masked_linear")
            if pub is not None:
                record["mask_update"] = compare_mask_update(trainer, lock.reference, sampler.sample(), steps)
    return {**record, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": pub.transformers if pub else None},
            "our_commit": _git_head(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            "published_commit": pub.commit if pub else None, "reference": reference,
            "tolerance": {"param": PARAM_TOL, "loss": LOSS_TOL}, "data": {"tasks": list(TASKS), "quality": "expert",
                                                                          "episodes_per_task": episodes,
                                                                          "episode_steps": episode_steps}}


def plot(record: dict, path: str) -> None:
    """Per-step |Δloss| and max |Δw| of every run, log scale (zeros drawn at 1e-10)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ("loss_abs_diff", "param_max_abs"), ("|loss ours - loss reference|",
                                                                          "max |Δw| over all parameters")):
        for label, r in record["runs"].items():
            ax.semilogy([s["step"] for s in r["per_step"]], [max(s[key], 1e-10) for s in r["per_step"]], label=label,
                        lw=0.8)
        ax.axhline(PARAM_TOL if key == "param_max_abs" else LOSS_TOL, color="grey", ls="--", lw=0.8, label="tolerance")
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(record: dict) -> str:
    v = record["versions"]
    lines = [f"# Agreement with the published HarmoDT code ({record['date'][:10]})\n",
             f"Ours at {record['our_commit']}, reference {record['reference']} {record['published_commit'] or ''}; "
             f"torch {v['torch']}, transformers {v['transformers']}, {record['machine']['platform']}. Written by "
             f"`benchmarks/published_agreement.py` (every number: `agreement.json`). Tolerance: max |Δw| <= "
             f"{PARAM_TOL:g}·max(1, max|w|) per tensor, |Δloss| <= {LOSS_TOL:g}·max(1, |loss|).\n",
             "| run | steps | first step over tolerance (parameter) | max \\|Δloss\\| (step) | "
             "final max \\|Δw\\| (parameter) | published/masked clip norm (median) |", "| --- " * 6 + "|"]
    for label, r in record["runs"].items():
        first, ratio = r["first_exceeding_tolerance"], r["published_clip_norm_over_masked_norm_median"]
        where = f"{first['step']} ({first['parameter'] or 'loss'})" if first else "none"
        lines.append(f"| {label} | {r['steps']} | {where} | {r['max_loss_abs_diff']:.3g} "
                     f"({r['max_loss_abs_diff_step']}) | {r['final_param_max_abs']:.3g} ({r['final_param_worst']}) | "
                     f"{f'{ratio:.4f}' if ratio else '-'} |")
    mu = record.get("mask_update")
    if mu:
        def fmt(v):  # lists per task; {parameter: picks} as their total
            items = [sum(x.values()) if isinstance(x, dict) else x for x in (v if isinstance(v, list) else [v])]
            return ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in items)
        lines += ["", f"Mask update at step {mu['step']} from the same state (per task, Jaccard of the chosen entries "
                  f"or counts; k = {mu['k_ours']} each way, the published schedule gives "
                  f"{mu['k_published_schedule']} there; docs/agreement.md explains each line):\n"]
        lines += [f"- {section.replace('_', ' ')}: " + "; ".join(f"{k.replace('_', ' ')} {fmt(v)}"
                                                                for k, v in mu[section].items())
                  for section in ("end_to_end", "same_inputs", "published_inputs")]
    return "\n".join(lines + ["", "![agreement](agreement.png)", ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harmodt_fast.benchmarks.published_agreement",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--published", required=True, help="a clone of github.com/charleshsc/HarmoDT")
    ap.add_argument("--out", default="benchmarks/results/published_agreement")
    ap.add_argument("--steps", type=int, default=500, help="training steps compared")
    ap.add_argument("--every", type=int, default=50, help="steps between per-tensor deviation records")
    ap.add_argument("--episodes", type=int, default=8, help="expert episodes per task in the dataset")
    ap.add_argument("--episode-steps", type=int, default=100, help="steps per episode")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        ap.error("--steps and --every must be >= 1")
    with tempfile.TemporaryDirectory(prefix="agreement-") as work:
        record = run(args.published, args.steps, args.every, args.episodes, args.episode_steps, work)
    os.makedirs(args.out, exist_ok=True)
    plot(record, os.path.join(args.out, "agreement.png"))
    for name, text in (("agreement.json", json.dumps(record, indent=1)), ("agreement.md", markdown(record))):
        with open(os.path.join(args.out, name), "w") as f:
            f.write(text)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
