#!/usr/bin/env bash
# Training-step throughput of one process against MPI ranks, on smollm2-demo's settings:
#   1 process x 2 threads | 1 process x 1 thread | mpirun -np 2, 1 thread each
# The variants alternate, round after round. Each run trains STEPS steps with no validation,
# no checkpoints and no sample prompts, so only training steps are timed: tokens/s is the
# job's real tokens between the first step's metrics line and the last, over the time between
# them (the first step, which warms the allocator and caches, is left out).
#
# Needs a `--features mpi` build and the demo's assets (`lorasft train --preset smollm2-demo`
# fetches them once). Usage: scripts/bench-ranks.sh [ROUNDS [STEPS]]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
steps=${2:-6}
bin=${LORASFT_BIN:-target/release/lorasft}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
# A checkout's fetched assets serve as the cache unless one is named.
if [ -z "${LORASFT_CACHE:-}" ] && [ -d .cache/assets/smollm2 ]; then export LORASFT_CACHE=$PWD/.cache/assets; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Runs one variant (NAME, THREADS, RANKS) and prints its tokens/s.
run() {
  local name=$1 threads=$2 ranks=$3 out="$tmp/$1"
  local args=(train --preset smollm2-demo --max-steps "$steps" --no-validation --quiet --overwrite
    --set train.save_every=0 --set 'prompts=[]' --set "run.out_dir=\"$out\"")
  local launch=(env RAYON_NUM_THREADS="$threads")
  [ "$ranks" = 1 ] || launch=(mpirun -np "$ranks" --bind-to core -x RAYON_NUM_THREADS="$threads")
  if ! "${launch[@]}" "$bin" "${args[@]}" >/dev/null 2>"$tmp/$name.log"; then
    cat "$tmp/$name.log" >&2
    exit 1
  fi
  # tokens_seen and elapsed_s of the first and the last metrics line.
  awk -F'[,:}]' '
    { for (i = 1; i < NF; i++) { if ($i ~ /"tokens_seen"/) t = $(i+1); if ($i ~ /"elapsed_s"/) e = $(i+1) } }
    NR == 1 { t0 = t; e0 = e } END { printf "%.1f\n", (t - t0) / (e - e0) }' "$out/smollm2-demo/metrics.jsonl"
}

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); cores: $(nproc); AVX-512: $(grep -q avx512f /proc/cpuinfo && echo yes || echo no)"
echo "smollm2-demo settings, $steps steps per run (step 1 excluded), $rounds rounds"
printf "%-6s %16s %16s %16s %12s %12s %12s\n" round "1p x 2t tok/s" "1p x 1t tok/s" "2r x 1t tok/s" "2r / 1p1t" "2r / 1p2t" "1p2t / 1p1t"
ratios=()
for r in $(seq 1 "$rounds"); do
  a=$(run p2 2 1); b=$(run p1 1 1); c=$(run r2 1 2)
  line=$(awk -v a="$a" -v b="$b" -v c="$c" 'BEGIN { printf "%.3f %.3f %.3f", c / b, c / a, a / b }')
  ratios+=("$line")
  read -r x y z <<<"$line"
  printf "%-6s %16s %16s %16s %11sx %11sx %11sx\n" "$r" "$a" "$b" "$c" "$x" "$y" "$z"
done
printf '%s\n' "${ratios[@]}" | awk '
  { x[NR] = $1; y[NR] = $2; z[NR] = $3 }
  function median(v, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2 }
  END { printf "%-6s %16s %16s %16s %11.3fx %11.3fx %11.3fx\n", "median", "", "", "", median(x, NR), median(y, NR), median(z, NR) }'
