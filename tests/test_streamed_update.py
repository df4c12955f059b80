"""The streamed mask update (no [T, P] buffer) against the whole-buffer one: the row-mode harmony op on every
backend against the reference, shards merged exactly, and the model-level update with identical masks."""
import json

import pytest
import torch

from harmodt_fast import method
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.model import HarmoDT
from harmodt_fast.ops.harmony import harmony_update_torch
from harmodt_fast.ops.harmony_rows import HarmonyRows, apply_candidates, merge_candidates
from harmodt_fast.ops.packing import pack_masks_torch
from harmodt_fast.ops.harmony import harmony_update
from harmodt_fast.task_gradients import clip_factors, task_gradient_rows, task_gradients, update_group_size

BACKENDS = ["torch", "cpp"]


def _problem(T, P, seed, ties=False, density=0.6):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(T, P, generator=g)
    if ties:  # few distinct values: many equal keys, so the index tie-break decides
        grads = (grads * 2).round() / 2
    weight = torch.randn(P, generator=g)
    masks = pack_masks_torch(torch.rand(T, P, generator=g) < density)
    return weight, grads, masks


def _gbar(grads):
    gbar = grads[0].double().clone()
    for t in range(1, grads.shape[0]):
        gbar += grads[t].double()
    return gbar / torch.tensor(float(grads.shape[0]), dtype=torch.float64)


def _rows_update(weight, grads, masks, k, score, backend, group, shards=1):
    """The row-mode update fed `group` tasks at a time, over `shards` shards of the entries merged like ranks."""
    T, P = grads.shape
    gbar = _gbar(grads)
    size = -(-P // shards)
    parts, ks = [], None
    for s in range(shards):
        lo, hi = min(P, s * size), min(P, (s + 1) * size)
        rows = HarmonyRows(T, P, masks, k, 10.0, score, backend=backend)
        for first in range(0, T, group):
            last = min(T, first + group)
            rows.feed_rows(weight[lo:hi], grads[first:last, lo:hi], gbar[lo:hi], first, lo)
        ks = rows.k
        parts.append(rows.candidates())
    cands = merge_candidates(parts, ks) if shards > 1 else parts[0]
    new = masks.clone()
    return new, apply_candidates([new], [P], ks, cands)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["fisher", "magnitude", "harmony"])
