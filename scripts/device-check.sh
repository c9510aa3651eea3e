#!/usr/bin/env bash
# The GPU check of plait, in one run on a CUDA machine (written for an H200):
#   1. build with --features cuda (scripts/build-cuda.sh), unless that build is there;
#   2. the fixture parity tests on the GPU in bf16 (tests/model_parity_half.rs);
#   3. plait bench --device cuda on both fixtures and on random LoopCoder-V2-shaped weights
#      (14 layers x 5120, bf16, made on the GPU) at loops 1, 2, 3, with the copy bandwidth;
#   4. one table: speed per loop count, the loops 2 / loops 1 decode latency ratio
#      (target <= 1.15) and decode at loops 1 as a fraction of the bandwidth ceiling
#      (target >= 0.60).
# Nothing is fetched when the build, the cargo registry and the CUDA wheels are already there
# (the machine may have no network); a machine with its own toolkit and no wheels uses it
# (CUDA_ROOT, else /usr/local/cuda). JSON and logs go to $OUT (else target/device-check).
#
#   scripts/device-check.sh [GPU]      # GPU: the device, default cuda:0
set -euo pipefail
cd "$(dirname "$0")/.."

device=${1:-cuda:0}
out=${OUT:-target/device-check}
mkdir -p "$out"
wheels=${PLAIT_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/plait/cuda-13.0}/nvidia/cu13
if [ -z "${CUDA_ROOT:-}" ] && [ ! -x "$wheels/bin/nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_ROOT=/usr/local/cuda
fi

echo "== GPU" >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true

echo "== build (--features cuda)" >&2
started=$(date +%s)
scripts/build-cuda.sh build --release --features cuda >"$out/build.log" 2>&1 \
  || { tail -n 30 "$out/build.log" >&2; exit 1; }
echo "build: $(($(date +%s) - started)) s" >&2
# The wheels' libraries (cudart, cublas, ...) for the runs below.
eval "$(scripts/build-cuda.sh env)"
plait=target/release/plait

echo "== parity on $device (bf16)" >&2
# A failure is reported at the end: the bench figures are worth having anyway.
parity=passed
PLAIT_TEST_DEVICE=$device PLAIT_TEST_DTYPE=bf16 \
  cargo test --release --features cuda --test model_parity_half >"$out/parity.log" 2>&1 \
  || parity=FAILED
grep -E "^test |test result|panicked|max diff" "$out/parity.log" >&2 || true

echo "== bench on $device" >&2
common=(--device "$device" --loops 1,2,3 --prompt-tokens 256 --gen-tokens 128 --json)
for fixture in plt-tiny-2loop plt-tiny-3loop-bf16; do
  "$plait" bench "${common[@]}" --model "tests/fixtures/$fixture" >"$out/bench-$fixture.json"
done
"$plait" bench "${common[@]}" --synthetic loopcoder-v2 --copy-bandwidth \
  >"$out/bench-loopcoder-v2.json"

python3 - "$out" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = [json.loads(p.read_text()) for p in sorted(out.glob("bench-*.json"))]
print(f"{'model':<30} {'loops':>5} {'prefill t/s':>12} {'decode t/s':>11} {'p50 ms':>8} "
      f"{'vs loops 1':>10} {'of ceiling':>10}")
for run in runs:
    by_loops = {r["loops"]: r for r in run["results"]}
    base = by_loops[1]["token_ms_p50"]
    for r in run["results"]:
        fraction = r.get("ceiling_fraction")
        print(f"{run['model'][-30:]:<30} {r['loops']:>5} {r['prefill_tok_s']:>12.1f} "
              f"{r['decode_tok_s']:>11.1f} {r['token_ms_p50']:>8.3f} "
              f"{r['token_ms_p50'] / base:>9.2f}x "
              f"{'' if fraction is None else f'{fraction:.0%}':>10}")
big = next(run for run in runs if run["model"].endswith("loopcoder-v2"))
by_loops = {r["loops"]: r for r in big["results"]}
ratio = by_loops[2]["token_ms_p50"] / by_loops[1]["token_ms_p50"]
fraction = by_loops[1]["ceiling_fraction"]
print(f"LoopCoder-V2 shape on {big['device']} ({big['weights']}): "
      f"{big['decode_weight_bytes'] / 1e9:.2f} GB of weights per token, "
      f"copy bandwidth {big['copy_gb_s']:.0f} GB/s, ceiling {big['decode_ceiling_tok_s']:.1f} tok/s")
print(f"decode p50 loops 2 / loops 1: {ratio:.3f}x (target <= 1.15: {'met' if ratio <= 1.15 else 'not met'})")
print(f"decode at loops 1 of the ceiling: {fraction:.1%} (target >= 60%: {'met' if fraction >= 0.6 else 'not met'})")
EOF
echo "parity tests on $device in bf16: $parity (log: $out/parity.log)"
[ "$parity" = passed ]
