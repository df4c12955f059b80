"""Measures one phase's peak resident memory in a fresh process, for tests/test_plan.py.

    python memory_probe.py '{"config": {...HarmoDTConfig fields...}, "steps": 2, "then_mask_update": true}'

increase: the peak RSS of `steps` training steps over the RSS right after the Trainer (model, optimiser, masks)
is built; mask_update_increase: the peak RSS of one mask update after them, over the RSS before it. The peak is
the kernel's VmHWM, reset through /proc/self/clear_refs just before each phase (a fresh process alone would
count the build's own transients). Before anything, one step of a tiny model initialises the libraries, so the
one-time state they keep (about 13 MiB here, not tensors) is not in the measurement. Prints one JSON line.
"""
import json
import os
import sys
import tempfile


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return False
    return status("VmHWM") <= status("VmRSS") + (1 << 20)


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(1)
    from harmodt_fast.batch import SyntheticSampler
    from harmodt_fast.config import HarmoDTConfig
    from harmodt_fast.trainer import Trainer

    if args.get("warm_up", True):  # one-time library state (oneDNN, OpenMP, autograd) is not what the plan counts
        tiny = HarmoDTConfig.from_preset("tiny", num_tasks=2, schedule=args["config"]["schedule"],
                                         precision=args["config"]["precision"], dropout=args["config"]["dropout"])
        Trainer(tiny, SyntheticSampler(tiny), tempfile.mkdtemp(), torch.device("cpu"), "synthetic")._train_step()
    config = HarmoDTConfig(**args["config"])
    trainer = Trainer(config, SyntheticSampler(config), tempfile.mkdtemp(), torch.device("cpu"), "synthetic")
    baseline = status("VmRSS")
    was_reset = reset_peak()
    for _ in range(args.get("steps", 2)):
        trainer._train_step()
    result = {"baseline": baseline, "increase": status("VmHWM") - baseline, "peak_was_reset": was_reset,
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if args.get("then_mask_update"):  # the same process, after the steps: RSS is back to the persistent state
        baseline = status("VmRSS")
        result["mask_update_peak_was_reset"] = reset_peak()
        trainer._mask_update()
        result["mask_update_increase"] = status("VmHWM") - baseline
    print(json.dumps(result))


if __name__ == "__main__":
    main()
