"""How many distinct Triton kernel variants a command compiles: what the first GPU run's compile time grows with.

    python -m harmodt_fast.benchmarks.kernel_variants --log variants.jsonl -- -m pytest -q tests/test_gpu_kernels.py
    python -m harmodt_fast.benchmarks.kernel_variants --log variants.jsonl -- \
        -m harmodt_fast.benchmarks.train_step --device cpu ...
    python -m harmodt_fast.benchmarks.kernel_variants --count variants.jsonl [--cache DIR]

Under the Triton interpreter (the dry run) nothing is compiled, so every launch is keyed here as Triton's JIT
would key its compile: the kernel, its constexprs and launch options, each tensor's dtype and 16-byte alignment,
each int's specialisation (== 1, a multiple of 16, 64-bit). The command runs in this process (runpy) and appends
one JSON line per new variant to the log. Subprocesses the command starts are not seen. The interpreter's
autotune configs and tiny shapes differ from a GPU's, so the count is a proxy; on a GPU, `--cache` counts the
compiled kernels (.cubin) in a Triton cache folder, which is the real figure.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import runpy
import sys


def _spec(value):
    import torch

    if isinstance(value, torch.Tensor):
        return f"*{str(value.dtype).replace('torch.', '')}{'' if value.data_ptr() % 16 else ':16'}"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if value == 1:
            return "1"
        return ("i64" if abs(value) >= 2**31 else "i32") + (":16" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    return repr(value) if value is None else type(value).__name__


def install(log_path: str) -> None:
    """Records every new interpreted kernel variant launched in this process into `log_path` (JSON lines)."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: set = set()
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        names = [p.name for p in params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        key = {"kernel": self.fn.__name__}
        for p in params:
            if p.name in bound:
                constexpr = "constexpr" in str(p.annotation)
                key[p.name] = bound[p.name] if constexpr and isinstance(bound[p.name], (int, float, bool, str)) \
                    else _spec(bound[p.name])
        key.update({k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs})
        line = json.dumps(key, sort_keys=True, default=str)
        if line not in seen:
            seen.add(line)
            with open(log_path, "a") as f:
                f.write(line + "\n")
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run


def count(log_path: str | None = None, cache: str | None = None) -> dict:
    """{"variants": distinct logged variants, "by_kernel": {...}} and/or {"compiled": .cubin files in `cache`}."""
    out: dict = {}
    if log_path and os.path.exists(log_path):
        lines = {line.strip() for line in open(log_path) if line.strip()}
        by_kernel: dict[str, int] = {}
        for line in lines:
            name = json.loads(line)["kernel"]
            by_kernel[name] = by_kernel.get(name, 0) + 1
        out.update(variants=len(lines), by_kernel=dict(sorted(by_kernel.items())))
    if cache and os.path.isdir(cache):
        cubins = glob.glob(os.path.join(cache, "**", "*.cubin"), recursive=True)
        out["compiled"] = len(cubins)
        by_kernel = {}
        for path in cubins:
            name = os.path.basename(path)[: -len(".cubin")]
            by_kernel[name] = by_kernel.get(name, 0) + 1
        out["compiled_by_kernel"] = dict(sorted(by_kernel.items()))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", help="JSON-lines file of the variants (appended)")
    ap.add_argument("--count", help="print the counts of this log as JSON")
    ap.add_argument("--cache", help="with --count: also count the .cubin files in this Triton cache")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.count or (args.cache and not command):
        print(json.dumps(count(args.count, args.cache)))
        return 0
    if not (args.log and command):
        ap.error("give --log FILE -- COMMAND..., or --count FILE")
    if os.environ.get("TRITON_INTERPRET") == "1":
        install(os.path.abspath(args.log))
    if command[0] == "-m":
        sys.argv = command[1:]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        sys.path.insert(0, os.path.dirname(os.path.abspath(command[0])))
        runpy.run_path(command[0], run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
