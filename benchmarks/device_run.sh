#!/usr/bin/env bash
# One GPU call on the Wikipedia stand-in corpus: build its shards (once per machine), then the named stages, logs
# and tables under $OUT. Every figure that ranks codecs, KV backends or configurations comes from these runs.
#   STAGES="standin:polar43334 decode kv" CORPUS=.device/wikipedia bash benchmarks/device_run.sh
# Stages:
#   standin:CONFIG  benchmarks/standin_protocol.py for CONFIG (its CONFIGS), one row appended to $OUT/standin_results.md;
#                   SET="KEY=VALUE ..." adds trainer settings to the configuration (its row and run id name them);
#                   TRAIN_SECONDS: the training wallclock (default the protocol's 240 s); RUN_NAME: its run id;
#                   the eval settings of the environment (CODEC_COMPARE, EVAL_STRIDE, KV_EVAL_COMPARE_BACKENDS, ...)
#                   pass through to the trainer
#   decode          AR throughput of the last artifact (or $ART; with neither, a random model) per DECODE_BACKENDS at
#                   DECODE_BATCHES
#   profile         per-kernel CUDA times of 64 decode steps, every cache full, per DECODE_BACKENDS at PROFILE_BATCH
#                   (default 1024), of the last artifact (or $ART; with neither, a random model)
#   ring            the last artifact (or $ART) rescored by the ring eval over RING_TOKENS targets: exact, then
#                   each of RING_BACKENDS with its delta vs exact (KV_* settings from the environment)
#   kv              the KV backend benchmark at KV_CONTEXTS x KV_BATCHES;  sweep: launch settings at SHAPES
#   isolation       the artifact isolation check on the last artifact (or $ART) in a fresh process
#   gpu_tests       tests/test_kv.py with the kernels compiled for the GPU (TRITON_INTERPRET=0), GPU_TESTS: a -k filter
#   artifact        the last artifact (or $ART) copied to $OUT, to score it on another machine (device files: 16 MiB)
# Training runs use CODE_DIR's train_gpt.py (default: the top level; a records folder to refresh its logs).
# Versions side by side on one machine (machines differ by several percent): REVS="main tq4-write" runs each stage
# once per version, in turn, each from its own tree, staged beforehand in the git-ignored, carried .device folder:
#   for r in main tq4-write; do mkdir -p .device/rev/$r && git archive $r | tar -x -C .device/rev/$r; done
# The versions share the shards; each keeps its runs and logs under $OUT/REV, its summary lines prefixed "REV: ";
# benchmarks/compare_revs.py then prints their figures side by side.
# The call ends by a deadline, CALL_SECONDS (default 570) after it starts, the device's 600-s limit less the time to
# pack its runs: a stage's timeout is cut to the time left, and a stage with under 20 s left is skipped, noted, and
# fails the call; the REVS versions share the caller's deadline.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/out}
CORPUS=${CORPUS:-$ROOT/.device/wikipedia}
DATA=${DATA:-$ROOT/data/datasets/wikipedia_sp1024}  # git-ignored: kept while the machine stays warm
RUNS=${RUNS:-/tmp/runs}
TOKENIZER=$ROOT/data/tokenizers/fineweb_1024_bpe.model
OUT=$(realpath -m "$OUT"); CORPUS=$(realpath -m "$CORPUS"); DATA=$(realpath -m "$DATA"); RUNS=$(realpath -m "$RUNS")
[ -z "${ART:-}" ] || export ART=$(realpath -m "$ART")  # every version of REVS scores the same one
mkdir -p "$OUT" "$RUNS"
export PYTHONUNBUFFERED=1 DEADLINE=${DEADLINE:-$(( $(date +%s) + ${CALL_SECONDS:-570} ))}
budget() { local left=$(( DEADLINE - $(date +%s) )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
cd "$ROOT"
status=0
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
if [ -z "${REV:-}" ]; then  # a version run by REVS: its caller wrote the header
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"
fi
shards() {  # the stand-in's shards, built by the first stage that reads them (kv, sweep and gpu_tests read none)
  [ -f "$DATA/fineweb_val_000000.bin" ] && return
  local t0=$(date +%s)
  python3 data/build_shards.py --input "$CORPUS"/enwiki_0*.jsonl.xz --val-tokens 2000000 --out "$DATA" \
    > "$RUNS/build_shards.out" 2>&1 || { note "build_shards failed: see $RUNS/build_shards.out"; tail -5 "$RUNS/build_shards.out"; exit 1; }
  note "shards built in $(( $(date +%s) - t0 )) s: $(ls "$DATA" | wc -l) files"
}
if [ -n "${REVS:-}" ]; then
  for rev in $REVS; do
    [ -f "$ROOT/.device/rev/$rev/benchmarks/device_run.sh" ] || {
      note "REVS: $rev is not staged; stage it with: mkdir -p .device/rev/$rev && git archive $rev | tar -x -C .device/rev/$rev"
      exit 2; }
  done
  for stage in ${STAGES:?set STAGES, e.g. kv profile}; do
    for rev in $REVS; do
      mkdir -p "$OUT/$rev" && touch "$OUT/$rev/summary.txt"
      seen=$(wc -l < "$OUT/$rev/summary.txt")
      (cd "$ROOT/.device/rev/$rev" && REVS= REV=$rev STAGES=$stage OUT=$OUT/$rev RUNS=$RUNS/$rev DATA=$DATA CORPUS=$CORPUS \
        bash benchmarks/device_run.sh >> "$OUT/$rev/console.log" 2>&1) || status=1
      tail -n +$((seen + 1)) "$OUT/$rev/summary.txt" | sed "s|^|$rev: |" | tee -a "$OUT/summary.txt"
    done
  done
  python3 benchmarks/compare_revs.py --runs "$RUNS" $REVS | tee -a "$OUT/summary.txt"
  exit $status
fi
last_artifact() { ls -t "$RUNS"/*/final_model.*.ptz 2>/dev/null | head -1; }
for stage in ${STAGES:?set STAGES, e.g. standin:polar43334 decode}; do
  t0=$(date +%s)
  if (( DEADLINE - t0 < 20 )); then
    note "== $stage skipped: $(( DEADLINE - t0 )) s left before the call's deadline (CALL_SECONDS)"
    status=1
    continue
  fi
  case $stage in
    standin:*)
      shards
      timeout $(budget ${RUN_TIMEOUT:-560}) python3 benchmarks/standin_protocol.py --config "${stage#standin:}" --corpus "$CORPUS" \
        --data "$DATA" --code-dir "${CODE_DIR:-$ROOT}" --out-dir "$RUNS" --results "$OUT/standin_results.md" \
        ${COMMIT:+--commit $COMMIT} ${SET:+--set $SET} ${TRAIN_SECONDS:+--seconds $TRAIN_SECONDS} \
        ${RUN_NAME:+--run-id $RUN_NAME} 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
      rc=${PIPESTATUS[0]}
      log=$(ls -t "$RUNS"/*.out | head -1)
      grep -E "train_summary|roundtrip_exact|Total submission|codec_compare|final_ar|final_teacher|final_sliding|eval_budget|phase_times|WARNING|Error" \
        "$log" | tee -a "$OUT/summary.txt"
      cp "$log" "$OUT/" ;;
    decode)
      shards
      art=${ART:-$(last_artifact)}
      [ -n "$art" ] || note "decode: no artifact in $RUNS and no ART: a randomly initialized model (throughput only)"
      timeout $(budget ${DECODE_TIMEOUT:-300}) python3 benchmarks/benchmark_decode.py ${art:+--artifact $art} --data-path "$DATA" \
        --backends ${DECODE_BACKENDS:-int8_triton,tq4_triton} --batches ${DECODE_BATCHES:-1,1024} \
        --out "$RUNS/decode_bench.json" 2>&1 | grep -E "batch|Error" | tee -a "$OUT/summary.txt"
      rc=${PIPESTATUS[0]} ;;
    profile)
      shards
      art=${ART:-$(last_artifact)}
      rc=0
      for backend in $(echo "${DECODE_BACKENDS:-int8_triton,tq4_triton}" | tr , ' '); do
        timeout $(budget ${PROFILE_TIMEOUT:-120}) python3 benchmarks/benchmark_decode.py ${art:+--artifact $art} --data-path "$DATA" \
          --backends "$backend" --profile "${PROFILE_BATCH:-1024}" --out "$RUNS/profile_$backend.json" 2>&1 \
          | grep -E "^profile|Error" | tee -a "$OUT/summary.txt"
        [ "${PIPESTATUS[0]}" = 0 ] || rc=1
      done ;;
    ring)
      shards
      art=${ART:-$(last_artifact)}
      timeout $(budget ${RING_TIMEOUT:-300}) python3 benchmarks/benchmark_decode.py --artifact "$art" --data-path "$DATA" \
        --backends ${RING_BACKENDS:-int8_triton,tq4_triton,qjl_triton,qjl_recentk_triton} \
        --ring-tokens ${RING_TOKENS:-262144} --out "$RUNS/ring_deltas.json" 2>&1 | grep -E "^ring|Error" \
        | tee -a "$OUT/summary.txt"
      rc=${PIPESTATUS[0]} ;;
    kv)
      timeout $(budget ${KV_TIMEOUT:-240}) python3 benchmarks/benchmark_kv_backends.py --contexts ${KV_CONTEXTS:-1024,16384} \
        --batches ${KV_BATCHES:-64,1024} ${KV_BACKENDS:+--backends $KV_BACKENDS} --out "$RUNS/kv_bench.json" 2>&1 \
        | tail -40 | tee -a "$OUT/summary.txt"
      rc=${PIPESTATUS[0]} ;;
    sweep)
      timeout $(budget ${SWEEP_TIMEOUT:-300}) python3 benchmarks/benchmark_kv_backends.py --sweep ${SHAPES:+--shapes $SHAPES} \
        ${KV_BACKENDS:+--backends $KV_BACKENDS} --out "$RUNS/kv_sweep.json" 2>&1 | grep -v Warning | tail -60 \
        | tee -a "$OUT/summary.txt"
      rc=${PIPESTATUS[0]} ;;
    isolation)
      shards
      (cd /tmp && timeout $(budget 120) python3 "$ROOT/artifact_isolation_check.py" "${ART:-$(last_artifact)}" --data-path "$DATA" \
        --tokenizer "$TOKENIZER" --steps 1024 --out "$RUNS/isolation.json" 2>&1 | tail -25 | tee -a "$OUT/summary.txt")
      rc=${PIPESTATUS[0]} ;;
    gpu_tests)
      TRITON_INTERPRET=0 timeout $(budget ${GPU_TESTS_TIMEOUT:-300}) python3 -m pytest -q -p no:cacheprovider tests/test_kv.py \
        ${GPU_TESTS:+-k "$GPU_TESTS"} 2>&1 | tail -15 | tee -a "$OUT/summary.txt"
      rc=${PIPESTATUS[0]} ;;
    artifact)
      art=${ART:-$(last_artifact)}
      cp "$art" "$OUT/" && note "artifact $(basename "$art"): $(stat -c %s "$art") bytes"
      rc=$? ;;
    *) note "unknown stage $stage"; rc=2 ;;
  esac
  note "== $stage rc=$rc $(( $(date +%s) - t0 )) s"
  [ "$rc" = 0 ] || status=1
done
tar czf "$OUT/runs.tar.gz" --exclude='*.ptz' --exclude='*.tmp' -C "$(dirname "$RUNS")" "$(basename "$RUNS")" 2>/dev/null
exit $status