@pytest.mark.parametrize("T,P,group,shards,ties", [
    (5, 1000, 1, 1, False), (5, 1000, 2, 1, True), (3, 77, 3, 2, False), (1, 33, 1, 1, False),
    (7, 4099, 3, 3, True), (4, 31, 2, 4, False),
])
def test_rows_equal_the_reference(backend, score, T, P, group, shards, ties):
    weight, grads, masks = _problem(T, P, seed=T * P, ties=ties)
    ks = [0, 5, 3, 1000, 2, 7, 1][:T]  # k = 0, clamped k and the rest
    want, want_stats = harmony_update_torch(weight, grads, masks, ks, 10.0, score)
    got, stats = _rows_update(weight, grads, masks, ks, score, backend, group, shards)
    assert torch.equal(got, want)
    for name in ("pruned", "regrown"):
        assert torch.equal(stats[name], want_stats[name])
    assert torch.allclose(stats["mean_agreement"], want_stats["mean_agreement"], rtol=1e-9, atol=1e-12)
    assert torch.allclose(stats["conflict_fraction"], want_stats["conflict_fraction"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_bad_input_is_named(backend):
    weight, grads, masks = _problem(3, 100, seed=1)
    gbar = _gbar(grads)
    rows = HarmonyRows(3, 100, masks, 4, backend=backend)
    bad = grads.clone()
    bad[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        rows.feed_rows(weight, bad, gbar, 0, 0)
    rows = HarmonyRows(3, 100, masks, 4, backend=backend)
    rows.feed_rows(weight[50:], grads[:1, 50:], gbar[50:], 0, 50)
    with pytest.raises(ValueError, match="task 0 expects entries from 100"):
        rows.feed_rows(weight[:50], grads[:1, :50], gbar[:50], 0, 0)
    with pytest.raises(ValueError, match="outside"):
        rows.feed_rows(weight, grads, gbar, 1, 0)
    with pytest.raises(ValueError, match="float64"):
        rows.feed_rows(weight, grads, gbar.float(), 0, 0)


# ---- the model-level update -----------------------------------------------------------------------------------
def _model_and_batch(num_tasks=5, dropout=0.0, seed=0, **kw):
    cfg = HarmoDTConfig.from_preset("tiny", num_tasks=num_tasks, dropout=dropout, precision="fp32", seed=seed,
                                    backend="torch", eta_max=40, **kw)
    torch.manual_seed(seed)
    model = HarmoDT(cfg)
    batch = SyntheticSampler(cfg, seed=seed).sample()
    return cfg, model, batch


def _masks_after(update, cfg, model, batch, seed=3, **kw):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    model.set_masks(model.task_masks())
    torch.manual_seed(seed)
    masks, info, agreement = update(model, batch, cfg, cfg.steps // 2, losses_fn=model.task_losses, amp_dtype=None,
                                    **kw)
    rng_after = torch.get_rng_state()
    return masks, info, agreement, rng_after


def _fresh(cfg, model):
    clone = HarmoDT(cfg)
    clone.load_state_dict(model.state_dict())
    clone.set_masks(model.task_masks())
    return clone


def _op_on_first_pass_rows(cfg, model, batch, group, seed=3):
    """The reference for G tasks per pass: hf.ops.harmony_update on the clipped rows the first pass computes (one
    backward per group, in order; with dropout the grouping decides which rows share a dropout draw)."""
    masks = model.task_masks()
    torch.manual_seed(seed)
    grads = torch.empty(cfg.num_tasks, sum(model.masked_sizes()))
    for first in range(0, cfg.num_tasks, group):
        last = min(cfg.num_tasks, first + group)
        task_gradient_rows(model, batch, first, last, grads[first:last], losses_fn=model.task_losses, amp_dtype=None)
    rng_after = torch.get_rng_state()
    grads.mul_(clip_factors(grads, cfg.task_grad_clip, model.masked_sizes())[:, None])
    k = method.flips_per_task(cfg, cfg.steps // 2, masks)
    new, _ = harmony_update(model.masked_weights_flat(), grads, masks.flat_packed(), k, cfg.gamma, cfg.score)
    return masks.with_flat_packed(new), rng_after


@pytest.mark.parametrize("dropout,groups", [(0.0, [1, 2, 4, 5]), (0.1, [2, 4, 5])])
def test_streamed_masks_equal_the_whole_buffer_update(dropout, groups):
    cfg, model, batch = _model_and_batch(dropout=dropout)
    whole, info, agreement, rng = _masks_after(method.mask_update, cfg, _fresh(cfg, model), batch)
    assert info["passes"] == 1 and info["tasks_per_pass"] == 5 and info["flips"] > 0
    for group in groups:
        got, ginfo, gagree, grng = _masks_after(method.mask_update, cfg, _fresh(cfg, model), batch,
                                                tasks_per_pass=group)
        # without dropout the grouping cannot matter; with it, the second pass must replay the first one's draws
        want, want_rng = (whole, rng) if dropout == 0 else _op_on_first_pass_rows(cfg, _fresh(cfg, model), batch, group)
        assert got == want, f"tasks_per_pass={group}"
        # all 5 tasks fit: the rows are kept (one pass); else two passes of ceil(5 / G) backward calls
        assert ginfo["passes"] == (1 if group == 5 else 2 * -(-5 // group)) and ginfo["flips"] == info["flips"]
        assert abs(ginfo["mean_agreement"] - info["mean_agreement"]) <= 1e-9 * abs(info["mean_agreement"]) + 1e-15 \
            or dropout > 0
        assert torch.equal(grng, want_rng)  # the update consumes the RNG of one pass
        if group == 5:
            assert torch.equal(gagree, agreement)
            continue
        # the agreement is sampled on entries: close to the exact one, not equal
        assert gagree.shape == agreement.shape and torch.allclose(gagree.diagonal(), agreement.diagonal())


def test_the_update_is_the_harmony_op_on_the_clipped_task_gradients():
    """The model-level update (rows kept, one pass) gives the masks of hf.ops.harmony_update on the [T, P] buffer of
    clipped task gradients: the product path computes what the op specifies."""
    cfg, model, batch = _model_and_batch()
    masks = model.task_masks()
    grads = task_gradients(model, batch, losses_fn=model.task_losses, amp_dtype=None)
    grads.mul_(clip_factors(grads, cfg.task_grad_clip, model.masked_sizes())[:, None])
    k = method.flips_per_task(cfg, cfg.steps // 2, masks)
    want, _ = harmony_update(model.masked_weights_flat(), grads, masks.flat_packed(), k, cfg.gamma, cfg.score)
    got, info, _, _ = _masks_after(method.mask_update, cfg, _fresh(cfg, model), batch)
    assert info["passes"] == 1 and info["flips"] > 0
    assert got == masks.with_flat_packed(want)


def test_the_memory_budget_picks_the_form():
    cfg, model, batch = _model_and_batch()
    P = sum(model.masked_sizes())
    assert update_group_size(cfg, P) == 5  # the tiny model: every task fits 256 MB
    small = HarmoDTConfig.from_dict({**cfg.to_dict(), "mask_update_memory_mb": 2.5 * 4 * P / 2**20})
    assert update_group_size(small, P) == 2
    _, info, _ = method.mask_update(model, batch, small, 10, losses_fn=model.task_losses, amp_dtype=None)
    assert info["tasks_per_pass"] == 2 and info["passes"] == 6 and info["backend"] in ("cpp", "torch")
    with pytest.raises(ValueError, match="mask_update_memory_mb"):
        HarmoDTConfig(mask_update_memory_mb=0)


def test_task_gradient_rows_leave_the_model_as_it_was():
    cfg, model, batch = _model_and_batch()
    layers = model.masked_layers()
    before = {n: l.masks_packed.clone() for n, l in layers.items()}
    rows = torch.empty(2, sum(model.masked_sizes()))
    task_gradient_rows(model, batch, 1, 3, rows, losses_fn=model.task_losses, amp_dtype=None)
    whole = task_gradients(model, batch, losses_fn=model.task_losses, amp_dtype=None)
    assert torch.allclose(rows, whole[1:3], rtol=1e-5, atol=1e-7)
    assert all(torch.equal(before[n], l.masks_packed) for n, l in layers.items())
    assert all(l.task_grads is None and l.weight.requires_grad for l in layers.values())
    assert all(p.grad is None for p in model.parameters())


def test_training_with_the_streamed_update(tmp_path):
    import harmodt_fast as hf
    from test_any_tasks import write_mtdiff

    data = write_mtdiff(tmp_path / "data", ["t0", "t1", "t2", "t3"])
    run = hf.train(data, tmp_path / "run", preset="tiny", steps=4, mask_interval=2, progress=False,
                   precision="fp32", mask_update_memory_mb=0.05)
    updates = [json.loads(l)["mask_update"] for l in open(tmp_path / "run" / "metrics.jsonl") if "mask_update" in l]
    assert updates and all(u["passes"] > 2 and u["tasks_per_pass"] < 4 for u in updates)
    assert abs(run.masks.density() - 0.8) < 0.01


_PEAK_SCRIPT = r"""
import ctypes, json, sys
import torch
from harmodt_fast import method
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.config import HarmoDTConfig
from harmodt_fast.model import HarmoDT

budget = float(sys.argv[1])
cfg = HarmoDTConfig.from_preset("tiny", num_tasks=80, hidden=128, mlp_hidden=512, heads=4, batch_per_task=1,
                                precision="fp32", backend="cpp", mask_update_memory_mb=budget)
torch.manual_seed(0)
model = HarmoDT(cfg)
batch = SyntheticSampler(cfg).sample()
P = sum(model.masked_sizes())
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS")
_, info, _ = method.mask_update(model, batch, cfg, 100, losses_fn=model.task_losses, amp_dtype=None)
print(json.dumps({"peak": (status("VmHWM") - before) * 1024, "buffer": 4 * 80 * P, "info": info}))
"""


def test_the_streamed_update_peaks_far_below_the_whole_buffer(cpp_ext):
    """Measured in fresh processes (peak RSS of the update call): the whole-buffer update needs at least its [T, P]
    buffer; the streamed one, at a budget of a sixteenth of it, saves most of it (both pay the same fixed costs:
    activations, the allocator's and the threads' first use)."""
    import os
    import subprocess
    import sys

    import harmodt_fast

    root = os.path.dirname(os.path.dirname(os.path.abspath(harmodt_fast.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")])))

    def run(budget_mb):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(budget_mb)], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole = run(1e6)
    buffer = whole["buffer"]
    streamed = run(buffer / 16 / 2**20)
    assert whole["info"]["passes"] == 1 and streamed["info"]["tasks_per_pass"] == 5
    assert whole["peak"] >= buffer, (whole["peak"], buffer)
    assert streamed["peak"] <= whole["peak"] - buffer / 2, (streamed["peak"], whole["peak"], buffer)
    assert streamed["info"]["flips"] == whole["info"]["flips"] > 0



def test_a_score_added_to_the_table_trains(monkeypatch):
    """The product path with a score that exists only as a table entry (s_t = |g_t|, no C++ id): the update runs it
    on the torch engine in both forms, with the masks of the op on the clipped task gradients."""
    import harmodt_fast.ops.harmony as H

    monkeypatch.setitem(H.SCORE_TABLE, "abs_grad", H.Score("abs_grad", needs_weight=False, key=lambda g, w: g.abs(),
                                                           cpp_id=None))
    cfg, model, batch = _model_and_batch(score="abs_grad")
    want, _ = _op_on_first_pass_rows(cfg, _fresh(cfg, model), batch, group=5)
    for group in (5, 2):
        got, info, _, _ = _masks_after(method.mask_update, cfg, _fresh(cfg, model), batch, tasks_per_pass=group)
        assert info["backend"] == "torch" and info["flips"] > 0 and got == want, group
    fisher = HarmoDTConfig.from_dict({**cfg.to_dict(), "score": "fisher"})
    assert _masks_after(method.mask_update, fisher, _fresh(fisher, model), batch)[0] != want  # |g| selects otherwise
