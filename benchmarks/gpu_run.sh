#!/usr/bin/env bash
# The first GPU run: ONE command, at most 9 minutes on a fresh machine, the most valuable numbers first.
#
#   bash benchmarks/gpu_run.sh              # on the GPU machine (results in $OUT, default benchmarks/results/gpu_run)
#   bash benchmarks/gpu_run.sh --dry-run    # every stage on the CPU Triton interpreter at tiny shapes (CI)
#   bash benchmarks/gpu_run.sh --plan       # print the stages and their time limits, run nothing
#
# Stages, in this order, each under its own time limit (SIGINT, so pytest and the benchmarks stop as on Ctrl-C
# and keep what they wrote), each folded into the summary before the next starts:
#   env            the environment record and the ceilings MEASURED on this device (bf16/fp32 matmul, copy)
#   tests          kernel correctness at paper shapes, forward and backward, against the reference: the GPU-only
#                  tests first (kernel outputs NaN-poisoned)
#   train_step     the paper MT50 training step: ours, the published procedure, the unmasked prompt-dt model at
#                  the same batch, one mask update each way
#   profile        one profiled step of ours: host and device time, launches, the top 15 kernels
#   kernels        masked matmul vs cuBLAS dense vs materialising (paper and large shapes), attention, MLP
#   scale          large preset at 50 and 160 tasks: training step and mask update
#   eval           batched MT50 evaluation, when metaworld is installed or its wheels travel in .whl/
#   train_compiled the torch.compile'd training steps, only with the time that is left
# Only the tests stage poisons kernel outputs. Kernels run their pinned configs[0] (HARMODT_FAST_AUTOTUNE=0): one
# compile per variant. What comes back: $OUT/summary.json, $OUT/summary.md, $OUT/run.log, $OUT/tests.xml (4 files;
# the stages' own files stay in $WORK). Compiled kernels go to $TRITON_CACHE_DIR (default .triton-cache/ here).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--dry-run | --plan]" >&2; exit 2 ;;
esac
BUDGET=540                       # seconds for the whole command: 9 minutes
# name:limit_s; the fixed stages sum to at most BUDGET - 40 (room for kill grace and the summaries)
STAGES=(env:35 tests:120 train_step:100 profile:30 kernels:110 scale:60 eval:45)
OPTIONAL=train_compiled          # runs with what is left, if at least 45 s
if [ "$MODE" = plan ]; then
  for s in "${STAGES[@]}"; do echo "${s%%:*} ${s##*:}"; done
  echo "$OPTIONAL rest"
  echo "budget $BUDGET"
  exit 0
fi

OUT="${OUT:-benchmarks/results/gpu_run}"
WORK="${WORK:-${TMPDIR:-/tmp}/harmodt_gpu_run}"
rm -rf "$WORK"
mkdir -p "$OUT" "$WORK"
rm -f "$OUT/summary.json" "$OUT/summary.md" "$OUT/run.log" "$OUT/tests.xml"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
PY="$(command -v python || command -v python3)"
# A pip-installed harmodt_fast (CI, a user's machine) carries its compiled C++ extension: use it rather than the
# tree. A bare tree (the GPU machine) runs from the source. Either way the benchmarks run as
# `python -m harmodt_fast.benchmarks.NAME`.
if (cd / && "$PY" -c "import harmodt_fast") 2>/dev/null; then
  export PYTHONSAFEPATH=1  # no cwd on sys.path
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
BENCH=harmodt_fast.benchmarks
# the C++ extension is not built here (a ninja build would cost a minute of the GPU's time): CPU-side ops fall
# back to plain PyTorch
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}" HARMODT_FAST_AUTOTUNE=0 PYTHONUNBUFFERED=1 \
  HARMODT_FAST_DISABLE_CPP=1
