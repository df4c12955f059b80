"""A self-contained smoke run: the tiny masked model trained on synthetic mixed-task batches.

Stands in for the demo until the trainer and the Meta-World data land; it exercises the masks, the masked ops
(both levels: inner AdamW steps and one harmony mask update from a single backward) on any machine.
"""
from __future__ import annotations

import torch

import harmodt_fast as hf
from harmodt_fast.batch import synthetic_batch
from harmodt_fast.masks import flip_count


def synthetic_smoke_run(steps: int = 150, seed: int = 0, num_tasks: int = 4) -> list[float]:
    torch.manual_seed(seed)
    cfg = hf.HarmoDTConfig.from_preset("tiny", num_tasks=num_tasks, seed=seed, steps=steps)
    model = hf.HarmoDT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(1, steps + 1):
        batch = synthetic_batch(cfg, cfg.batch_per_task, gen)
        loss = model.task_losses(batch).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item() / num_tasks)
        if step % cfg.mask_interval == 0:
            _mask_update(model, batch, flip_count(step, steps, cfg.eta_min, cfg.eta_max))
        if step == 1 or step % 25 == 0:
            print(f"step {step:4d}  loss/task {losses[-1]:.4f}  mask density {model.task_masks().density():.4f}")
    print(f"backends: masked_linear={hf.ops.last_backend('masked_linear')} "
          f"harmony_update={hf.ops.last_backend('harmony_update')}")
    return losses


def _mask_update(model, batch, k: int) -> None:
    layers = model.masked_layers()
    for layer in layers.values():
        layer.task_grads = torch.zeros(model.config.num_tasks, *layer.weight.shape)
    model.zero_grad(set_to_none=True)
    model.task_losses(batch).sum().backward()  # one backward: every task's gradient
    grads = torch.cat([layer.task_grads.flatten(1) for layer in layers.values()], dim=1)
    for layer in layers.values():
        layer.task_grads = None
    model.zero_grad(set_to_none=True)
    masks = model.task_masks()
    weight_flat = torch.cat([layer.weight.detach().flatten() for layer in layers.values()])
    new_flat, stats = hf.ops.harmony_update(weight_flat, grads, masks.flat_packed(), k, model.config.gamma,
                                            model.config.score)
    model.set_masks(masks.with_flat_packed(new_flat))
    print(f"mask update: {int(stats['pruned'].sum())} flips, mean agreement {stats['mean_agreement'].mean():.3e}")
