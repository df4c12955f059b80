#!/bin/bash
# Issue 20's CPU measurement, side by side in one run on one machine: the code before the step-overhead changes
# (BEFORE, a checkout of c29328c) and this one, quiet and beside one busy process, two interleaved rounds of the
# demo preset (MT5 x 8 sequences), then the paper preset at MT50 with the published procedure.
#   bash benchmarks/step_overhead_cpu.sh /path/to/checkout-of-c29328c
set -euo pipefail
BEFORE=$1
NOW=$(cd "$(dirname "$0")/.." && pwd)
OUT=$NOW/benchmarks/results/step_overhead_cpu_$(date -u +%F)
PY=${PYTHON:-python}
bench() {  # code-folder out-folder args...
  local src=$1 out=$2; shift 2
  (cd "$src" && PYTHONPATH=$src $PY -m harmodt_fast.benchmarks.train_step --device cpu "$@" --out "$out") 2>&1 \
    | grep -v USDT
}
for round in 1 2; do
  for busy in quiet busy1; do
    for code in before now; do
      src=$NOW; rows=ours,prompt-dt,gemm-floor
      [ $code = before ] && { src=$BEFORE; rows=ours,prompt-dt; }
      BP=""
      [ $busy = busy1 ] && { $PY -c "while True: pass" & BP=$!; sleep 1; }
      bench "$src" "$OUT/round$round/$busy/$code" --preset demo --tasks 5 --rows $rows --seconds 8 --set batch_per_task=8
      [ -n "$BP" ] && kill $BP
    done
  done
done
for code in before now; do
  src=$NOW; [ $code = before ] && src=$BEFORE
  bench "$src" "$OUT/paper/$code" --preset paper --tasks 50 --rows ours,published --seconds 40 --min-steps 3 --warmup 1
done
