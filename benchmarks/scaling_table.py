"""The memory and communication table of docs/scaling.md, computed from the model's real shapes and hf.plan.

    python -m harmodt_fast.benchmarks.scaling_table    # rewrites the table between the markers in docs/scaling.md

Per data-parallel rank, for the paper and large presets x 50 and 160 tasks x 1-8 GPUs, global batch_per_task 8:
- static memory: parameters, gradients and AdamW state (16 bytes per parameter, replicated by DDP) and the packed
  task masks (T x P / 8 bytes, replicated);
- the training step's activations (hf.plan: the mixed batch of T x 8 sequences split over the ranks);
- the mask update's own peak (hf.plan: G tasks' rows, G from mask_update_memory_mb = 256, plus the rank's shard);
- communication per rank with ring collectives: a training step all-reduces the fp32 gradients once
  (2 (W-1)/W x 4 bytes per parameter, in DDP's buckets, overlapped with backward); a streamed mask update
  reduce-scatters every task's fp32 gradient rows twice (two passes: 2 x (W-1)/W x 4 T P bytes), all-reduces the
  clip norms and all-gathers each rank's candidates (W x T x 2k x 16 bytes, k = 100).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

DOC = os.path.join(os.path.dirname(HERE), "docs", "scaling.md")
BEGIN, END = "<!-- scaling-table:begin -->", "<!-- scaling-table:end -->"
PRESETS, TASKS, WORLDS, BATCH_PER_TASK, K = ("paper", "large"), (50, 160), (1, 2, 4, 8), 8, 100


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def shapes(preset: str) -> tuple[int, int]:
    """(parameters, masked weights) of the preset's model, counted on the meta device (nothing allocated)."""
    import torch

    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.model import HarmoDT

    cfg = HarmoDTConfig.from_preset(preset, method="prompt-dt")  # the same modules; masks are not needed to count
    with torch.device("meta"):
        model = HarmoDT(cfg)
    return (sum(p.numel() for p in model.parameters()),
            sum(layer.weight.numel() for layer in model.masked_layers().values()))


def rows() -> list[str]:
    from harmodt_fast.memory_plan import plan

    out = ["| model | T | GPUs | params+grads+AdamW GiB | masks GiB | step activations GiB | mask update peak GiB "
           "| step all-reduce GiB | mask update comm GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for preset in PRESETS:
        params, masked = shapes(preset)
        for T in TASKS:
            for W in WORLDS:
                p = plan(preset, tasks=T, batch_per_task=BATCH_PER_TASK // W if BATCH_PER_TASK % W == 0 else 1,
                         device="cuda", device_memory="139GiB").to_dict()
                ring = (W - 1) / W
                step_comm = 2 * ring * 4 * params
                update_comm = 2 * ring * 4 * T * masked + (W * T * 2 * K * 16 if W > 1 else 0)
                masks = T * ((masked + 31) // 32) * 4
                out.append(f"| {preset} ({params / 1e6:.1f}M, {masked / 1e6:.1f}M masked) | {T} | {W} | "
                           f"{_gib(16 * params)} | {_gib(masks)} | {_gib(p['step']['activations'])} | "
                           f"{_gib(p['mask_update_bytes'])} | {_gib(step_comm)} | {_gib(update_comm)} |")
    return out


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    text = open(DOC).read()
    table = "\n".join([BEGIN, *rows(), END])
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
    with open(DOC, "w") as f:
        f.write(text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
