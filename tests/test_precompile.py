"""harmodt_fast.benchmarks.precompile: Triton kernels compiled for sm_90 without a GPU, through the JIT path the GPU run
takes (a stand-in sm_90 driver, compile-only launches), into a cache that travels: pruned to what a cache hit
reads, relocatable, and found again by a fresh process that launches the same workload (no new compile). Whether
the GPU machine's Triton accepts it is decided there (same Triton version needed); this checks everything short
of that."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvidia_backend_present() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except ModuleNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _nvidia_backend_present(), reason="this Triton build has no CUDA backend")


def precompile(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "harmodt_fast.benchmarks.precompile", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_a_carried_cache_is_found_by_a_fresh_process(tmp_path):
    first = tmp_path / "here"
    res = precompile("--quick", "--workers", "1", "--cache", str(first))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    record = json.load(open(first / "precompiled.json"))
    assert record["kernels"] >= 4 and record["target"] == "cuda sm_90"
    assert record["new"] == record["compiled"] == record["kernels"]
    names = {os.path.basename(p) for p in glob.glob(str(first / "*" / "*.cubin"))}
    assert {"_masked_mm_kernel.cubin", "_masked_dw_kernel.cubin", "_attn_fwd_kernel.cubin"} <= names
    leftovers = [p for p in glob.glob(str(first / "*" / "*")) if not p.endswith((".json", ".cubin"))]
    assert not leftovers  # pruned to what a cache hit reads

    moved = tmp_path / "there"  # the cache as it arrives elsewhere
    shutil.copytree(first, moved)
    res = precompile("--relocate", "--cache", str(moved))
    assert res.returncode == 0 and f"{record['kernels']} cache entries relocated" in res.stdout
    for grp in glob.glob(str(moved / "*" / "__grp__*.json")):
        paths = json.load(open(grp))["child_paths"].values()
        assert paths and all(p.startswith(str(moved)) and os.path.exists(p) for p in paths)

    shutil.rmtree(first)  # only the moved copy is left to be found
    again = precompile("--quick", "--workers", "1", "--cache", str(moved))
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.load(open(moved / "precompiled.json"))
    assert second["kernels"] == record["kernels"]
    assert second["compiled"] == 0 and second["new"] == 0  # every launch was a cache hit: nothing compiled again
