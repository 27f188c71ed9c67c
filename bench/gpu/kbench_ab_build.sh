#!/usr/bin/env bash
# Builds two kbench binaries for an A/B that kbench_prev.sh cannot do in one process (it carries
# the decode kernel only, not the merge kernel or the launch code): A from a commit (default HEAD)
# and B from the working tree, or from a second commit. Each is built from its own tree, with that
# tree's kbench.cu and kernels, by kbench_local.sh (nvcc here, no GPU needed). Writes
# bench/gpu/prev/bin/kbench_a and kbench_b; carry bench/gpu/prev to the GPU machine and run
# bench/gpu/kbench_ab.sh there, then bench/gpu/kbench_ab.py on its log.
# Usage: CUDA_ROOT=... bench/gpu/kbench_ab_build.sh [COMMIT_A [COMMIT_B]]
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${CUDA_ROOT:?set CUDA_ROOT to a CUDA toolkit (see kbench_local.sh)}"
root=$PWD
bin=$root/bench/gpu/prev/bin
mkdir -p "$bin"
trees=$(mktemp -d)
cleanup() {
  git -C "$root" worktree remove --force "$trees/a" 2>/dev/null || true
  git -C "$root" worktree remove --force "$trees/b" 2>/dev/null || true
  rm -rf "$trees"
}
trap cleanup EXIT
build() {  # build LABEL COMMIT (empty: the working tree)
  local tree=$root
  if [ -n "$2" ]; then
    tree=$trees/$1
    git -C "$root" worktree add -q --detach "$tree" "$2"
  fi
  (cd "$tree" && bash bench/gpu/kbench_local.sh "$bin/kbench_$1")
  echo "kbench_$1: ${2:-working tree} ($(git -C "$tree" rev-parse --short HEAD)$([ -z "$2" ] && ! git -C "$tree" diff --quiet HEAD -- kernels bench/gpu/kbench.cu && echo ' + changes'))"
}
build a "${1:-HEAD}"
build b "${2:-}"
