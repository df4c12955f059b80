"""The machinery of benchmarks/published_agreement.py: the name/layout/mask mapping, the batch conversion, the
lockstep harness (our trainer against our own steps: exact agreement, and a planted deviation found at its step
and parameter) and the report. The comparison against the published code itself runs when HARMODT_PUBLISHED
names a clone of it (it is not in CI)."""
import json
import os

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.benchmarks import published_agreement as pa


def _model(num_tasks=3):
    cfg = hf.HarmoDTConfig(num_tasks=num_tasks, state_dim=7, act_dim=3, hidden=32, layers=2, heads=2, mlp_hidden=64,
                           context=4, prompt_len=2, max_ep_len=50, dropout=0.0)
    torch.manual_seed(0)
    return hf.HarmoDT(cfg), cfg


def _published_shapes(model):
    """The published parameter order: theirs has a few parameters ours lacks (a word embedding first, extra heads
    last), which the mapping must skip."""
    theirs = pa.to_published_state(dict(model.named_parameters()))
    shapes = {"transformer.wte.weight": (1, 32)}
    shapes.update({n: tuple(t.shape) for n, t in theirs.items()})
    shapes["predict_state.weight"] = (7, 32)
    return shapes


def test_weights_round_trip_through_the_published_names_and_layouts():
    model, _ = _model()
    ours = {n: p.detach() for n, p in model.named_parameters()}
    theirs = pa.to_published_state(ours)
    assert theirs["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out]
    assert torch.equal(theirs["transformer.h.1.mlp.c_fc.weight"], ours["blocks.1.mlp.c_fc.weight"].t())
    assert torch.equal(theirs["embed_timestep.weight"], ours["embed.timestep.weight"])
    assert torch.equal(theirs["prompt_embed_return.bias"], ours["prompt_embed.ret.bias"])
    back = pa.from_published_state(theirs, list(ours))
    assert set(back) == set(ours) and all(torch.equal(back[n], ours[n]) for n in ours)
    with pytest.raises(KeyError, match="no published counterpart"):
        pa.published_name("head.weight")
    with pytest.raises(KeyError, match="transformer.ln_f.bias"):  # a published state without one of ours
        pa.from_published_state({k: v for k, v in theirs.items() if k != "transformer.ln_f.bias"}, list(ours))


def test_masks_round_trip_and_are_ones_outside_the_block_weights():
    model, cfg = _model()
    masks = model.task_masks()
    shapes = _published_shapes(model)
    per_task = [pa.published_masks(masks, t, shapes) for t in range(cfg.num_tasks)]
    assert list(per_task[0]) == list(shapes)
    for name in ("transformer.wte.weight", "embed_ln.weight", "transformer.ln_f.bias",
                 "transformer.h.0.attn.c_attn.bias", "embed_timestep.weight"):
        assert per_task[1][name].eq(1).all(), name
    block = per_task[2]["transformer.h.1.attn.c_attn.weight"]
    assert torch.equal(block.t().bool(), masks.to_dense("blocks.1.attn.c_attn.weight", 2))
    assert 0 < block.mean() < 1  # a real sparse mask, not ones
    back = {n: torch.stack([pa.from_published_state(m, [n])[n] != 0 for m in per_task]) for n in masks.names}
    assert hf.TaskMasks.from_dense(back) == masks


def test_flat_positions_gather_the_published_vector_into_our_flat_layout():
    model, _ = _model()
    masks = model.task_masks()
    shapes = _published_shapes(model)
    theirs = pa.to_published_state({n: p.detach() for n, p in model.named_parameters()})
    vector = torch.cat([theirs[n].flatten() if n in theirs else torch.full((torch.Size(s).numel(),), float("nan"))
                        for n, s in shapes.items()])
    positions = pa.flat_positions(masks, shapes)
    assert positions.unique().numel() == masks.numel
    assert torch.equal(vector[positions], model.masked_weights_flat())


def test_published_batch_holds_our_batch_in_the_published_tuples():
    _, cfg = _model()
    batch = hf.batch.synthetic_batch(cfg, rows_per_task=2, generator=torch.Generator().manual_seed(0))
    prompt, rows = pa.published_batch(batch)
    s, a, r, d, rtg, ts, mask = rows
    assert torch.equal(s, batch.states) and torch.equal(a, batch.actions)
    assert rtg.shape == (6, cfg.context + 1, 1) and torch.equal(rtg[:, :-1], batch.returns_to_go)
    assert ts.dtype == torch.int64 and torch.equal(mask, batch.attention_mask.float())
    assert r.abs().sum() == 0 and d.shape == (6, cfg.context)
    assert prompt[4].shape == (6, cfg.prompt_len, 1) and torch.equal(prompt[0], batch.prompt.states)
    prompt[5][:] = 10**6  # the published forward clamps these in place: ours must not change
    assert batch.prompt.timesteps.max() < cfg.max_ep_len


def test_missing_published_clone_is_a_clear_error(tmp_path):
    (tmp_path / "prompt_dt").mkdir()
    (tmp_path / "prompt_dt" / "fl_utils.py").write_text("")
    with pytest.raises(FileNotFoundError, match="prompt_decision_transformer.py.*git clone"):
        pa.load_published(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("agreement")
    path = hf.collect(["reach-v3", "button-press-v3"], root / "data", episodes_per_task=3, quality="expert",
                      seed=0, workers=1, episode_steps=30, progress=False, verbose=False)
    return hf.load_dataset(path), root


def _config(dataset, steps):
    tasks = ("reach-v3", "button-press-v3")
    state_dim, act_dim = dataset.dims(list(tasks))
    return pa.agreement_config(tasks, state_dim, act_dim, steps, hidden=32, heads=2, mlp_hidden=64, context=5,
                               prompt_len=2, batch_per_task=2, warmup_steps=3)


def test_lockstep_of_our_trainer_against_our_own_steps_agrees_exactly(tiny_data):
    dataset, root = tiny_data
    cfg = _config(dataset, 6)
    trainer, lock, _ = pa.run_lockstep(cfg, dataset, lambda m: pa.OursReference(m, cfg), 6, 2, str(root / "same"))
    assert trainer.step == 6 and [s["step"] for s in lock.steps] == list(range(1, 7))
    assert [s["task"] for s in lock.steps] == [0, 1, 0, 1, 0, 1]  # round-robin, as published
    assert all(s["loss_abs_diff"] == 0 and s["param_max_abs"] == 0 for s in lock.steps)
    assert lock.first_exceed is None and [c["step"] for c in lock.checkpoints] == [1, 2, 4, 6]
    first = lock.steps[0]["loss_ours"]
    assert first > 0 and any(s["loss_ours"] != first for s in lock.steps)  # it trains: the losses move


class _Planted(pa.OursReference):
    """Our own steps with a known deviation after step 4."""

    def step(self, batch, task, step):
        loss = super().step(batch, task, step)
        if step == 4:
            with torch.no_grad():
                self.model.ln_f.bias[0] += 1e-3
        return loss


def test_lockstep_finds_a_planted_deviation_at_its_step_and_parameter(tiny_data):
    dataset, root = tiny_data
    cfg = _config(dataset, 6)
    _, lock, _ = pa.run_lockstep(cfg, dataset, lambda m: _Planted(m, cfg), 6, 2, str(root / "planted"))
    assert all(s["param_max_abs"] == 0 for s in lock.steps[:3])
    assert lock.first_exceed["step"] == 4 and lock.first_exceed["parameter"] == "ln_f.bias"
    assert lock.checkpoints[-1]["per_tensor"]["ln_f.bias"]["max_abs"] >= 1e-3 * 0.9


def test_report_files_from_a_self_check_run(tmp_path):
    record = pa.run(None, steps=3, every=2, episodes=2, episode_steps=25, work=str(tmp_path), reference="ours")
    assert set(record["runs"]) == {"as_published", "clip_off_control", "rounding_floor"}
    same = [record["runs"][k] for k in ("as_published", "clip_off_control")]  # our own steps: exact
    assert all(r["final_param_max_abs"] == 0 and r["first_exceeding_tolerance"] is None for r in same)
    assert record["runs"]["rounding_floor"]["final_param_max_abs"] < 1e-6  # per-tensor AdamW: rounding only
    json.dumps(record)
    pa.plot(record, str(tmp_path / "agreement.png"))
    assert (tmp_path / "agreement.png").stat().st_size > 10_000
    text = pa.markdown(record)
    assert "| as_published | 3 | none |" in text and "agreement.png" in text


@pytest.mark.skipif(not os.environ.get("HARMODT_PUBLISHED"),
                    reason="HARMODT_PUBLISHED (a clone of github.com/charleshsc/HarmoDT) is not set")
def test_against_the_published_code(tmp_path):
    record = pa.run(os.environ["HARMODT_PUBLISHED"], steps=10, every=5, episodes=3, episode_steps=40,
                    work=str(tmp_path))
    assert record["runs"]["clip_off_control"]["first_exceeding_tolerance"] is None
    assert all(record["mask_update"]["same_inputs"]["prune_identical"])
