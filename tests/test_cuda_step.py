"""On CUDA a training step never makes the host wait for the device: no loss read-back (that happens on log
steps only), no boolean indexing (a nonzero), no host-built task ids copied per step, no availability checks.
torch.cuda.set_sync_debug_mode("error") turns any synchronising call inside the step into an error."""
import tempfile

import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.batch import SyntheticSampler
from harmodt_fast.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class DeviceBatches(SyntheticSampler):
    """Batches built on the device before the checked steps (building them copies from the host)."""

    def __init__(self, config):
        super().__init__(config, device="cuda")
        self.mixed = super().sample()
        self.per_task = [super(DeviceBatches, self).sample(task=t) for t in range(config.num_tasks)]

    def sample(self, task=None):
        return self.mixed if task is None else self.per_task[task]


@pytest.mark.parametrize("schedule", ["mixed", "round-robin"])
def test_training_step_does_not_synchronise(schedule):
    # density 0.3: some weights belong to no task, so the step also restores them
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=3, schedule=schedule, density=0.3, dropout=0.1)
    trainer = Trainer(cfg, DeviceBatches(cfg), tempfile.mkdtemp(), torch.device("cuda"), "synthetic")
    assert trainer._unused.masks  # the restore path runs
    for _ in range(cfg.num_tasks + 1):  # warm-up: autotuning, the offsets and task-id caches (one per task)
        trainer._train_step()
        trainer.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(cfg.num_tasks):
            loss, per_task, _ = trainer._train_step()
            trainer.step += 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert hf.ops.last_backend("masked_mlp") == "triton"
    assert loss.is_cuda and per_task.shape == (cfg.num_tasks,) and torch.isfinite(loss)


def test_streamed_mask_update_on_cuda_matches_the_whole_buffer():
    """The streamed update on the GPU (the torch row form of the harmony op, the Triton kernels' task gradients)
    gives the masks of the whole-buffer update, and the whole-buffer update those of the CPU's C++ op."""
    from harmodt_fast import method

    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=5, dropout=0.0, precision="fp32", eta_max=40)
    torch.manual_seed(0)
    model = hf.HarmoDT(cfg).cuda()
    batch = SyntheticSampler(cfg, device="cuda").sample()
    start = model.task_masks().to("cpu")

    def update(fn, **kw):
        model.set_masks(start)
        masks, info, _ = fn(model, batch, cfg, cfg.steps // 2, losses_fn=model.task_losses, amp_dtype=None, **kw)
        return masks.to("cpu"), info

    whole, info = update(method.mask_update)
    assert info["passes"] == 1 and info["flips"] > 0 and hf.ops.last_backend("masked_mlp") == "triton"
    for group in (1, 2, 4):
        streamed, sinfo = update(method.mask_update, tasks_per_pass=group)
        assert streamed == whole, group
        assert sinfo["backend"] == "torch" and sinfo["passes"] == 2 * -(-5 // group)
