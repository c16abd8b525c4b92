#!/usr/bin/env bash
# deltatune's GPU check: one script, at most 8 minutes, to run as is on the first CUDA machine we get.
#
#   OUT=gpu-check bash benchmarks/gpu_check.sh        # from the repository root, deltatune installed
#   OUT=gpu-check bash benchmarks/gpu_check.sh compare   # only the steps named (pytest-gpu, bench-fp32, ...)
#
# It runs, each under its own time limit, writing every log and result under $OUT:
#   1. pytest -m gpu                       the CUDA tests (quantized layers on bitsandbytes' CUDA kernels, fused
#                                          paths on CUDA equal to the plain path), collected from the two files that
#                                          hold them: all of tests/ would need every test extra (openai, selenium, ...)
#   2. deltatune bench on CUDA, fp32       LoRA q/v and all-linear, DoRA, QLoRA-NF4 (bitsandbytes' CUDA kernels),
#                                          each against its bound and PEFT's equivalent; peak memory per process
#   3. deltatune bench on CUDA, fp16 AMP   the same cases under autocast fp16 with the grad scaler
#   4. deltatune compare                   the default comparison (embedded MiniLM, spam/ham), which trains on
#                                          CUDA when one is present
# then $OUT/summary.txt: each step's exit status and time, the GPU, the versions.
# Without CUDA it prints what it would run and exits 0.
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu-check-results}
BENCH="$PY -m deltatune bench --device cuda --arch llama --size 125m --batch 8 --seq 256 --rounds 8 --no-latency"
CASES=lora-qv,lora-all,dora,qlora-nf4,peft-lora-qv,peft-lora-all,peft-dora,peft-qlora-nf4
AMP_CASES=lora-qv,dora,qlora-nf4,peft-lora-qv,peft-dora,peft-qlora-nf4

# name | seconds allowed | command   (the limits add up to 480 s; on an H200 the steps took 20, 170, 131
# and 104 s: a bench step starts one process per case for its memory column, ~12 s each, before its timed rounds)
STEPS=(
  "pytest-gpu|35|$PY -m pytest -q -m gpu tests/test_quant.py tests/test_fast_paths.py -p no:cacheprovider --junitxml=$OUT/pytest-gpu.xml"
  "bench-fp32|185|$BENCH --cases $CASES --out $OUT/bench"
  "bench-fp16|145|$BENCH --amp fp16 --cases $AMP_CASES --out $OUT/bench"
  "compare|115|$PY -m deltatune compare --no-progress --out $OUT/compare"
)

if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here; on a CUDA machine this script would run (logs under \$OUT=$OUT):"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    echo "  [$name, at most ${limit}s] $cmd"
  done
  exit 0
fi

mkdir -p "$OUT"
summary="$OUT/summary.txt"
{
  echo "deltatune GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
  $PY -c 'import peft, bitsandbytes; print("peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -1
} >"$summary"
status=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  echo "== $name (at most ${limit}s): $cmd"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$OUT/$name.log" 2>&1
  rc=$?
  note=""
  [ "$rc" = 124 ] && note=" (timed out)"
  echo "$name rc=$rc $(( $(date +%s) - start ))s$note" | tee -a "$summary"
  tail -n 25 "$OUT/$name.log"
  [ "$rc" = 0 ] || status=1
done
echo "gpu_check: done, results under $OUT (summary: $summary)"
exit $status
