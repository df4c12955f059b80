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
