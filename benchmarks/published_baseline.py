"""A faithful re-implementation (our own code) of the published HarmoDT training procedure, as the baseline that
benchmarks compare against. What it does per step, as the published code does:

- one task per step (round-robin here), a batch of `batch_per_task` sequences of that task;
- masks are float32 tensors over every parameter of the model; before the forward the whole state dict is deep-
  copied, the masks are multiplied into a second copy (parameters whose name contains 'embed' or 'predict' stay
  unmasked) and loaded into the model;
- forward, MSE loss, backward, global norm clip 0.25, gradients multiplied by the mask, AdamW step;
- afterwards entries outside the task's mask are restored from the saved copy and the state dict is loaded again.
A mask update computes each task's gradient with its own forward/backward (T passes), then prunes/regrows with
top-k over the flattened vectors.
"""
from __future__ import annotations

import copy

import torch

import harmodt_fast as hf
from harmodt_fast.masks import erk_densities


def _applies(name: str) -> bool:
    return "embed" not in name and "predict" not in name


class PublishedProcedure:
    def __init__(self, config: hf.HarmoDTConfig, seed: int = 0, amp_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        unmasked = hf.HarmoDTConfig.from_dict({**config.to_dict(), "method": "prompt-dt"})
        torch.manual_seed(seed)
        self.config = config
        self.device = torch.device(device)  # model, masks and autocast all on it: compared on the same device as ours
        self.amp_dtype = amp_dtype  # None: fp32 as published; bf16 gives the baseline the same CPU speed-up as ours
        self.model = hf.HarmoDT(unmasked).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        density = erk_densities(shapes, config.density)
        gen = torch.Generator().manual_seed(seed)
        self.masks = [
            {n: (torch.rand(shapes[n], generator=gen) < density[n]).float().to(self.device) for n in shapes}
            for _ in range(config.num_tasks)
        ]

    def _load_masked(self, task: int) -> dict:
        """Loads θ ⊙ M_task into the model (deep copies, as published); returns the saved original state."""
        original = copy.deepcopy(self.model.state_dict())
        masked = copy.deepcopy(self.model.state_dict())
        for name, mask in self.masks[task].items():
            if _applies(name):
                masked[name] = masked[name] * mask
        self.model.load_state_dict(masked)
        return original

    def train_step(self, batch: hf.Batch, task: int) -> float:
        masks = self.masks[task]
        original = self._load_masked(task)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss = self.model.task_losses(batch)[task]
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.25)
        for name, p in self.model.named_parameters():
            if p.grad is not None and _applies(name):
                p.grad = p.grad * masks[name]
        self.optimizer.step()
        current = self.model.state_dict()
        for name, mask in masks.items():
            current[name] = current[name] * mask + original[name] * (1 - mask)
        self.model.load_state_dict(current)
        return float(loss.detach())

    def task_gradient(self, batch: hf.Batch, task: int) -> torch.Tensor:
        masks = self.masks[task]
        original = self._load_masked(task)
        self.optimizer.zero_grad()
        self.model.task_losses(batch)[task].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.25)
        grads = []
        for name, p in self.model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append((g * masks[name] if _applies(name) else g).flatten())
        self.model.load_state_dict(original)
        return torch.cat(grads)

    def mask_update(self, batches: list[hf.Batch], k: int, gamma: float = 10.0) -> None:
        grads = [self.task_gradient(b, t) for t, b in enumerate(batches)]
        mean = torch.stack(grads).mean(0)
        names = [n for n, _ in self.model.named_parameters()]
        sizes = [p.numel() for p in self.model.parameters()]
        for t, g in enumerate(grads):
            flat = torch.cat([self.masks[t][n].flatten() for n in names])
            agreement = mean * g
            prune_score = (1 - flat) * 1e5 + gamma * agreement + g * g
            regrow_score = agreement - flat * 1e5
            flat[torch.topk(prune_score, k, largest=False).indices] = 0
            flat[torch.topk(regrow_score, k).indices] = 1
            for n, part in zip(names, torch.split(flat, sizes)):
                self.masks[t][n] = part.view_as(self.masks[t][n])
