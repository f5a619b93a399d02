#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in one call, most important first; each step has its own
# time limit, capped so that the phase ends within BUDGET seconds (default 570: one device call is
# 600 s), and writes as it goes, so a cut-short run still returns what it measured.
#
#   OUT=/some/dir bash benchmarks/gpu_all.sh core    # embed + train vs the PyTorch stack (one H200: embed 260 s, train
#                                                    # cut short at 258 s with BUDGET=560, 2026-11-27)
#   OUT=/some/dir bash benchmarks/gpu_all.sh train   # the train rows aimed at the MFU target (PyTorch baseline;
#                                                    # attention-only remat scanned, at dropout 0.1, at dropout 0, and
#                                                    # at dropout 0 on cuDNN's attention, and on it without
#                                                    # attention dropout only; full remat scanned at 512
#                                                    # triples and unrolled at 256), what a dropout mask costs by
#                                                    # how its bits are drawn, then a profile of the scanned
#                                                    # attention-only-remat step
#   OUT=/some/dir bash benchmarks/gpu_all.sh extra   # GPU tests, XLA attention, profiles, float16, tokeniser (its step
#                                                    # limits add up to more than BUDGET: the last are skipped
#                                                    # when the first use theirs)
#   OUT=/some/dir bash benchmarks/gpu_all.sh packing # training on the MEDI sample's real lengths: length buckets
#                                                    # against packed rows (TrainConfig.pack_length), same steps
#   QUICK=1 OUT=/tmp/g bash benchmarks/gpu_all.sh core   # the same flow on a CPU, tiny shapes (a dry run)
#
# One phase per device lease: with 15 minutes of device time, start-up included, `core` leaves too
# little for `extra` (on 2026-11-27 `core` then `extra` with BUDGET=270 on the same warm machine ran
# extra's first two steps). Embedding was measured then; the open target is the train step's MFU:
# run `train` first. Where the lease has less than ~10 minutes left, set BUDGET to what is left
# less a minute, so the report is written before the command is killed. (If it is killed anyway,
# the step JSONs are there: `python benchmarks/report.py $OUT/embed.json $OUT/train.json`.)
#
# Needs JAX (CUDA), torch and sentence-transformers; no TensorFlow, no network.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_results}
PHASE=${1:-core}
mkdir -p "$OUT"
: > "$OUT/status.txt"  # this phase's steps only
# XLA's warnings (allocator, ptxas, slow compiles) stay visible in the logs; output is unbuffered so
# a killed step's log shows how far it got; compiles are cached on disk for a later phase.
export TF_CPP_MIN_LOG_LEVEL=1 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
  JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/instructor_jax_jax_cache} \
  PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}  # some images have only python3
END=$((SECONDS + ${BUDGET:-570}))

if [[ -n "${QUICK:-}" ]]; then
  SHAPE=tiny; SIZES=(--quick --short 64 --docs 8); SIZES_FP16=("${SIZES[@]}"); TRAIN=(--train-batch 8 --train-length 32)
  VARIANTS="pytorch,pytorch-ckpt,jax,jax-full,jax-gc4"; PROF=(--batch 4 --length 32)
  TRAIN_VARIANTS=${TRAIN_VARIANTS:-"pytorch-ckpt,jax-dotsnb-scan,jax-dotsnb-scan-nodrop,jax-dotsnb-scan-fused-nodrop,jax-dotsnb-scan-fused-noattndrop,jax-full-scan,jax-full,jax-full-nolhs,jax-gc4"}
else
  SHAPE=${SHAPE:-gtr-large}; SIZES=(--short 10000 --docs 1000); SIZES_FP16=(--short 2000 --docs 200); TRAIN=(--train-batch 256 --train-length 256)
  # PyTorch first: JAX's allocator never hands memory back within the process, so a PyTorch row
  # after a JAX one could run out of memory for that reason alone. Then the target row (ours at
  # 256 triples, full remat; PyTorch needs checkpointing there, it ran out of memory above 32
  # triples without), ours at 32, and GradCache last (two traced copies of the model: the longest
  # compile, and the row a cut-short run can best lose).
  # jax-full falls back to 128 triples only if 256 runs out of memory (XLA:CPU cannot predict it).
  VARIANTS="pytorch-ckpt,pytorch@32,jax-full@256|128,jax@32,jax-gc4"; PROF=(--batch 64 --length 256)
  # The `train` phase. On one H200 (2026-11-28, BENCHMARKS.md) full remat ran at 28.2% MFU unrolled
  # and 27.5% scanned (XLA temp 94.8 against 29.8 GiB), and recomputing only attention
  # (jax-dotsnb-scan) at 28.5%: the recomputed matmuls are not what holds the step back. So these
  # rows split the rest, all scanned (a gtr-large compile of ~20 s instead of 60-90 s unrolled):
  # the same step at dropout 0 with the einsum attention (what the dropout masks cost), and at
  # dropout 0 on cuDNN's fused attention (what the einsums' [B, H, L, L] float32 tensors cost), and
  # on cuDNN's fused attention with every dropout but the attention weights' (attention_dropout_rate
  # 0: the fast recipe a user can choose); then full remat scanned at 512 triples (does a larger batch raise MFU; the temp said >= 984 fit), and
  # last the unrolled full-remat row of earlier runs, for continuity (the row a cut-short run can
  # best lose). jax-dotsnb-scan keeps ~100 GiB of temp at 256 triples, so on a card under 100 GB
  # these four start at 128.
  GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9)
  if ((${GPU_MIB:-0} > 0 && ${GPU_MIB:-0} < 100000)); then AT="@128"; else AT="@256|128"; fi
  TRAIN_VARIANTS=${TRAIN_VARIANTS:-"pytorch-ckpt,jax-dotsnb-scan$AT,jax-dotsnb-scan-nodrop$AT,jax-dotsnb-scan-fused-nodrop$AT,jax-dotsnb-scan-fused-noattndrop$AT,jax-full-scan@512|256,jax-full@256|128"}
