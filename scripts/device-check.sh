#!/usr/bin/env bash
# The GPU check of plait, in one run on a CUDA machine (written for the H200 that the device
# tool lends: 15 minutes of device time, one command at most 10):
#   1. the plait binary and the bf16 parity tests: with --packed, the ones scripts/pack-cuda.sh
#      laid in .device/ (no build, no cargo, no network: the GPU machine has none of them);
#      else built here with --features cuda (scripts/build-cuda.sh);
#   2. the fixture parity tests on the GPU in bf16 (tests/model_parity_half.rs);
#   3. plait bench --device GPU on both fixtures and on random LoopCoder-V2-shaped weights
#      (14 layers x 5120, bf16, made on the GPU) at loops 1, 2, 3 with the copy bandwidth,
#      after a 2048-token prompt;
#   4. the same shape with conversations decoding together and at depth (for #18 and #19's
#      GPU questions), each bounded in time so that a slow one costs only itself;
#   5. one table, printed last and written to $OUT/table.txt: speed per loop count, the
#      loops 2 / loops 1 decode latency ratio (target <= 1.15), decode at loops 1 as a
#      fraction of the bandwidth ceiling (target >= 0.60), the TTFT of the 2048-token prompt,
#      and the host's share of a step (host ms near p50 ms: bound by launches, not the GPU).
# The table, and the JSON and logs bundled, go to $OUT (else target/device-check).
#
#   scripts/device-check.sh [--packed] [GPU]     # GPU: the device, default cuda:0
# Bounded: parity 120 s, the benches 45 + 45 + 150 + 75 + 75 s: at most 8.5 minutes in all,
# about 3 expected; run it with a limit of 560 s.
set -euo pipefail
cd "$(dirname "$0")/.."

packed=false
if [ "${1:-}" = --packed ]; then
  packed=true
  shift
fi
device=${1:-cuda:0}
out=${OUT:-target/device-check}
mkdir -p "$out"
# The logs and JSON are written in a folder of their own and bundled into
# $out/results.tar.gz after every step (the device tool brings back at most 8 files, and
# what was bundled before a step that ran out of time still comes back); the table goes to
# $out/table.txt.
work=$(mktemp -d)
bundle() { tar -czf "$out/results.tar.gz" -C "$work" .; }
started=$(date +%s)
elapsed() { echo "$(($(date +%s) - started)) s"; }

echo "== GPU" >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$work/gpu.txt" >&2 || true

