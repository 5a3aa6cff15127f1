#!/usr/bin/env bash
# One GPU call: build shards from local real text, then run the named stages, logs under $OUT.
#   STAGES="kv baseline int8" bash benchmarks/device_run.sh
# Stages: sweep (Triton launch settings per shape), kv (KV backend benchmark), baseline (the public baseline script, if .device/baseline_train_gpt.py
# exists), int8 | int8qat | polar (our trainer, same data and wallclock), big (polar, larger model),
# codecs (bytes per scheme from the polar QAT run's weights), decode (AR throughput at DECODE_BATCHES), isolation.
# Training runs use CODE_DIR's train_gpt.py (default: the top level; a records folder to refresh its logs).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/out}
WALL=${WALL:-60}
TEXT=${TEXT:-$ROOT/.device/text}
DATA=/tmp/pg_data
mkdir -p "$OUT" /tmp/runs
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"
if [ ! -f $DATA/fineweb_val_000000.bin ]; then
  python3 data/build_shards.py --input $TEXT/fortunes.txt $TEXT/tinyshakespeare.txt $TEXT/wikitext2_valid.txt \
    $TEXT/fineweb_edu_sample.txt --docs file --val-fraction 0.025 --out $DATA | tee -a "$OUT/summary.txt"
fi
train() {  # name, then env assignments
  local name=$1; shift
  rm -rf /tmp/runs/$name  # a log reused by RUN_ID would be appended to
  (cd "${CODE_DIR:-$ROOT}" && env "$@" DATA_PATH=$DATA TOKENIZER_PATH=$ROOT/data/tokenizers/fineweb_1024_bpe.model \
    RUN_ID=$name OUT_DIR=/tmp/runs/$name MAX_WALLCLOCK_SECONDS=$WALL VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 \
    timeout ${RUN_TIMEOUT:-420} python3 train_gpt.py > /tmp/runs/$name.out 2>&1)
  echo "== $name rc=$?" | tee -a "$OUT/summary.txt"
  grep -E "train_summary|roundtrip_exact|Total submission|final_kv_eval_exact|phase_times|WARNING|Error" /tmp/runs/$name.out | tee -a "$OUT/summary.txt"
}
for stage in ${STAGES:-kv baseline int8}; do
  case $stage in
    sweep) timeout 300 python3 benchmarks/benchmark_kv_backends.py --sweep ${SHAPES:+--shapes $SHAPES} --out /tmp/runs/kv_sweep.json 2>&1 \
             | grep -v Warning | tail -60 | tee -a "$OUT/summary.txt" ;;
    kv) timeout 240 python3 benchmarks/benchmark_kv_backends.py --out /tmp/runs/kv_bench.json 2>&1 | tail -60 | tee -a "$OUT/summary.txt" ;;
    baseline)
      mkdir -p /tmp/runs/baseline && cp .device/baseline_train_gpt.py /tmp/runs/baseline/train_gpt.py
      (cd /tmp/runs/baseline && DATA_PATH=$DATA TOKENIZER_PATH=$ROOT/data/tokenizers/fineweb_1024_bpe.model RUN_ID=baseline \
        MAX_WALLCLOCK_SECONDS=$WALL VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 timeout 420 python3 train_gpt.py > /tmp/runs/baseline.out 2>&1)
      echo "== baseline rc=$?" | tee -a "$OUT/summary.txt"
      grep -E "step:.*step_avg|peak memory|roundtrip|Total submission" /tmp/runs/baseline.out | tail -6 | tee -a "$OUT/summary.txt" ;;
    int8) train int8 KV_EVAL_COMPARE_BACKENDS=${INT8_COMPARE:-int8,qjl_triton,qjl,qjl_recentk} ;;
    int8qat) train int8qat QAT_SCHEME=int8 KV_EVAL_COMPARE_BACKENDS=qjl_triton ;;
    polar) train polar QAT_SCHEME=polar WEIGHT_QUANT_SCHEME=polar KV_EVAL_COMPARE_BACKENDS=qjl_triton ;;
    big) train big QAT_SCHEME=polar WEIGHT_QUANT_SCHEME=polar NUM_LAYERS=${BIG_LAYERS:-16} KV_EVAL_COMPARE_BACKENDS=qjl_triton ;;
    codecs) timeout 200 python3 benchmarks/benchmark_codecs.py --artifact ${CODEC_ART:-/tmp/runs/polar/final_model.polar.ptz} \
              --compressors zlib --out /tmp/runs/codec_bench.json 2>&1 | tail -20 | tee -a "$OUT/summary.txt" ;;
    decode)
      art=${ART:-/tmp/runs/int8/final_model.int8.ptz}; [ -f "$art" ] || art=""  # none: a random model, throughput only
      timeout 300 python3 benchmarks/benchmark_decode.py ${art:+--artifact $art} --data-path $DATA \
              ${DECODE_BATCHES:+--batches $DECODE_BATCHES} --out /tmp/runs/decode_bench.json 2>&1 \
              | grep -E "batch|Error" | tee -a "$OUT/summary.txt" ;;
    isolation) (cd /tmp && timeout 120 python3 $ROOT/artifact_isolation_check.py ${ART:-/tmp/runs/int8/final_model.int8.ptz} \
              --data-path $DATA --tokenizer $ROOT/data/tokenizers/fineweb_1024_bpe.model --steps 1024 \
              --out /tmp/runs/isolation.json 2>&1 | tail -25 | tee -a "$OUT/summary.txt") ;;
  esac
done
tar czf "$OUT/runs.tar.gz" --exclude='*.ptz' --exclude='*.tmp' -C /tmp runs 2>/dev/null  # logs, JSON summaries
ls -la /tmp/runs/*/*.ptz 2>/dev/null | tee -a "$OUT/summary.txt"
