import os
import zlib

import pytest
import torch


@pytest.fixture(scope="session")
def cpp_ext():
    """The C++ extension, built (or loaded) once per test session. Failing to build is a test failure here:
    CI has a compiler, so a silent fallback to torch would hide a broken build."""
    from harmodt_fast._ext import extension_error, load_extension

    mod = load_extension()
    assert mod is not None, f"C++ extension did not build: {extension_error()}"
    return mod


@pytest.fixture
def rng():
    """A fresh random generator per test, seeded from the test's name (reproducible, different per test)."""
    # crc32, not hash(): str hashes change per process, which made failures impossible to reproduce
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()) % (2**31)
    return torch.Generator().manual_seed(seed)


# Triton kernels run on the CPU through the interpreter when there is no GPU. The variable must be set before
# triton is first imported (harmodt_fast itself never imports triton at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
