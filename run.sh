#!/usr/bin/env bash
# The main command.
#   ./run.sh            FineWeb shards present: the challenge run on every local GPU; else the embedded sample
#   ./run.sh challenge  torchrun on every local GPU with the record configuration (needs FineWeb shards)
#   ./run.sh smoke      one process (one GPU, or the CPU): the challenge model on FineWeb, a short wallclock
#   ./run.sh sample     the embedded real-text sample (data/sample), a small model; minutes on a CPU
# Any env var of train_gpt.py's Hyperparameters overrides the values set here.
set -euo pipefail
cd "$(dirname "$0")"
FINEWEB=${DATA_PATH:-./data/datasets/fineweb10B_sp1024}
mode=${1:-auto}
if [ "$mode" = auto ]; then
  if ls "$FINEWEB"/fineweb_val_*.bin >/dev/null 2>&1; then mode=challenge; else mode=sample; fi
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
compare_kv=$([ "$gpus" -gt 0 ] && echo qjl_triton,qjl_recentk_triton,tq4_triton || echo qjl,qjl_recentk)

codec_env() {  # the record's codec: int6 per-row QAT and export, the best measured under 16,000,000 bytes on the
  # stand-in (240 s, one H200, 9 layers; benchmarks/standin_results.md): int6 1.25900 at 12.24 MB, int8 without QAT
  # 1.25984 at 11.78 MB, int5 1.26192 at 10.66 MB, polar 5,4,4,4,5 1.26391 at 9.98 MB, polar 4,3,3,3,4 1.26974 at
  # 7.95 MB. int6's codes bound its bytes as training goes on; int8+zlib's grow (7.4 bits/weight after 8xH100).
  export QAT_SCHEME=${QAT_SCHEME:-int} WEIGHT_QUANT_SCHEME=${WEIGHT_QUANT_SCHEME:-int} INT_BITS=${INT_BITS:-6} \
    INT_EMBED_BITS=${INT_EMBED_BITS:-8} INT_ROTATE=${INT_ROTATE:-0} QAT_START_FRAC=${QAT_START_FRAC:-0.5}
}

record_env() {  # the submission's configuration: 9 layers (12 lost 0.030 on the stand-in at 240 s), a 3x MLP: int6 MLP 3x
  # 1.25650 at 15.47 MB against MLP 2x 1.25575-1.25900 at 12.24 MB at 240 s, its deficit at 120 s (+0.018, one machine)
  # gone by 240 s; the 8xH100 run sees about 20x the tokens (README: Spend the bytes)
  codec_env
  export NUM_LAYERS=${NUM_LAYERS:-9} MLP_MULT=${MLP_MULT:-3} KV_QUANT_BACKEND=${KV_QUANT_BACKEND:-auto} \
    KV_EVAL_COMPARE_BACKENDS=${KV_EVAL_COMPARE_BACKENDS-$compare_kv} KV_EVAL_BATCH=${KV_EVAL_BATCH:-1024} \
    EVAL_STRIDE=${EVAL_STRIDE:-64} DATA_PATH=$FINEWEB
}

case $mode in
  challenge)
    [ "$gpus" -gt 0 ] || { echo "challenge mode needs CUDA GPUs; try ./run.sh smoke or ./run.sh sample" >&2; exit 2; }
    record_env
    torchrun --standalone --nproc_per_node="$gpus" train_gpt.py ;;
  smoke)
    record_env
    export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-60} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0}
    python3 train_gpt.py ;;
  sample)
    SAMPLE=${DATA_PATH_SAMPLE:-./data/datasets/sample_sp1024}
    if [ ! -f "$SAMPLE/fineweb_val_000000.bin" ] || ! ls "$SAMPLE"/fineweb_train_*.bin >/dev/null 2>&1; then
      python3 data/build_shards.py --input data/sample/fineweb_edu_sample.txt --docs file --val-fraction 0.15 --out "$SAMPLE"
    fi
    codec_env
    export DATA_PATH=$SAMPLE NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} \
      NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2} TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} \
      TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-8192} ITERATIONS=${ITERATIONS:-150} WARMUP_STEPS=${WARMUP_STEPS:-0} \
      WARMDOWN_ITERS=${WARMDOWN_ITERS:-50} MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-240} \
      VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-50} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-25} KV_GROUP_SIZE=${KV_GROUP_SIZE:-32} \
      KV_QUANT_BACKEND=${KV_QUANT_BACKEND:-auto} KV_EVAL_COMPARE_BACKENDS=${KV_EVAL_COMPARE_BACKENDS-$compare_kv} \
      KV_EVAL_BATCH=${KV_EVAL_BATCH:-64} KV_EVAL_MAX_TOKENS=${KV_EVAL_MAX_TOKENS:-16384} EVAL_STRIDE=${EVAL_STRIDE:-64}
    python3 train_gpt.py ;;
  *) echo "usage: ./run.sh [challenge|smoke|sample]" >&2; exit 2 ;;
esac
