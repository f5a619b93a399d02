#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one call, most important first; each step has its own
# time limit and writes as it goes, so a cut-short run still returns what it measured.
#
#   OUT=/some/dir bash benchmarks/gpu_all.sh core    # embed + train vs the PyTorch stack (estimated ~9 min on one H100)
#   OUT=/some/dir bash benchmarks/gpu_all.sh extra   # cuDNN attention, profiles (estimated ~5 min)
#   QUICK=1 OUT=/tmp/g bash benchmarks/gpu_all.sh core   # the same flow on a CPU, tiny shapes (a dry run)
#
# Needs JAX (CUDA), torch and sentence-transformers; no TensorFlow, no network.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_results}
PHASE=${1:-core}
mkdir -p "$OUT"
export TF_CPP_MIN_LOG_LEVEL=3 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}

if [[ -n "${QUICK:-}" ]]; then
  SHAPE=tiny; SIZES=(--quick --short 64 --docs 8); TRAIN=(--train-batch 8 --train-length 32)
  VARIANTS="pytorch,pytorch-ckpt,jax,jax-full,jax-gc4"; PROF=(--batch 4 --length 32)
else
  SHAPE=${SHAPE:-gtr-large}; SIZES=(--short 10000 --docs 1000); TRAIN=(--train-batch 256 --train-length 256)
  # The target row first (ours at 256 triples, full remat, and PyTorch at the same shape, which needs
  # checkpointing: without it PyTorch ran out of memory above 32 triples; reference figures in
  # BENCHMARKS.md), so
  # a run cut short by the step's time limit still has it; then both at 32 without remat.
  VARIANTS="jax-full,pytorch-ckpt,jax-gc4,pytorch@32,jax@32"; PROF=(--batch 64 --length 256)
fi

step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$(date -u +%FT%TZ) $name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status.txt"
  tail -n 12 "$OUT/$name.log"
}

if [[ $PHASE == core ]]; then
  { nvidia-smi || true; "$PY" -c "import jax, torch, transformers, sentence_transformers as st
print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"; } > "$OUT/versions.txt" 2>&1
  cat "$OUT/versions.txt"
  step embed 270 "$PY" benchmarks/run.py --shape "$SHAPE" --sections matmul,embed "${SIZES[@]}" --out "$OUT/embed.json"
  step train 300 "$PY" benchmarks/run.py --shape "$SHAPE" --sections matmul,train "${TRAIN[@]}" \
    --train-variants "$VARIANTS" --out "$OUT/train.json"
  "$PY" benchmarks/report.py "$OUT"/embed.json "$OUT"/train.json > "$OUT/report.md" && cat "$OUT/report.md"
elif [[ $PHASE == extra ]]; then
  step embed_cudnn 150 "$PY" benchmarks/run.py --shape "$SHAPE" --sections embed "${SIZES[@]}" \
    --attention-impl cudnn --out "$OUT/embed_cudnn.json"
  "$PY" benchmarks/report.py "$OUT"/embed_cudnn.json > "$OUT/report_cudnn.md" && cat "$OUT/report_cudnn.md"
  step profile_train 120 "$PY" benchmarks/profile_ops.py --case train --shape "$SHAPE" "${PROF[@]}" --remat full \
    --out "$OUT/profile_train"
  step profile_docs 60 "$PY" benchmarks/profile_ops.py --case embed-docs --shape "$SHAPE" --batch 64 --length 512 \
    --out "$OUT/profile_docs"
  head -n 20 "$OUT"/profile_*/summary.txt
  # Traces and HLO dumps run to hundreds of MB; the summaries are what comes back.
  rm -rf "$OUT"/profile_*/hlo "$OUT"/profile_*/plugins
else
  echo "usage: OUT=DIR bash benchmarks/gpu_all.sh core|extra" >&2
  exit 2
fi
