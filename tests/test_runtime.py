"""harmodt_fast.runtime: device specs with and without an index name the same device ("cuda" is "cuda:0" when
that is the current device), so callers may pass either; a mask on another device is still refused by name."""
import pytest
import torch

from harmodt_fast.ops.masked_attention import attention_mask_3d
from harmodt_fast.runtime import same_device


@pytest.mark.parametrize("a,b", [("cpu", "cpu:0"), ("cpu:0", "cpu"), ("cpu", torch.device("cpu")),
                                 (torch.device("cpu", 0), "cpu")])
def test_same_device_with_and_without_index(a, b):
    assert same_device(a, b)


def test_different_devices_differ():
    assert not same_device("cpu", "meta")
    assert not same_device("cuda:0", "cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_without_index_is_the_current_device():
    assert same_device("cuda", f"cuda:{torch.cuda.current_device()}")
    assert same_device(torch.zeros(1, device="cuda").device, "cuda")


@pytest.mark.parametrize("spec", ["cpu", "cpu:0", torch.device("cpu"), torch.device("cpu", 0)])
def test_attention_mask_accepts_any_spelling_of_its_device(spec):
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    assert attention_mask_3d(mask, 3, 4, spec).shape == (3, 4, 4)


def test_attention_mask_on_another_device_is_refused():
    mask = torch.ones(4, 4, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        attention_mask_3d(mask, 3, 4, "cpu")


def _spin_count_seen(code: str, **env) -> str:
    """GOMP_SPINCOUNT as a fresh interpreter running `code` sees it (the CLI's and workers' situation)."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('GOMP_SPINCOUNT'))"],
                         env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_cpu_wait_policy_is_set_before_torch_loads():
    from harmodt_fast.threads import SPIN_COUNT

    # imported before torch (the CLI, the demo, their workers): a short spin; the main module too
    assert _spin_count_seen("import harmodt_fast, torch") == str(SPIN_COUNT)
    assert _spin_count_seen("import harmodt_fast.cli") == str(SPIN_COUNT)
    # the user's own policy wins; after torch it would be too late to matter, so it is left alone
    assert _spin_count_seen("import harmodt_fast", OMP_WAIT_POLICY="ACTIVE") == "None"
    assert _spin_count_seen("import harmodt_fast", GOMP_SPINCOUNT="123") == "123"
    assert _spin_count_seen("import torch, harmodt_fast") == "None"