fi

FAILED=0
step() {  # name, seconds, command... (the limit shrinks to what is left of BUDGET, less 20 s for the report)
  local name=$1 limit=$2; shift 2
  local start=$SECONDS left=$((END - SECONDS - 20))
  # A reused OUT must not let an earlier run's results pass for this one's: remove what this step
  # writes (its JSON; a profile step's directory), nothing else.
  rm -f "$OUT/$name.json" "$OUT/$name.json.tmp"
  if [[ $name == profile_* ]]; then rm -rf "${OUT:?}/$name"; fi
  if ((left < limit)); then limit=$left; fi
  if ((limit < 30)); then
    echo "$(date -u +%FT%TZ) $name skipped: ${limit}s left of BUDGET" | tee -a "$OUT/status.txt"
    FAILED=1
    return
  fi
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  if ((rc)); then FAILED=1; fi
  # Traces and HLO dumps run to hundreds of MB and would not come back: keep the summaries only,
  # removed at once so that a phase killed later does not leave them in OUT.
  if [[ $name == profile_* ]]; then rm -rf "${OUT:?}/$name/hlo" "${OUT:?}/$name/plugins"; fi
  echo "$(date -u +%FT%TZ) $name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/status.txt"
  tail -n 12 "$OUT/$name.log"
}

report() {  # output, json... : the tables, then every step's exit status (124: cut short by its limit)
  local out=$1; shift
  { "$PY" benchmarks/report.py "$@"; printf '\nSteps (rc 124: cut short by the time limit):\n\n'
    sed 's/^/    /' "$OUT/status.txt"; } > "$out"
  cat "$out"
}

# Without a GPU JAX falls back to the CPU silently and would spend the whole budget on gtr-large there.
check_devices() {
  { nvidia-smi || true; timeout 120 "$PY" -c "import jax, torch, transformers, sentence_transformers as st
print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)
import sys; sys.exit(0 if '${QUICK:-}' or (jax.default_backend() == 'gpu' and torch.cuda.is_available()) else 3)"; } \
    > "$OUT/versions.txt" 2>&1
  local rc=$?
  cat "$OUT/versions.txt"
  if ((rc)); then
    echo "$(date -u +%FT%TZ) stopped: JAX or torch sees no GPU (rc=$rc; versions.txt)" | tee -a "$OUT/status.txt"
    exit 1
  fi
}

if [[ $PHASE == core ]]; then
  check_devices
  step embed 270 "$PY" benchmarks/run.py --shape "$SHAPE" --sections matmul,embed "${SIZES[@]}" --out "$OUT/embed.json"
  # PyTorch has released its cache when JAX runs: let XLA use most of the card.
  step train 300 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 "$PY" benchmarks/run.py --shape "$SHAPE" \
    --sections matmul,train "${TRAIN[@]}" --train-variants "$VARIANTS" --out "$OUT/train.json"
  report "$OUT/report.md" "$OUT"/embed.json "$OUT"/train.json
elif [[ $PHASE == train ]]; then
  check_devices
  # 360 s, so that the profile keeps ~160 s. It profiles the scanned attention-only-remat step, the
  # fastest on the H200, with CUDA command buffers off (profile_ops.py: with them on the whole
  # step was one op in the trace).
  step train 360 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 "$PY" benchmarks/run.py --shape "$SHAPE" \
    --sections matmul,train "${TRAIN[@]}" --train-variants "$TRAIN_VARIANTS" --out "$OUT/train.json"
  report "$OUT/report_train.md" "$OUT"/train.json
  # What one dropout mask costs on the card, by how its bits are drawn: the encoder's four 16-bit
  # draws per Threefry block (since 2026-11-28; the train rows above use them), two per word (the
  # rows of 2026-11-28 04:22 UTC), Flax's 32 bits per element, none. Shape: one gtr-large layer's
  # float32 attention weights at 256 triples of 256 tokens (~20 s).
  if [[ -n "${QUICK:-}" ]]; then DROP=(--shape "24,32,64"); else DROP=(--shape "12288,256,256" --repeats 5); fi
  step dropout 45 "$PY" benchmarks/dropout_draws.py "${DROP[@]}" --out "$OUT/dropout.json"
  step profile_train 170 "$PY" benchmarks/profile_ops.py --case train --shape "$SHAPE" "${PROF[@]}" \
    --remat save_dots_no_batch --scan-layers --out "$OUT/profile_train"
  head -n 20 "$OUT"/profile_train/summary.txt
