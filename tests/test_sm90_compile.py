"""Every kernel compiles for the H100/H200 (sm_90) without a GPU: Triton's CUDA backend lowers to PTX and runs
ptxas on the host (harmodt_fast.kernels.compile_check). Catches what the interpreter cannot: type and layout
errors, unsupported ops, shared-memory overflow; and checks that the matmuls became Hopper wgmma instructions with
pipelined (asynchronous) loads and no register spills in each kernel's configs[0] (what the pinned mode,
HARMODT_FAST_AUTOTUNE=0, launches), under CI's Triton and, when HARMODT_TRITON_COMPAT names a folder holding it, the
GPU machine's. Also: the launch grids stay within CUDA's per-axis limits."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest


def _nvidia_backend_present() -> bool:
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ModuleNotFoundError:
        return False


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a folder holding another Triton (scripts/test.sh installs the GPU machine's, 3.6.0, there): the compile check
# then runs under it too, with that folder first on the subprocess's path
COMPAT = os.environ.get("HARMODT_TRITON_COMPAT")


def run_python(args, compat=None, timeout=600):
    """A Python subprocess without the interpreter (compile_check needs the real compiler), finding this checkout
    and, with `compat`, the Triton in that folder first."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (compat, env.get("PYTHONPATH"), ROOT) if p)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("compat", [None] + ([COMPAT] if COMPAT else []), ids=lambda c: "compat" if c else "ci")
def test_every_kernel_compiles_for_sm90(compat):
    if compat is None and not _nvidia_backend_present():
        pytest.skip("this Triton build has no CUDA backend")
    if compat is not None:  # a set variable must work: an unusable folder fails here rather than skipping
        probe = run_python(["-c", "import triton, triton.backends.nvidia.compiler; print(triton.__file__)"], compat)
        assert probe.returncode == 0, f"HARMODT_TRITON_COMPAT={compat}: no usable Triton there\n{probe.stderr[-2000:]}"
        found = os.path.realpath(probe.stdout.strip())
        assert found.startswith(os.path.realpath(compat)), f"HARMODT_TRITON_COMPAT={compat}: Triton came from {found}"
    proc = run_python(["-m", "harmodt_fast.kernels.compile_check", "--arch", "90"], compat)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = [r for r in lines if "variant" in r]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n".join(f"{r['variant']}: {r['error']}" for r in failed)
    assert proc.returncode == 0 and len(rows) >= 15, proc.stderr[-3000:]
    for r in rows:
        assert r["pinned"], r  # the default variants are what HARMODT_FAST_AUTOTUNE=0 launches
        if r["variant"].startswith(("masked_mm", "masked_dw", "masked_chain", "attention", "qkv_attention")):
            assert r["wgmma"], r
            assert r["async_copies"] > 0, r  # loads pipelined into shared memory
            if r.get("spill_bytes") is not None:
                assert r["spill_bytes"] == 0, r


# every autotuned kernel, the blocks/warps/stages of its configs[0], and those of compile_check's default variants
_PINNED_PROBE = """
import json
from triton.runtime.autotuner import Autotuner
from harmodt_fast.kernels import compile_check, masked_attention, masked_linear, masked_mlp
tuned = {n: k for m in (masked_attention, masked_linear, masked_mlp) for n, k in vars(m).items()
         if isinstance(k, Autotuner)}
first = {n: k.configs[0] for n, k in tuned.items()}
used = {n: [] for n in tuned}
for label, kernel, sig, consts, warps, stages, pinned in compile_check._variants(False):
    for n, k in tuned.items():
        if kernel is k:
            used[n].append([{b: consts[b] for b in first[n].kwargs}, warps, stages])
print(json.dumps({n: dict(first=[c.kwargs, c.num_warps, c.num_stages], used=used[n]) for n, c in first.items()}))
"""


@pytest.mark.skipif(not _nvidia_backend_present(), reason="this Triton build has no CUDA backend")
def test_compile_check_defaults_are_each_kernels_first_config():
    """HARMODT_FAST_AUTOTUNE=0 launches only configs[0] of each kernel (kernels/_common.py: tuned), so that is what
    the default compile check must compile: no block sizes restated by hand."""
    proc = run_python(["-c", _PINNED_PROBE], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kernels = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"_masked_mm_kernel", "_masked_dw_kernel", "_masked_chain_kernel", "_attn_fwd_kernel", "_attn_bwd_kernel",
            "_qkv_attn_kernel"} <= set(kernels)
    for name, k in kernels.items():
        assert k["used"], f"compile_check has no variant of {name}"
        for used in k["used"]:
            assert used == k["first"], (name, used, k["first"])


def test_launch_grids_fit_cuda_limits():
    """A CUDA grid takes 2**31 - 1 programs on axis 0 but only 65535 on axes 1 and 2, which the interpreter does
    not enforce: the grids of the largest launches stay within both."""
    import triton

    from harmodt_fast.kernels import masked_attention as ka
    from harmodt_fast.kernels import masked_linear as kl
    from harmodt_fast.kernels._common import task_tile_grid

    def fits(grid):
        assert 0 < grid[0] < 2**31 and all(0 < g <= 65535 for g in grid[1:]), grid

    batch_heads = 160 * 32 * 16  # 160 tasks x 32 sequences x 16 heads
    for block in (16, 32, 64, 128):
        fits(ka.attention_fwd_grid({"BLOCK_M": block}, batch_heads, 1024))
        fits(task_tile_grid(2**31 // 64 - 1, 320, block, triton.cdiv(64, 32)))  # as many rows as int32 indices allow
    for task_grads in (False, True):
        for sms in (4, 132):
            for n in (64, 4096):
                fits(kl.dw_schedule(2**31 // n - 1, n, n, 320, task_grads, sms)[0])