unset HARMODT_POISON
if [ "$MODE" = dry ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
  unset TRITON_INTERPRET
  DEV=cuda
fi
# A Triton cache compiled without a GPU (harmodt_fast.benchmarks.precompile) may travel in $TRITON_CACHE_DIR: point its
# entries at where it is now, and count them, so the summary tells what the GPU still had to compile.
if ls "$TRITON_CACHE_DIR"/*/*.cubin >/dev/null 2>&1; then
  "$PY" -m $BENCH.precompile --cache "$TRITON_CACHE_DIR" --relocate
fi
ls "$TRITON_CACHE_DIR"/*/*.cubin 2>/dev/null | wc -l > "$WORK/cache_carried.txt"
cp "$TRITON_CACHE_DIR/precompiled.json" "$WORK/" 2>/dev/null
# Launches of interpreted kernels are counted by variant (dry run); on the GPU the cache is counted at the end.
RUN=("$PY" -m $BENCH.kernel_variants --log "$WORK/variants.jsonl" --)
PYTEST_EXTRA=()
"$PY" -c "import pytest_benchmark" 2>/dev/null || PYTEST_EXTRA=(-o "addopts=-ra")  # addopts name its flag
start=$(date +%s)
status=0

summarise() {
  "$PY" -m $BENCH.gpu_summary --work "$WORK" --out "$OUT" --cache "$TRITON_CACHE_DIR" \
    || echo "gpu_summary failed (the stages' files are in $WORK)"
}

skip() {  # skip NAME WHY: records a stage that did not run (exit 125)
  local t=$(( $(date +%s) - start ))
  echo "== $1 skipped: $2"
  echo "$1 125 $t $t 0 0" >> "$WORK/stages.tsv"
}

stage() {  # stage NAME LIMIT_S POISON COMMAND...: runs under a SIGINT time limit that never passes the budget
  local name="$1" limit="$2" poison="$3"
  shift 3
  local t0=$(( $(date +%s) - start ))
  local left=$(( BUDGET - 15 - t0 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    skip "$name" "the budget is spent (${t0}s elapsed)"
    return 0
  fi
  echo "== $name (limit ${limit}s, ${t0}s elapsed)"
  if [ "$poison" = 1 ]; then
    HARMODT_POISON=1 timeout -s INT -k 5 "$limit" "$@"
  else
    timeout -s INT -k 5 "$limit" "$@"
  fi
  local rc=$?
  echo "== $name exit status: $rc (124: stopped by its time limit; what finished is kept)"
  echo "$name $rc $t0 $(( $(date +%s) - start )) $limit $poison" >> "$WORK/stages.tsv"
  [ "$status" -eq 0 ] && [ "$rc" -ne 0 ] && status=$rc
  summarise
  return 0
}

limit_of() { for s in "${STAGES[@]}"; do [ "${s%%:*}" = "$1" ] && echo "${s##*:}"; done; }

if [ "$MODE" = dry ]; then
  ENV_ARGS=(--quick)
  TESTS=(tests/test_gpu_kernels.py tests/test_cuda_step.py
         "tests/test_masked_linear.py::test_task_grads_as_a_slice_of_one_task_by_parameter_buffer[triton]")
  SHAPE=(--device cpu --preset tiny --tasks 2 --seconds 0 --min-steps 1 --warmup 1 --set layers=1 --set hidden=32
         --set mlp_hidden=64 --set context=3 --set batch_per_task=2 --set backend=triton)
  KERNELS=(--smoke --compiled none)
  SCALE=(--device cpu --sweep-preset tiny --tasks 2)
  EVAL=(--device cpu --tasks reach-v3 --steps 2 --episodes 1 --workers 0 --skip-baseline --backend torch)
  XDIST=()
else
  ENV_ARGS=()
  # the GPU-only tests first; the interpreter-era kernel tests run compiled on the GPU too (the sm_90 compile
  # checks stay in CPU CI)
  TESTS=(tests/test_gpu_kernels.py tests/test_cuda_step.py tests/test_masked_linear.py
         tests/test_masked_mlp.py tests/test_masked_attention.py tests/test_triton_model.py)
  SHAPE=(--device cuda --preset paper --tasks 50 --seconds 5)
  KERNELS=(--compiled none)
  SCALE=(--device cuda --sweep-preset large --tasks 50,160)
  EVAL=(--device cuda --steps 100 --baseline-tasks 5 --baseline-steps 100)  # extrapolated to 500 steps
  # compile in parallel: pytest-xdist workers each compile their tests' kernels (16 CPU cores there)
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
fi

stage env "$(limit_of env)" 0 "$PY" -m $BENCH.device_ceilings --out "$WORK/env.json" "${ENV_ARGS[@]}"
stage tests "$(limit_of tests)" 1 "${RUN[@]}" -m pytest -q -p no:cacheprovider \
  "${PYTEST_EXTRA[@]}" "${XDIST[@]}" -rfE --junitxml="$OUT/tests.xml" --durations=10 "${TESTS[@]}"
stage train_step "$(limit_of train_step)" 0 "${RUN[@]}" -m $BENCH.train_step "${SHAPE[@]}" \
  --rows ours,published,prompt-dt,mask-update --ceilings "$WORK/env.json" --out "$WORK/train_step"
stage profile "$(limit_of profile)" 0 "${RUN[@]}" -m $BENCH.train_step "${SHAPE[@]}" --rows ours \
  --profile-top 15 --ceilings "$WORK/env.json" --out "$WORK/profile"
stage kernels "$(limit_of kernels)" 0 "${RUN[@]}" -m $BENCH.kernels "${KERNELS[@]}" \
  --ceilings "$WORK/env.json" --out "$WORK/kernels"
stage scale "$(limit_of scale)" 0 "$PY" -m $BENCH.scale --only sweep "${SCALE[@]}" --out "$WORK/scale" \
  --scratch "$WORK/scale_scratch"
if ! "$PY" -c "import metaworld" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
if "$PY" -c "import metaworld" 2>/dev/null; then
  stage eval "$(limit_of eval)" 0 "$PY" -m $BENCH.evaluation "${EVAL[@]}" --out "$WORK/eval"
else
  skip eval "metaworld is not installed and no wheels in .whl/"
fi
left=$(( BUDGET - 15 - ($(date +%s) - start) ))
if [ "$left" -ge 45 ]; then
  stage "$OPTIONAL" "$left" 0 "${RUN[@]}" -m $BENCH.train_step "${SHAPE[@]}" \
    --rows ours-compiled,ours-step,torch-compiled --ceilings "$WORK/env.json" --out "$WORK/$OPTIONAL"
else
  skip "$OPTIONAL" "${left}s left"
fi
summarise
# what the compile cost grows with: interpreted launches keyed as the JIT would compile them (dry run), the
# compiled kernels in the Triton cache (GPU)
echo "kernel variants: $("$PY" -m $BENCH.kernel_variants --count "$WORK/variants.jsonl" --cache "$TRITON_CACHE_DIR")"
echo "gpu_run: $(( $(date +%s) - start )) s in all; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # run.log complete before the command returns
exit "$status"