elif [[ $PHASE == packing ]]; then
  # Real training texts (the MEDI sample's lengths): the same steps padded to length buckets and
  # packed into 512-token rows (TrainConfig.pack_length), bf16, full remat, the layers scanned. Each
  # shape compiles once, so few steps, and gtr-base by default (PACK_SHAPE): the ratio is what is
  # asked, and this phase should fit in what a lease has left after `train`. On 2026-11-28, with the
  # layers unrolled, BUDGET=265 timed the buckets and was cut short in the packed row's compiles.
  check_devices
  if [[ -n "${QUICK:-}" ]]; then
    PACKING=(--batch 8 --steps 20 --time-steps 2 --query-len 128 --doc-len 128 --pack-length 128 --time-shape tiny)
  else
    # Steps 1-2 of the MEDI sample: buckets 64x128 and 64x64, packed 60 and 40 rows of 512, i.e.
    # four compiles (steps 1-4 need five, more than BUDGET=200 leaves after start-up).
    PACKING=(--batch 256 --steps 200 --time-steps 2 --time-shape "${PACK_SHAPE:-gtr-base}")
  fi
  step packing 540 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.85 "$PY" benchmarks/train_padding.py "${PACKING[@]}" \
    --time-dtype bfloat16 --time-remat full --time-scan-layers --no-full-padding-time --out "$OUT/packing.json"
elif [[ $PHASE == extra ]]; then
  check_devices
  # Correctness on the card first: cuDNN attention against XLA's, bf16/float16 against float32, a
  # bf16 train step with dropout (tests/test_accelerator.py; they skip on a CPU, bar QUICK's check).
  if "$PY" -c "import pytest" 2>/dev/null; then
    if [[ -n "${QUICK:-}" ]]; then ACC=(INSTRUCTOR_JAX_ACCELERATOR_TESTS_ON_CPU=1 JAX_PLATFORMS=cpu); else ACC=(JAX_PLATFORMS=cuda); fi
    step accelerator_tests 150 env "${ACC[@]}" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_accelerator.py
  else
    echo "$(date -u +%FT%TZ) accelerator_tests skipped: pytest is not installed" | tee -a "$OUT/status.txt"
    FAILED=1
  fi
  # `core` embeds with the default attention ("auto": cuDNN's fused kernel on a GPU in bf16); this
  # is the same run on XLA's fused kernel, to keep that choice measured.
  step embed_xla 240 "$PY" benchmarks/run.py --shape "$SHAPE" --sections embed "${SIZES[@]}" \
    --attention-impl dot_product_attention --out "$OUT/embed_xla.json"
  report "$OUT/report_xla.md" "$OUT"/embed_xla.json
  step profile_train 200 "$PY" benchmarks/profile_ops.py --case train --shape "$SHAPE" "${PROF[@]}" --remat full \
    --out "$OUT/profile_train"
  step profile_docs 120 "$PY" benchmarks/profile_ops.py --case embed-docs --shape "$SHAPE" --batch 64 --length 512 \
    --out "$OUT/profile_docs"
  head -n 20 "$OUT"/profile_*/summary.txt
  # float16 (for cards without fast bf16): float32 residual stream here, .half() there; fewer texts.
  step embed_fp16 120 "$PY" benchmarks/run.py --shape "$SHAPE" --sections matmul,embed "${SIZES_FP16[@]}" \
    --dtype float16 --out "$OUT/embed_fp16.json"
  report "$OUT/report_fp16.md" "$OUT"/embed_fp16.json
  # Host side, last (it needs no GPU): the tokeniser's kept tokens/s on the GPU machine's cores, to
  # set against the device's tokens/s (200 documents: ~25 s on 2 cores with --repeats 1).
  if [[ -n "${QUICK:-}" ]]; then TOK=(--docs 4 --short 50); else TOK=(--docs 200); fi
  step tokenize 90 "$PY" benchmarks/tokenize_bench.py "${TOK[@]}" --repeats 1 --out "$OUT/tokenize.json"
else
  echo "usage: OUT=DIR bash benchmarks/gpu_all.sh core|train|extra|packing" >&2
  exit 2
fi
# Non-zero when any step failed, was cut short or was skipped (report.md says which).
exit "$FAILED"
