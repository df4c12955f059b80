"""Loads the C++ extension `harmodt_fast._C`.

Order: the module built by setup.py; otherwise the same sources compiled once with ninja through
`torch.utils.cpp_extension.load` into a cache folder keyed on the sources and the torch version. Nothing is
compiled at `import harmodt_fast`; the first op that asks for the "cpp" backend triggers it. When no compiler is
available the reason is kept, the package keeps working on the torch backend, and asking for "cpp" explicitly
raises a RuntimeError with that reason. Checks registered with `add_load_check` (the harmony score ids) run once as
the module loads; a module that fails one is treated like one that could not be built.
"""
from __future__ import annotations

import glob
import hashlib
import os
import threading
import warnings

_lock = threading.Lock()
_module = None
_error: str | None = None
_loaded_from: str | None = None
_checks: list = []


def _source_dir() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if glob.glob(os.path.join(cand, "*.cpp")):
            return cand
    return None


def cache_dir() -> str:
    base = os.environ.get("HARMODT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "harmodt_fast"
    )
    return base


def _jit_build():
    import torch
    from torch.utils.cpp_extension import load

    src = _source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/*.cpp) are not shipped with this installation")
    sources = sorted(glob.glob(os.path.join(src, "*.cpp")))
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(glob.glob(os.path.join(src, "*"))):
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + f.read())
    build_dir = os.path.join(cache_dir(), "ext", digest.hexdigest()[:16])
    os.makedirs(build_dir, exist_ok=True)
    return load(
        name="harmodt_fast_C",
        sources=sources,
        extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[src],
        build_directory=build_dir,
        verbose=os.environ.get("HARMODT_FAST_VERBOSE_BUILD") == "1",
    )


def load_extension():
    """Returns the extension module, or None when it cannot be built here (see `extension_error()`)."""
    global _module, _error, _loaded_from
    if _module is not None or _error is not None:
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        if os.environ.get("HARMODT_FAST_DISABLE_CPP") == "1":
            _error = "disabled by HARMODT_FAST_DISABLE_CPP=1"
            return None
        try:
            import torch  # noqa: F401  (loads libc10 and friends, which _C links against)

            from harmodt_fast import _C  # built by setup.py

            _module, _loaded_from = _C, "prebuilt"
        except ImportError:
            try:
                _module, _loaded_from = _jit_build(), "jit"
            except Exception as exc:  # no compiler, no ninja, a build error: keep the reason, use torch
                _error = f"the C++ extension could not be built: {type(exc).__name__}: {str(exc).strip()[-2000:]}"
                warnings.warn(f"harmodt_fast: {_error}; falling back to the torch backend", RuntimeWarning)
        for check in _checks:
            _apply_check(check)
        if _module is not None:
            _register_fakes()
    return _module


def add_load_check(check) -> None:
    """Registers `check(module)` -> None, or the reason the extension does not fit the Python side (say, a stale
    prebuilt module): then the cpp backend is unavailable with that reason, as when the build fails, rather than
    raising on import, so that the package keeps working on torch. Runs as the extension loads (now, if it has)."""
    _checks.append(check)
    if _module is not None:
        with _lock:
            _apply_check(check)


def _apply_check(check) -> None:
    global _module, _error
    if _module is None:
        return
    reason = check(_module)
    if reason is not None:
        _module, _error = None, f"the C++ extension ({_loaded_from}) does not fit this package: {reason}"
        warnings.warn(f"harmodt_fast: {_error}; falling back to the torch backend", RuntimeWarning)


def _register_fakes() -> None:
    """Shape-only (fake) kernels of the C++ custom ops (csrc/masked_linear.cpp), registered once as the extension
    loads, so that torch.compile traces the cpp backend (registering inside a traced call would fail)."""
    import torch

    torch.library.register_fake("harmodt_fast::masked_weight")(  # bits [W]: W ⊙ M; bits [T, W]: [T, *W.shape]
        lambda weight, bits: weight.new_empty((*bits.shape[:-1], *weight.shape)))
    torch.library.register_fake("harmodt_fast::masked_accumulate_")(lambda dw, grad, bits: None)
    torch.library.register_fake("harmodt_fast::dropout")(
        lambda x, seed, p: (torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)))


def extension_error() -> str | None:
    load_extension()
    return _error


def extension_origin() -> str | None:
    """'prebuilt' (setup.py), 'jit' (compiled on first use) or None."""
    load_extension()
    return _loaded_from
