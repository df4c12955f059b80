"""The trainer on synthetic batches (the Meta-World path of hf.train is tested in test_train_e2e.py)."""
import json
import os

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.checkpoint import CheckpointError, load_checkpoint
from harmodt_fast.trainer import Trainer


def cfg(**kw):
    base = dict(num_tasks=3, steps=20, mask_interval=5, log_every=5, checkpoint_every=100, precision="fp32")
    base.update(kw)
    return hf.HarmoDTConfig.from_preset("tiny", **base)


def run(config, out, stop_at=None, fingerprint="synthetic"):
    trainer = Trainer(config, SyntheticSampler(config, seed=config.seed), str(out), torch.device("cpu"), fingerprint)
    return trainer.run(stop_at=stop_at, progress=False), trainer


def test_resume_reproduces_uninterrupted_run(tmp_path):
    config = cfg()
    straight, t1 = run(config, tmp_path / "a")
    first, _ = run(config, tmp_path / "b", stop_at=10)
    assert first.step == 10 and load_checkpoint(str(tmp_path / "b"))["step"] == 10
    resumed, t2 = run(config, tmp_path / "b")
    assert resumed.step == 20
    s1, s2 = t1.model.state_dict(), t2.model.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    assert resumed.masks == straight.masks
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    # the log holds each step once, in order
    steps = [json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl") if "loss" in line]
    assert steps == sorted(set(steps))


def test_mask_updates_flip_and_keep_density(tmp_path):
    config = cfg(eta_max=30)
    result, trainer = run(config, tmp_path)
    updates = [json.loads(l)["mask_update"] for l in open(tmp_path / "metrics.jsonl") if "mask_update" in l]
    assert len(updates) == 3  # steps 5, 10, 15 (none at the last step)
    assert sum(u["flips"] for u in updates) > 0
    assert all(abs(u["density"] - updates[0]["density"]) < 1e-12 for u in updates)
    initial = hf.HarmoDT(config).task_masks()
    assert result.masks != initial  # the masks moved
    for t in range(config.num_tasks):
        assert result.masks.active_counts()[t] == initial.active_counts()[t]
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["task_agreement"].shape == (3, 3)


def test_weights_no_task_uses_stay_untouched(tmp_path):
    config = cfg(density=0.3, mask_interval=1000, weight_decay=0.1)  # at 0.3 some weights have no task
    torch.manual_seed(config.seed)
    before = hf.HarmoDT(config)
    result, trainer = run(config, tmp_path)
    masks = trainer.model.task_masks()
    checked = 0
    for name, layer in trainer.model.masked_layers().items():
        unused = ~masks.to_dense(name).any(0)
        used = ~unused
        w0 = dict(before.named_parameters())[name]
        assert torch.equal(layer.weight.detach()[unused], w0.detach()[unused]), name
        assert not torch.equal(layer.weight.detach()[used], w0.detach()[used])
        checked += int(unused.sum())
    assert checked > 0


def test_round_robin_and_unmasked_methods(tmp_path):
    rr, _ = run(cfg(schedule="round-robin"), tmp_path / "rr")
    assert rr.step == 20 and all(torch.isfinite(torch.tensor(h["loss"])) for h in rr.history)
    for method in ("prompt-dt", "mtdt"):
        res, _ = run(cfg(method=method), tmp_path / method)
        assert res.masks is None and res.step == 20


def test_other_config_or_data_refused_not_overwritten(tmp_path):
    run(cfg(), tmp_path, stop_at=5)
    mtime = os.path.getmtime(tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="another config.*lr"):
        run(cfg(lr=0.5), tmp_path)
    with pytest.raises(CheckpointError, match="other data"):
        run(cfg(), tmp_path, fingerprint="something-else")
    assert os.path.getmtime(tmp_path / "checkpoint.pt") == mtime


def test_a_checkpoint_from_before_a_new_config_field_resumes(tmp_path):
    """Checkpoints written before a field existed (mask_update_memory_mb) resume when the run uses its default."""
    from harmodt_fast.checkpoint import load_checkpoint, save_atomic

    run(cfg(), tmp_path, stop_at=5)
    ckpt = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    del ckpt["config"]["mask_update_memory_mb"]
    save_atomic(ckpt, str(tmp_path / "checkpoint.pt"))
    res, _ = run(cfg(), tmp_path)
    assert res.step == 20
    with pytest.raises(CheckpointError, match="mask_update_memory_mb: None there vs 1.0 now"):
        run(cfg(mask_update_memory_mb=1.0), tmp_path)


def test_bad_arguments_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        hf.train(str(tmp_path / "none"), tmp_path / "o", preset="giant")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rate'\]"):
        hf.train(str(tmp_path / "none"), tmp_path / "o", learning_rate=1.0)
    with pytest.raises(ValueError, match="steps must be > 0"):
        hf.train(str(tmp_path / "none"), tmp_path / "o", steps=0)
    with pytest.raises(ValueError, match="unknown method"):
        hf.train(str(tmp_path / "none"), tmp_path / "o", method="dt")
    with pytest.raises(ValueError, match="duplicate task names"):
        hf.train(str(tmp_path / "none"), tmp_path / "o", tasks=["reach-v2", "reach-v3"])
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write to the output folder"):
        hf.train(str(tmp_path / "none"), blocker / "sub")


def test_bf16_autocast_matches_fp32_on_cpu(rng):
    """The CPU training path may run in bf16 autocast: its losses and gradients stay close to fp32."""
    from harmodt_fast.batch import synthetic_batch
    from harmodt_fast.trainer import autocast_dtype

    config = cfg(dropout=0.0)
    assert autocast_dtype(cfg(precision="fp32"), torch.device("cpu")) is None
    assert autocast_dtype(cfg(precision="bf16"), torch.device("cpu")) is torch.bfloat16
    model = hf.HarmoDT(config)
    batch = synthetic_batch(config, [4, 0, 5], rng)
    losses32 = model.task_losses(batch)
    grads32 = torch.autograd.grad(losses32.sum(), list(model.parameters()), allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses16 = model.task_losses(batch)
    grads16 = torch.autograd.grad(losses16.sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(losses16.float(), losses32, rtol=3e-2, atol=1e-3)
    for g32, g16 in zip(grads32, grads16):
        if g32 is not None:
            cos = torch.nn.functional.cosine_similarity(g32.flatten(), g16.float().flatten(), dim=0)
            assert g32.abs().sum() == 0 or cos > 0.98


def test_tensorboard_events_mirror_the_log(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(cfg(steps=6, mask_interval=3, log_every=2, tensorboard=True), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss" in tags and "mask_update/flips" in tags and "task_loss/task-0" in tags
    logged = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert [e.step for e in events.Scalars("loss")] == [l["step"] for l in logged]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx([l["loss"] for l in logged], rel=1e-6)


def test_a_run_killed_before_its_first_checkpoint_starts_a_fresh_log(tmp_path):
    config = cfg()
    (tmp_path / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')  # what a killed run left behind
    run(config, tmp_path)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if "loss" in line]
    assert steps == sorted(set(steps)) and steps[0] == 1