if $packed; then
  pack=${PLAIT_DEVICE_PACK:-.device}
  [ -e "$pack/bin/plait.xz" ] || { echo "no $pack/bin/plait.xz: run scripts/pack-cuda.sh first" >&2; exit 1; }
  # The binaries, unpacked (xz, else Python's lzma) where they may run.
  bin=$(mktemp -d)/bin
  mkdir -p "$bin"
  for packed_bin in "$pack"/bin/*.xz; do
    name=$(basename "$packed_bin" .xz)
    if command -v xz >/dev/null; then
      xz -dc "$packed_bin" >"$bin/$name"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$packed_bin" "$bin/$name"
    fi
    chmod +x "$bin/$name"
  done
  # CUDA's libraries: the driver's libcuda where the loader or the driver's folder has it,
  # the rest from the Python environment's NVIDIA wheels (nvidia/cu13/lib, nvidia/*/lib).
  dirs=
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for lib in $(cat "$pack/cuda-libs.txt"); do
    ldconfig -p 2>/dev/null | grep -q "^[[:space:]]*$lib " && continue
    found=$(find ${site:+"$site/nvidia"} /usr/local/nvidia /usr/local/cuda/lib64 -name "$lib" 2>/dev/null | head -n 1 || true)
    if [ -n "$found" ]; then dirs=${dirs:+$dirs:}$(dirname "$found"); fi
  done
  export LD_LIBRARY_PATH=$dirs${LD_LIBRARY_PATH:+${dirs:+:}$LD_LIBRARY_PATH}
  # The libraries that travelled (libstdc++), only where this machine lacks its own.
  if ldd "$bin"/* | grep -q 'not found'; then
    export LD_LIBRARY_PATH=$LD_LIBRARY_PATH${LD_LIBRARY_PATH:+:}$PWD/$pack/lib
  fi
  missing=$(ldd "$bin"/* | grep 'not found' | sort -u || true)
  [ -z "$missing" ] || { echo "libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2; echo "$missing" >&2; exit 1; }
  echo "binaries of $(cat "$pack/commit.txt"); need $(cat "$pack/glibc.txt"), have $(ldd --version | head -n 1)" \
    | tee "$work/binaries.txt" >&2
  plait=$bin/plait
  parity=("$bin/model_parity_half" --test-threads 1)
  export PLAIT_TEST_FIXTURES=$PWD/tests/fixtures
else
  wheels=${PLAIT_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/plait/cuda-13.0}/nvidia/cu13
  if [ -z "${CUDA_ROOT:-}" ] && [ ! -x "$wheels/bin/nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_ROOT=/usr/local/cuda
  fi
  echo "== build (--features cuda)" >&2
  scripts/build-cuda.sh build --release --features cuda >"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; exit 1; }
  echo "build: $(elapsed)" >&2
  # The wheels' libraries (cudart, cublas, ...) for the runs below.
  eval "$(scripts/build-cuda.sh env)"
  plait=target/release/plait
  parity=(cargo test --release --features cuda --test model_parity_half)
fi

echo "== parity on $device (bf16), $(elapsed)" >&2
# A failure is reported at the end: the bench figures are worth having anyway.
parity_result=passed
PLAIT_TEST_DEVICE=$device PLAIT_TEST_DTYPE=bf16 timeout 120 "${parity[@]}" >"$work/parity.log" 2>&1 \
  || parity_result=FAILED
grep -E "^test |test result|panicked|max diff" "$work/parity.log" >&2 || true
bundle

# One bench, bounded in time; its JSON in NAME.json, its errors in NAME.log.
bench() {
  local name=$1 limit=$2
  shift 2
  echo "== bench $name on $device, $(elapsed)" >&2
  timeout "$limit" "$plait" bench --device "$device" --json "$@" >"$work/$name.json" 2>"$work/$name.log" \
    || { echo "bench $name failed or ran past $limit s:" >&2; tail -n 5 "$work/$name.log" >&2; rm -f "$work/$name.json"; }
  bundle
}
for fixture in plt-tiny-2loop plt-tiny-3loop-bf16; do
  bench "bench-$fixture" 45 --model "tests/fixtures/$fixture" --loops 1,2,3 \
    --prompt-tokens 256 --gen-tokens 128
done
bench bench-loopcoder-v2 150 --synthetic loopcoder-v2 --loops 1,2,3 --prompt-tokens 2048 \
  --gen-tokens 128 --copy-bandwidth
bench concurrent-loopcoder-v2 75 --synthetic loopcoder-v2 --loops 1,2 --concurrent 1,2,4,8 \
  --prompt-tokens 256 --gen-tokens 32 --no-followup
bench depth-loopcoder-v2 75 --synthetic loopcoder-v2 --loops 1,2 --depth 2048,8192 \
  --gen-tokens 64 --no-followup
echo "== done, $(elapsed)" >&2

python3 - "$work" "$parity_result" <<'EOF' | tee "$out/table.txt"
import json, sys, pathlib
out, parity = pathlib.Path(sys.argv[1]), sys.argv[2]
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "?"
print(f"GPU: {gpu}; bf16 parity tests: {parity}")
print(f"{'model':<30} {'loops':>5} {'prefill t/s':>12} {'TTFT ms':>9} {'decode t/s':>11} "
      f"{'p50 ms':>8} {'host ms':>8} {'vs loops 1':>10} {'of ceiling':>10}")
for name in ["bench-plt-tiny-2loop", "bench-plt-tiny-3loop-bf16", "bench-loopcoder-v2"]:
    run = load(name)
    if run is None:
        print(f"{name}: no result (see {name}.log)")
        continue
    base = {r["loops"]: r for r in run["results"]}[1]["token_ms_p50"]
    for r in run["results"]:
        fraction = r.get("ceiling_fraction")
        print(f"{run['model'][-30:]:<30} {r['loops']:>5} {r['prefill_tok_s']:>12.1f} "
              f"{r['ttft_ms']:>9.1f} {r['decode_tok_s']:>11.1f} {r['token_ms_p50']:>8.3f} "
              f"{r.get('host_ms_p50', float('nan')):>8.3f} "
              f"{r['token_ms_p50'] / base:>9.2f}x "
              f"{'' if fraction is None else f'{fraction:.0%}':>10}")
big = load("bench-loopcoder-v2")
if big is not None:
    by_loops = {r["loops"]: r for r in big["results"]}
    ratio = by_loops[2]["token_ms_p50"] / by_loops[1]["token_ms_p50"]
    fraction = by_loops[1]["ceiling_fraction"]
    print(f"LoopCoder-V2 shape on {big['device']} ({big['weights']}): "
          f"{big['decode_weight_bytes'] / 1e9:.2f} GB of weights per token, copy bandwidth "
          f"{big['copy_gb_s']:.0f} GB/s, ceiling {big['decode_ceiling_tok_s']:.1f} tok/s")
    print(f"decode p50 loops 2 / loops 1: {ratio:.3f}x "
          f"(target <= 1.15: {'met' if ratio <= 1.15 else 'not met'})")
    print(f"decode at loops 1 of the ceiling: {fraction:.1%} "
          f"(target >= 60%: {'met' if fraction >= 0.6 else 'not met'})")
    print(f"TTFT of a {by_loops[1]['prompt_tokens']}-token prompt: "
          + ", ".join(f"loops {l} {r['ttft_ms']:.1f} ms" for l, r in sorted(by_loops.items())))
    if big.get("followup"):
        f = big["followup"]
        print(f"follow-up after {f['context_tokens']} tokens: TTFT cached {f['ttft_cached_ms']:.1f} ms, "
              f"cold {f['ttft_uncached_ms']:.1f} ms")
run = load("concurrent-loopcoder-v2")
if run is not None:
    print("conversations together (LoopCoder-V2 shape, 256-token contexts): aggregate tok/s (x one)")
    solo = {c["loops"]: c["aggregate_tok_s"] for c in run["concurrent"] if c["conversations"] == 1}
    for c in run["concurrent"]:
        print(f"  loops {c['loops']} x {c['conversations']:>2}: {c['aggregate_tok_s']:8.1f} "
              f"({c['aggregate_tok_s'] / solo[c['loops']]:.2f}x), p50 {c['token_ms_p50']:.2f} ms")
run = load("depth-loopcoder-v2")
if run is not None:
    print("decode at depth (LoopCoder-V2 shape): p50 ms per token")
    rows = {(r["depth"], r["loops"]): r["token_ms_p50"] for r in run["results"]}
    for depth in sorted({d for d, _ in rows}):
        l1, l2 = rows[(depth, 1)], rows[(depth, 2)]
        print(f"  depth {depth}: loops 1 {l1:.2f}, loops 2 {l2:.2f} (loops 2 / 1 {l2 / l1:.2f}x)")
EOF
bundle
echo "parity tests on $device in bf16: $parity_result (log: parity.log in $out/results.tar.gz)"
[ "$parity_result" = passed ]
