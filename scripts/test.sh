#!/usr/bin/env bash
# Installs harmodt_fast with its test extras into the active Python (a venv is created when none is active)
# and runs the test suite. The C++ extension is compiled during the install; the Triton kernels are tested
# on the CPU through the Triton interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then python3 -m venv .venv && . .venv/bin/activate; fi
python -m pip install -q --upgrade pip setuptools wheel
# the CPU build of torch (a bare `torch` requirement would pull several GB of CUDA packages)
python -m pip install -q "torch==2.13.0"
python -m pip install -q --no-build-isolation ".[test]"
# the GPU machine's Triton (3.6.0) beside this one, in a side folder: tests/test_sm90_compile.py compiles the
# pinned kernel variants under it too (CI's newer Triton can hide a spill or a failure that 3.6.0 has)
[ -d .triton36/triton ] || python -m pip install -q --no-deps --target .triton36 "triton==3.6.0"
export HARMODT_TRITON_COMPAT="$PWD/.triton36"
cd tests && python -m pytest -q "$@"
