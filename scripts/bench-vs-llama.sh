#!/usr/bin/env bash
# The runs behind docs/PERFORMANCE.md's long-context table: plait and llama.cpp's
# llama-bench on the default model, one after the other in one session, 2 threads, then
# LoopCoder-V2's shape (random weights) at depth. Writes each run's output under $1
# (default: target/bench-vs-llama) and prints it. Takes about 15 minutes on two cores.
# Needs a release build (cargo build --release) and llama-bench:
#   bash scripts/install-llama-server.sh llama-bench
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/bench-vs-llama}
mkdir -p "$out"
plait=./target/release/plait
llama_bench=.test-clients/llama/build/bin/llama-bench
model=${PLAIT_DATA_DIR:-$HOME/.local/share/plait}/models/SmolLM2-135M-Instruct.Q4_1.gguf
# The default model's context is 8192 positions: the deepest decode that fits 64 tokens
# and plait's 2 untimed warm-up steps.
depths=0,2048,4096,8126

run() {
  local name=$1
  shift
  echo "== $name: $*" | tee "$out/$name.txt"
  "$@" 2>&1 | tee -a "$out/$name.txt"
}

date -u +"%Y-%m-%d %H:%M UTC" | tee "$out/date.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee "$out/cpu.txt"
# Prefill, alternating the two programs.
run llama-pp "$llama_bench" -m "$model" -t 2 -p 2048,4096 -n 0 -r 2
run plait-pp2048 "$plait" bench --threads 2 --loops 1 --prompt-tokens 2048 --gen-tokens 1 \
  --repeat 2 --no-followup
run plait-pp4096 "$plait" bench --threads 2 --loops 1 --prompt-tokens 4096 --gen-tokens 1 \
  --repeat 2 --no-followup
# Decode at depth.
run llama-tg "$llama_bench" -m "$model" -t 2 -p 0 -n 64 -d "$depths" -r 2
run plait-depth "$plait" bench --threads 2 --loops 1,2 --depth "$depths" --gen-tokens 64 \
  --repeat 2 --no-followup --copy-bandwidth
# The follow-up turn through the engine.
run plait-followup "$plait" bench --threads 2 --loops 1 --prompt-tokens 256 --gen-tokens 16 \
  --repeat 3
# LoopCoder-V2's shape stored as q4_1, random K/V at each depth (about 6 GB of RAM).
run loopcoder-depth "$plait" bench --threads 2 --synthetic loopcoder-v2 --quant q4_1 \
  --loops 1,2 --depth 0,2048,8192 --gen-tokens 8 --repeat 2 --no-followup --copy-bandwidth
