#!/usr/bin/env bash
# Builds plait with `--features cuda` on a machine with no system CUDA toolkit, and no GPU.
#
#   scripts/build-cuda.sh            # cargo build --release --features cuda
#   scripts/build-cuda.sh test ...   # any other cargo command, run with the same environment
#   source <(scripts/build-cuda.sh env)   # the environment only, for a shell
#
# The CUDA compiler, headers and libraries come from NVIDIA's PyPI wheels, installed with pip
# (its default index) into a folder of the user's cache, never system-wide. Only the CUDA 13
# wheels (`nvidia-cuda-nvcc`, ...) carry nvcc itself: every `nvidia-cuda-nvcc-cu12` release
# ships ptxas alone. So the build is CUDA 13.0, which needs an NVIDIA driver >= 580 on the GPU
# machine (its PTX and libcudart 13 do). The 13.x wheels share one tree, nvidia/cu13, laid
# out as a toolkit install is (bin/, include/, lib/), which is what candle-kernels' build
# (cudaforge) expects around the nvcc it runs. A machine with its own toolkit (say CUDA 12
# for an older driver) uses it instead: set CUDA_ROOT to it.
#
# Linking without a driver: candle 0.11 turns on cudarc's `dynamic-linking` (cargo features
# only add, so plait cannot swap it for `dynamic-loading`), which links `-lcuda`, and
# libcuda.so belongs to the driver, not to any wheel. The script therefore builds a stub
# libcuda.so (soname libcuda.so.1, one dummy function per driver entry point cudarc declares)
# in lib/stubs/, where a toolkit keeps its own stub and cudarc's build script looks for it.
# At run time the binary loads the driver's real libcuda.so.1; the stub is never on
# LD_LIBRARY_PATH. So a `--features cuda` binary starts only where a driver is installed,
# even for `--device cpu` (the default build is the one for machines without a GPU). The other libraries (cudart, cublas, cublasLt, curand, nvrtc) come from
# the wheels and are needed at run time as well: `source <(scripts/build-cuda.sh env)`.
#
# Settings (environment): CUDA_ROOT (an existing toolkit; nothing is installed),
# PLAIT_CUDA_DIR (default ~/.cache/plait/cuda-13.0), CUDA_COMPUTE_CAP (default 90, the
# H200; 80 for an A100, 89 for an L4 or L40).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${XDG_CACHE_HOME:-$HOME/.cache}
dir=${PLAIT_CUDA_DIR:-$cache/plait/cuda-13.0}
root=${CUDA_ROOT:-$dir/nvidia/cu13}

install_toolkit() {
  echo "installing the CUDA 13.0 wheels into $dir" >&2
  rm -rf "$dir"
  # --no-deps and every version pinned: the wheels' own requirements are unpinned and
  # would mix in the newest release's headers and libraries.
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" "nvidia-cuda-cccl==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
  [ -e "$root/lib64" ] || ln -s lib "$root/lib64"
  # The wheels ship only versioned names (libcudart.so.13); the linker wants libcudart.so.
  for lib in "$root"/lib/lib*.so.*; do
    base=${lib%%.so.*}.so
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  "$root/bin/nvcc" --version | tail -n 2 >&2
}

# The stub libcuda.so the linker needs in place of the driver's (see the top of this file).
build_stub() {
  local version src out
  version=$(awk '/^name = "cudarc"/{getline; gsub(/[^0-9.]/, ""); print; exit}' Cargo.lock)
  cargo fetch --quiet
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$version"/src/driver/sys/mod.rs | head -n 1)
  out=$root/lib/stubs
  mkdir -p "$out"
  # Every `extern "C" { fn cuXxx(` of the linked (not dynamically loaded) bindings.
  grep -o '^ *fn cu[A-Za-z0-9_]*(' "$src" | sed 's/^ *fn \(.*\)(/int \1(void) { return 999; }/' \
    | sort -u >"$out/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so" "$out/libcuda-stub.c"
}

if [ -z "${CUDA_ROOT:-}" ]; then
  [ -x "$root/bin/nvcc" ] || install_toolkit
  [ -e "$root/lib/stubs/libcuda.so" ] || build_stub
elif [ ! -x "$root/bin/nvcc" ]; then
  echo "CUDA_ROOT=$root has no bin/nvcc" >&2
  exit 1
fi

export CUDA_ROOT=$root CUDA_PATH=$root CUDA_HOME=$root
export PATH=$root/bin:$PATH
export LD_LIBRARY_PATH=$root/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ "${1:-}" = env ]; then
  for var in CUDA_ROOT CUDA_PATH CUDA_HOME PATH LD_LIBRARY_PATH CUDA_COMPUTE_CAP; do
    printf 'export %s=%q\n' "$var" "${!var}"
  done
  exit 0
fi

if [ $# -eq 0 ]; then
  set -- build --release --features cuda
fi
started=$(date +%s)
cargo "$@"
echo "cargo $* took $(($(date +%s) - started)) s" >&2
