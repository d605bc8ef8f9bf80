#!/usr/bin/env bash
# The GPU run of issue 7, in one script for the GPU host (no Rust, no network): it runs from a
# folder holding lorasft.xz (scripts/build-cuda.sh), this script, gpu-env.sh, bench_pytorch.py,
# gpu_table.py, tokenizer.json and alpaca_en_demo.json (scripts/pack-gpu.sh puts them in .gpu/).
#   1. lorasft selftest on the GPU in fp32, bf16 and f16;
#   2. the TinyLlama-1.1B-Chat shape (weights from a seed) trained with the day2 settings
#      (q_proj,v_proj r 8 alpha 16 dropout 0.05, max length 512, padding max_length, batch 4)
#      for STEPS steps in fp32 (twice: the loss curves must be identical), bf16 and f16;
#   3. PyTorch + PEFT on the same shape and GPU, side by side;
#   4. one table (ms/step, tokens/s, peak GPU memory, MFU) and the fp32 run's REPORT.md.
# Results go to $OUT (default ./out). DEVICE, SHAPE, STEPS and PYTHON can be overridden, so the
# script is rehearsed on a CPU with a small shape: DEVICE=cpu SHAPE=tiny STEPS=4.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/out}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-tinyllama}
STEPS=${STEPS:-30}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/gpu-run.log"; }

if [ ! -x ./lorasft ]; then
  xz -dk lorasft.xz 2>/dev/null ||
    "$PYTHON" -c "import lzma,shutil; shutil.copyfileobj(lzma.open('lorasft.xz'), open('lorasft','wb'))"
  chmod +x lorasft
fi
if [ "$DEVICE" != cpu ]; then
  # shellcheck disable=SC1091
  source ./gpu-env.sh
  if ldd ./lorasft | grep 'not found'; then echo "missing libraries" >&2; exit 1; fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
else
  echo "cpu, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" > "$OUT/gpu.txt"
fi
date -u +%Y-%m-%dT%H:%M:%SZ > "$OUT/date.txt"

# Peak device memory of a command: nvidia-smi sampled every 100 ms (GPU), or peak RSS (CPU).
measure() {
  local name=$1; shift
  if [ "$DEVICE" != cpu ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem-$name.txt" &
    local smi=$!
    "$@"
    kill "$smi" 2>/dev/null || true
  else
    /usr/bin/time -f "%M" -o "$OUT/rss-$name.txt" "$@"
  fi
}

log "selftest"
for p in fp32 bf16 f16; do
  ./lorasft selftest --device "$DEVICE" --precision "$p" | tee "$OUT/selftest-$p.md" || echo "selftest $p FAILED" | tee -a "$OUT/gpu-run.log"
done

log "model: $SHAPE from seed 0, written once"
MODEL=$OUT/model-$SHAPE
case $SHAPE in
  tinyllama) dims="--hidden 2048 --intermediate 5632 --layers 22 --heads 32 --kv-heads 4 --vocab 32000 --max-positions 2048" ;;
  tiny) dims="--hidden 256 --intermediate 688 --layers 4 --heads 8 --kv-heads 2 --vocab 32000 --max-positions 2048" ;;
  *) echo "unknown SHAPE $SHAPE" >&2; exit 1 ;;
esac
# shellcheck disable=SC2086
[ -f "$MODEL/model.safetensors" ] || ./lorasft fixture tiny-llama $dims --dtype bf16 --seed 0 --out "$MODEL"

train() {
  local name=$1 precision=$2
  measure "$name" ./lorasft train --preset day2 --quiet --name "$name" --out-dir "$OUT/runs" \
    --device "$DEVICE" --precision "$precision" --max-steps "$STEPS" \
    --set "model.source=\"$MODEL\"" --set 'model.tokenizer="tokenizer.json"' \
    --set 'data.path="alpaca_en_demo.json"' --set data.max_records=400 \
    --set train.batch_size=4 --set train.grad_accum=1 --set train.eval_every=10 \
    --set train.save_every=0 --set train.log_every=1
}
log "training: fp32 twice, bf16, f16 ($STEPS steps, batch 4 x 512)"
train fp32 fp32
train fp32-again fp32
train bf16 bf16
train f16 f16

log "PyTorch + PEFT, same shape and device"
for p in fp32 bf16 f16; do
  measure "pytorch-$p" "$PYTHON" bench_pytorch.py --shapes "$SHAPE" --threads 1 --device "$DEVICE" \
    --dtype "$p" --steps 10 --out "$OUT/pytorch.jsonl" || echo "pytorch $p FAILED" | tee -a "$OUT/gpu-run.log"
done

log "table"
"$PYTHON" gpu_table.py "$OUT" "$SHAPE" | tee "$OUT/TABLE.md"
cp "$OUT/runs/fp32/REPORT.md" "$OUT/REPORT.md"
cp "$OUT"/runs/fp32/*.svg "$OUT/" 2>/dev/null || true
rm -rf "$MODEL"
log "done: $OUT"
