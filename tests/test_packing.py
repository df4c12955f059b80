import pytest
import torch

import harmodt_fast as hf
from harmodt_fast.ops.packing import words_for


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("T,P", [(1, 1), (3, 31), (2, 32), (5, 33), (7, 1000), (4, 0)])
def test_round_trip(backend, T, P, rng, cpp_ext):
    dense = torch.rand(T, P, generator=rng) < 0.5
    packed = hf.ops.pack_masks(dense, backend=backend)
    assert hf.ops.last_backend("pack_masks") == backend
    assert packed.dtype == torch.int32 and packed.shape == (T, words_for(P))
    assert torch.equal(hf.ops.unpack_masks(packed, P, backend=backend), dense)
    assert hf.ops.last_backend("unpack_masks") == backend


def test_bit_layout_and_backends_agree(rng, cpp_ext):
    dense = torch.zeros(2, 70, dtype=torch.bool)
    dense[0, 0] = dense[0, 31] = dense[1, 33] = dense[1, 69] = True
    for backend in ("torch", "cpp"):
        packed = hf.ops.pack_masks(dense, backend=backend)
        assert packed[0].tolist() == [1 | -(2**31), 0, 0]  # bit 31 set: the word is negative as int32
        assert packed[1].tolist() == [0, 2, 1 << 5]
    dense = torch.rand(6, 12345, generator=rng) < 0.3
    assert torch.equal(hf.ops.pack_masks(dense, backend="cpp"), hf.ops.pack_masks(dense, backend="torch"))


def test_auto_uses_cpp_on_cpu(cpp_ext):
    from harmodt_fast._ext import extension_origin

    assert extension_origin() in ("prebuilt", "jit")
    print(f"C++ extension: {extension_origin()}")
    hf.ops.pack_masks(torch.ones(2, 40, dtype=torch.bool))
    assert hf.ops.last_backend("pack_masks") == "cpp"
    assert "cpp" in hf.ops.available_backends()


def test_bad_input():
    with pytest.raises(ValueError, match="bool tensor"):
        hf.ops.pack_masks(torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs 2"):
        hf.ops.unpack_masks(torch.zeros(2, 3, dtype=torch.int32), 40)
    with pytest.raises(RuntimeError, match="no triton implementation"):
        hf.ops.pack_masks(torch.ones(2, 3, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        hf.ops.pack_masks(torch.ones(2, 3, dtype=torch.bool), backend="cuda")
