#!/usr/bin/env bash
# The kernels on a CUDA machine (written for the H200), in one command:
#   1. environment record (GPU, driver, torch / triton / CUDA versions, commit)
#   2. correctness: tests/test_kernels_gpu.py (real shapes, bf16/fp16/fp32 against an fp64 reference, every kernel
#      output poisoned with NaN first) and the interpreter-era kernel tests, now compiled for the GPU; Triton
#      JIT-compiles and autotunes every kernel here (that is the build step: nothing else needs compiling)
#   3. the timing table: benchmarks/bench_kernels.py (ours vs cuBLAS vs materialise-per-task eager/compiled vs
#      grouped matmul, attention vs SDPA, MLP fused vs unfused), written as kernels_<device>_<date>.json/.md
# Everything lands under $OUT (default benchmarks/results). Usage:
#   OUT=/path bash benchmarks/gpu_run.sh            # all stages
#   OUT=/path bash benchmarks/gpu_run.sh test       # or: bench
# TEST_TIMEOUT / BENCH_TIMEOUT (seconds) bound the two stages (defaults for "all": 330 for the tests, and the
# benchmark gets what is left of 590 s, to fit a 10-minute slot; each stage alone gets 580).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
STAGE="${1:-all}"
mkdir -p "$OUT"
PY="$(command -v python || command -v python3)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if [ "$STAGE" = all ]; then T_TEST="${TEST_TIMEOUT:-330}"; T_BENCH="${BENCH_TIMEOUT:-260}"; else
  T_TEST="${TEST_TIMEOUT:-580}"; T_BENCH="${BENCH_TIMEOUT:-580}"; fi
start=$(date +%s)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown) $(git status --short 2>/dev/null | wc -l) changed files"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
  "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing:", e)
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("grouped_mm", hasattr(torch, "_grouped_mm"))
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if [ "$STAGE" = all ] || [ "$STAGE" = test ]; then
  # pyproject's addopts name pytest-benchmark's flag; without the plugin, replace them
  extra=()
  "$PY" -c "import pytest_benchmark" 2>/dev/null || extra=(-o "addopts=-ra")
  HARMODT_POISON=1 timeout "$T_TEST" "$PY" -m pytest -q -p no:cacheprovider "${extra[@]}" -rA \
      --junitxml="$OUT/kernels_tests.xml" --durations=15 \
      tests/test_kernels_gpu.py tests/test_kernels_masked_linear.py tests/test_kernels_masked_mlp.py \
      tests/test_kernels_masked_attention.py tests/test_kernels_model.py tests/test_kernels_compile.py 2>&1 | tee "$OUT/kernels_tests.log"
  status=${PIPESTATUS[0]}
  echo "tests exit status: $status (124 = stopped by the time limit)" | tee -a "$OUT/kernels_tests.log"
fi
if [ "$STAGE" = all ] || [ "$STAGE" = bench ]; then
  left="$T_BENCH"
  if [ "$STAGE" = all ]; then left=$(( T_BENCH + T_TEST - ($(date +%s) - start) )); fi
  if [ "$left" -lt 60 ]; then left=60; fi
  timeout "$left" "$PY" benchmarks/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.log"
  bstatus=${PIPESTATUS[0]}
  echo "benchmark exit status: $bstatus (124 = stopped by the time limit; the tables hold what finished)" \
      | tee -a "$OUT/bench_kernels.log"
  [ "$status" -eq 0 ] && status=$bstatus
fi
echo "elapsed $(( $(date +%s) - start )) s; results in $OUT"
exit "$status"
