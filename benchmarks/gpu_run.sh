#!/usr/bin/env bash
# The first GPU run, in two commands of at most 6 minutes each on a fresh H200 where nothing is cached:
#
#   bash benchmarks/gpu_run.sh 1     # environment record; correctness at pinned kernel configs
#                                    # (HARMODT_FAST_AUTOTUNE=0: one compile per kernel variant); the paper-shape
#                                    # training step and mask update, every path on the GPU
#   bash benchmarks/gpu_run.sh 2     # the autotuned kernel tables; the scale sweep (large preset, T = 50, 160,
#                                    # as far as its 60 s get); the batched MT50 evaluation when the Meta-World
#                                    # wheels travel in .whl/ (or metaworld is installed)
#   bash benchmarks/gpu_run.sh 1 --dry-run   # the same stages on the CPU Triton interpreter at tiny shapes (CI)
#
# Results land in $OUT (default benchmarks/results/gpu_run), each stage's files as soon as the stage ends. Every
# stage runs under `timeout -s INT`, so pytest and the benchmarks stop like on Ctrl-C and still write their
# reports. Compiled kernels are kept in .triton-cache/ inside the tree (ignored by git): a rerun on the same warm
# machine reuses them. Stage limits (seconds) can be changed with T_TESTS, T_TRAIN, T_KERNELS, T_SCALE, T_EVAL.
set -uo pipefail
cd "$(dirname "$0")/.."
CMD="${1:-}"
DRY=0
[ "${2:-}" = "--dry-run" ] && DRY=1
if [ "$CMD" != 1 ] && [ "$CMD" != 2 ]; then
  echo "usage: bash benchmarks/gpu_run.sh 1|2 [--dry-run]" >&2
  exit 2
fi
OUT="${OUT:-benchmarks/results/gpu_run}"
mkdir -p "$OUT"
PY="$(command -v python || command -v python3)"
# A pip-installed harmodt_fast (CI, a user's machine) carries its compiled C++ extension: use it rather than the
# tree, which would compile the extension again on first use. A bare tree (the GPU machine) runs from the source.
if (cd / && "$PY" -c "import harmodt_fast") 2>/dev/null; then
  export PYTHONSAFEPATH=1 PYTHONPATH="$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # no cwd on sys.path
else
  export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
fi
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
  unset TRITON_INTERPRET
  DEV=cuda
fi
start=$(date +%s)
status=0
# pyproject's addopts name pytest-benchmark's flag; without the plugin, replace them
PYTEST_EXTRA=()
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST_EXTRA=(-o "addopts=-ra")

stage() {  # stage NAME LIMIT_S COMMAND...: runs under a SIGINT time-out, logs to $OUT/NAME.log, records the status
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - start ))s elapsed)"
  timeout -s INT -k 20 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  echo "$name exit status: $rc (124: stopped by the time limit; what finished is in $OUT)" | tee -a "$OUT/$name.log"
  echo "$name $rc $(( $(date +%s) - start ))" >> "$OUT/stages.txt"
  [ "$status" -eq 0 ] && status=$rc
  return 0
}

if [ "$CMD" = 1 ]; then
  : > "$OUT/stages.txt"
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown), $(git status --short 2>/dev/null | wc -l) changed files"
    echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU interpreter, tiny shapes)' || echo GPU)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || true
    "$PY" - <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing:", e)
print("cuda available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
  } > "$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"
  export HARMODT_FAST_AUTOTUNE=0 HARMODT_POISON=1
  if [ "$DRY" = 1 ]; then
    TESTS=(tests/test_kernels_gpu.py tests/test_cuda_step.py
           "tests/test_kernels_masked_linear.py::test_task_grads_as_a_slice_of_one_task_by_parameter_buffer")
    TRAIN=(--device cpu --preset tiny --tasks 2 --seconds 0 --min-steps 1 --warmup 1
           --rows ours,prompt-dt,published,mask-update --set layers=1 --set hidden=32 --set mlp_hidden=64 --set context=3 --set batch_per_task=2 --set backend=triton)
  else
    # the interpreter-era kernel tests run compiled on the GPU too; the sm_90 compile checks stay in CPU CI
    TESTS=(tests/test_kernels_gpu.py tests/test_kernels_masked_linear.py tests/test_kernels_masked_mlp.py
           tests/test_kernels_masked_attention.py tests/test_kernels_model.py tests/test_cuda_step.py)
    TRAIN=(--device cuda --preset paper --tasks 50 --seconds 8)
  fi
  stage tests "${T_TESTS:-200}" "$PY" -m pytest -q -p no:cacheprovider "${PYTEST_EXTRA[@]}" -rA \
      --junitxml="$OUT/tests.xml" --durations=15 "${TESTS[@]}"
  stage train_step "${T_TRAIN:-130}" "$PY" benchmarks/bench_train_step.py "${TRAIN[@]}" --out "$OUT"
else
  if [ "$DRY" = 1 ]; then KERNELS=(--smoke); else KERNELS=(); fi
  stage kernels "${T_KERNELS:-220}" "$PY" benchmarks/bench_kernels.py "${KERNELS[@]}" --out "$OUT"
  # the mask update and the training step against the task count (large preset at T = 50, 160 on the GPU)
  if [ "$DRY" = 1 ]; then SCALE=(--device cpu --sweep-preset tiny --tasks 2); else
    SCALE=(--device cuda --sweep-preset large --tasks 50,160); fi
  stage scale "${T_SCALE:-60}" "$PY" benchmarks/bench_scale.py --only sweep "${SCALE[@]}" --out "$OUT/scale"
  if ! "$PY" -c "import metaworld" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links .whl metaworld gymnasium >> "$OUT/eval.log" 2>&1 || true
  fi
  if "$PY" -c "import metaworld" 2>/dev/null; then
    if [ "$DRY" = 1 ]; then
      EVAL=(--device cpu --tasks reach-v3 --steps 2 --episodes 1 --workers 0 --skip-baseline --backend cpp)
    else
      EVAL=(--device cuda --steps 500 --baseline-tasks 5 --baseline-steps 200)
    fi
    stage eval "${T_EVAL:-90}" "$PY" benchmarks/bench_evaluation.py "${EVAL[@]}" --out "$OUT"
  else
    echo "eval skipped: metaworld is not installed and no wheels in .whl/" | tee "$OUT/eval.log"
  fi
fi
echo "command $CMD: elapsed $(( $(date +%s) - start )) s; results in $OUT"
exit "$status"
