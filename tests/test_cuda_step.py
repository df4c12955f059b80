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
    assert trainer._unused  # the restore path runs
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
