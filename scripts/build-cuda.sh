#!/usr/bin/env bash
# Builds lorasft with `--features cuda` on a machine without a GPU, then packs the binary for
# the GPU host into .gpu/ (scripts/pack-gpu.sh: lorasft.xz, gpu-run.sh and what it needs).
# The CUDA 13.0 toolkit comes from PyPI wheels (nvcc, nvvm, cudart, cublas, curand), pinned to
# 13.0 because newer PTX cannot be loaded by the r580 driver; libcuda is a link-time stub and
# comes from the driver at run time.
# Usage: scripts/build-cuda.sh            (env: CUDA_TOOLKIT_DIR=/opt/cuda13-pip,
#                                                CUDA_COMPUTE_CAP=90 for H100/H200, 75 for a T4)
# The CPU build and CI are untouched: this build has its own target dir, target/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
TK=${CUDA_TOOLKIT_DIR:-/opt/cuda13-pip}
CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -f "$TK/env.sh" ]; then
  mkdir -p "$TK"
  [ -x "$TK/venv/bin/python" ] || python3 -m venv "$TK/venv"
  "$TK/venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-crt==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" \
    "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
  CU=$("$TK/venv/bin/python" -c "import nvidia,os; print(os.path.join(list(nvidia.__path__)[0],'cu13'))")
  mkdir -p "$TK/cuda/lib/stubs"
  for d in bin include nvvm; do ln -sfn "$CU/$d" "$TK/cuda/$d"; done
  for l in cublas cublasLt cudart nvrtc; do ln -sfn "$CU/lib/lib$l.so.13" "$TK/cuda/lib/lib$l.so"; done
  ln -sfn "$CU/lib/libcurand.so.10" "$TK/cuda/lib/libcurand.so"
  # A stub libcuda exporting every driver symbol cudarc declares is enough to link.
  cargo fetch --quiet
  syms=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$syms" | sed -E 's/pub unsafe fn ([A-Za-z0-9_]+)\(/\1/' \
    | sort -u | awk '{print "int " $1 "(void){return 999;}"}' > "$TK/cuda/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$TK/cuda/lib/stubs/libcuda.so" \
    "$TK/cuda/lib/stubs/libcuda_stub.c"
  cat > "$TK/env.sh" <<ENV
export CUDA_ROOT=$TK/cuda CUDA_HOME=$TK/cuda CUDA_PATH=$TK/cuda
export PATH=$TK/cuda/bin:\$PATH
export CUDARC_CUDA_VERSION=13000
export NVCC_CCBIN=gcc
export CUDAFORGE_THREADS=2
ENV
fi
# shellcheck disable=SC1091
source "$TK/env.sh"
export CUDA_COMPUTE_CAP=$CAP
cargo build --release --features cuda --target-dir target/cuda --bin lorasft ${CUDA_BENCH:+--benches}
# .gpu/: the compressed binary, the GPU-side scripts, tokenizer and dataset (when fetched).
if [ -f .cache/assets/data/alpaca_en_demo.json ]; then
  scripts/pack-gpu.sh target/cuda/release/lorasft
else
  mkdir -p .gpu && xz -T2 -9 -c target/cuda/release/lorasft > .gpu/lorasft.xz
  echo "run scripts/fetch-assets.sh, then scripts/pack-gpu.sh target/cuda/release/lorasft" >&2
fi
