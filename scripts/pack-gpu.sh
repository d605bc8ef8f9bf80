#!/usr/bin/env bash
# Fills .gpu/ (ignored; carried to the GPU host) with what scripts/gpu-run.sh needs there:
# the scripts, the Llama tokenizer and the alpaca_en_demo dataset from scripts/fetch-assets.sh,
# and, when BIN is given, that binary compressed as lorasft.xz (scripts/build-cuda.sh does it).
# Usage: scripts/pack-gpu.sh [BIN]
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
cp scripts/gpu-run.sh scripts/gpu_table.py scripts/bench_pytorch.py .gpu/
cp "$(dirname "$0")/gpu-env.sh" .gpu/
# The Llama tokenizer, converted by lorasft itself from llama.cpp's vocabulary (CPU build).
if [ ! -f .cache/assets/tok/llama-spm/tokenizer.json ]; then
  mkdir -p .cache/assets/tok/llama-spm
  cargo run --release --quiet -- tokenizer from-gguf .cache/assets/vocab/ggml-vocab-llama-spm.gguf \
    --out .cache/assets/tok/llama-spm/tokenizer.json
fi
cp .cache/assets/tok/llama-spm/tokenizer.json .cache/assets/data/alpaca_en_demo.json .gpu/
[ -f .cache/assets/tok/llama-spm/tokenizer_config.json ] && cp .cache/assets/tok/llama-spm/tokenizer_config.json .gpu/
if [ -n "${1:-}" ]; then
  xz -T2 -9 -c "$1" > .gpu/lorasft.xz
  rm -f .gpu/lorasft
fi
ls -l .gpu
