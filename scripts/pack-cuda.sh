#!/usr/bin/env bash
# Builds plait for the GPU machine on this one, and lays what the GPU check runs in one folder
# that travels with the working tree (the GPU machine has no Rust toolchain and no network):
#
#   scripts/pack-cuda.sh            # build (most of an hour the first time on 2 cores), pack, check
#   scripts/device-check.sh --packed  # there: the check from the folder, no build
#
# The folder (default .device/, ignored by git; PLAIT_DEVICE_PACK to move it) holds
#   bin/plait.xz            the `--features cuda` release binary, stripped and compressed
#   bin/model_parity_half.xz  the bf16 parity tests, likewise (fixtures: PLAIT_TEST_FIXTURES)
#   lib/                    any library they load that is neither the C runtime nor CUDA's
#   cuda-libs.txt           the CUDA libraries they load, found there in the driver's folder
#                           and the Python environment's NVIDIA wheels (nvidia/*/lib)
#   glibc.txt, commit.txt   the newest glibc symbol they need; the commit they were built from
# The CPU code is built for x86-64-v3 (AVX2, FMA: every x86-64 server of the last decade),
# not for this machine's `native`, which may name instructions the GPU machine lacks. It
# builds in its own target folder, so the everyday `native` build is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

pack=${PLAIT_DEVICE_PACK:-.device}
export CARGO_TARGET_DIR=${PLAIT_CUDA_TARGET_DIR:-target/cuda-x86-64-v3}
# RUSTFLAGS replaces .cargo/config.toml's build.rustflags (target-cpu=native).
export RUSTFLAGS="-C target-cpu=x86-64-v3"
limit=$((64 * 1024 * 1024))

# One build; the binaries' paths (the test binary's name carries a hash) from cargo's report.
artifacts=$(scripts/build-cuda.sh build --release --features cuda --bin plait \
  --test model_parity_half --message-format=json)
executable() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] \
            and m.get("executable"):
        print(m["executable"])' "$1" <<<"$artifacts"
}
plait_bin=$(executable plait)
test_bin=$(executable model_parity_half)
[ -x "$plait_bin" ] || { echo "no plait binary was built" >&2; exit 1; }
[ -x "$test_bin" ] || { echo "no model_parity_half test binary was built" >&2; exit 1; }

rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/lib"
# Which code the binaries are: the GPU check prints it (rebuild after model code changes).
dirty=$(git status --porcelain -- src tests Cargo.toml Cargo.lock | grep -q . && echo " with uncommitted changes" || true)
echo "$(git rev-parse --short HEAD)$dirty, built $(date -u +%FT%TZ)" >"$pack/commit.txt"
# Stripped and checked here, then carried xz-compressed: the kernels' PTX in each binary
# makes them 120 MiB together, 16 MiB compressed.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/bin" "$stage/driver"
strip -o "$stage/bin/plait" "$plait_bin"
strip -o "$stage/bin/model_parity_half" "$test_bin"

# What the binaries load, as the loader here resolves it with the wheels' libraries on the
# path (build-cuda.sh env): the C runtime is the GPU machine's own; CUDA's libraries are the
# driver's (libcuda) and its Python environment's wheels; anything else travels in lib/
# (used there only where the machine lacks it, as it may libstdc++).
eval "$(scripts/build-cuda.sh env)"
: >"$pack/cuda-libs.txt"
for bin in "$stage"/bin/*; do
  ldd "$bin" | while read -r name _ path _; do
    case $name in
      linux-vdso.so.* | /lib64/ld-linux-x86-64.so.* | ld-linux-x86-64.so.* | libc.so.* | libm.so.* \
        | libgcc_s.so.* | libpthread.so.* | libdl.so.* | librt.so.*) ;;
      libcuda.so.* | libcudart.so.* | libcublas.so.* | libcublasLt.so.* | libcurand.so.* \
        | libnvrtc.so.*)
        echo "$name" >>"$pack/cuda-libs.txt" ;;
      *)
        [ -e "$path" ] || { echo "$bin needs $name, which is not found here" >&2; exit 1; }
        cp -L "$path" "$pack/lib/" ;;
    esac
  done
done
sort -u -o "$pack/cuda-libs.txt" "$pack/cuda-libs.txt"

# The newest C runtime symbol the binaries ask for: the GPU machine's glibc must have it.
glibc=$(objdump -T "$stage"/bin/* | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
echo "$glibc" >"$pack/glibc.txt"

# The local check: the binaries start (with the link-time stub standing in for the driver's
# libcuda.so.1, which this machine has not) and a CUDA device is refused cleanly, no panic.
ln -s "$CUDA_ROOT/lib/stubs/libcuda.so" "$stage/driver/libcuda.so.1"
export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$stage/driver
unset RUST_BACKTRACE
"$stage/bin/plait" --version >/dev/null
"$stage/bin/model_parity_half" --list >/dev/null
if err=$("$stage/bin/plait" bench --device cuda --model tests/fixtures/plt-tiny-2loop \
  --loops 1 --prompt-tokens 8 --gen-tokens 2 --no-followup 2>&1); then
  echo "plait bench --device cuda ran on a machine with no GPU" >&2
  exit 1
fi
case $err in
  *panicked*) echo "plait bench --device cuda panicked with no GPU: $err" >&2; exit 1 ;;
esac
echo "with no GPU here, --device cuda is refused: $err" >&2

for bin in "$stage"/bin/*; do
  xz -9 -T0 -c "$bin" >"$pack/bin/$(basename "$bin").xz"
done
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -n 1 | cut -f 1)
size=$(du -sb "$pack" | cut -f 1)
echo "packed $pack: $((size / 1024 / 1024)) MiB, with the tree $(((size + tree) / 1024 / 1024)) MiB" \
  "(limit 64); needs $glibc and $(tr '\n' ' ' <"$pack/cuda-libs.txt")" >&2
[ $((size + tree)) -lt $limit ] || { echo "over the 64 MiB a device run carries" >&2; exit 1; }
