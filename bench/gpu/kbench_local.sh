#!/usr/bin/env bash
# Builds kbench on a machine with no GPU and no CUDA driver, to carry the binary to the GPU
# machine (the device's time then goes to running it, not to its ~40-s build, and one call can
# compare several builds). Needs a CUDA toolkit's nvcc, headers and static runtime under
# CUDA_ROOT (bin/nvcc, include/, lib/libcudart_static.a), e.g. the one NVIDIA ships as pip
# wheels. The driver entry points kbench calls are linked against a stub libcuda.so.1 generated
# from the object's undefined symbols; on the GPU machine the real driver is loaded instead.
# Usage: CUDA_ROOT=... bench/gpu/kbench_local.sh OUT_BINARY [nvcc flags, e.g. -DKBENCH_TRACE]
# Run bench/gpu/kbench_prev.sh first for an A/B (the prev_* variants).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CUDA_ROOT:?set CUDA_ROOT to a CUDA toolkit (bin/nvcc, include/, lib/)}"
out=${1:?usage: kbench_local.sh OUT_BINARY [nvcc flags]}
shift
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
nvcc="$CUDA_ROOT/bin/nvcc"
"$nvcc" -O3 -std=c++17 -arch=sm_90a -ftz=false -prec-div=true -prec-sqrt=true "$@" \
    -I"$CUDA_ROOT/include" -c -o "$work/kbench.o" bench/gpu/kbench.cu
nm -u "$work/kbench.o" | awk '$2 ~ /^cu[A-Z]/ {print "int " $2 "(void) { return 0; }"}' > "$work/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so" "$work/stub.c"
mkdir -p "$(dirname "$out")"
"$nvcc" -arch=sm_90a -o "$out" "$work/kbench.o" -L"$work" -L"$CUDA_ROOT/lib" -lcuda
echo "$out: $(wc -c < "$out") bytes, driver entry points: $(grep -c . "$work/stub.c")"
