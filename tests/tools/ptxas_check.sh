#!/usr/bin/env bash
# Compile every .cu file of csrc/cuda for the given architectures (compile only, no GPU needed; the CPU wheel of torch
# ships the headers) and print one line per kernel from ptxas -v: kernel, arch, registers, spill stores / loads
# (bytes), stack frame (bytes), static shared memory (bytes). Exits 1 if any kernel spills or uses a stack frame.
#
#   tests/tools/ptxas_check.sh [arch ...]        (default: sm_90 sm_80; PYTHON=python3, NVCC=nvcc, STD=c++17)
#
# (benchmarks/compile_check.py --cuda, which CI runs, compiles the same files with the package's own flags and writes
# compile records; this script is the quick look at ptxas's own per-kernel lines.)
#
# torch >= 2.14 needs STD=c++20 (ATen's own check); dynamic shared memory is sized at launch and is not in the table.
set -euo pipefail
here="$(cd "$(dirname "$0")/../../csrc/cuda" && pwd)"
PYTHON="${PYTHON:-python3}"
NVCC="${NVCC:-nvcc}"
STD="${STD:-c++17}"
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(sm_90 sm_80)
inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bad=0
printf "%-60s %-6s %5s %6s %6s %6s %7s\n" kernel arch regs spillS spillL stack smem
for arch in "${archs[@]}"; do
  for cu in "$here"/*.cu; do
    log="$tmp/$(basename "$cu").$arch.log"
    "$NVCC" -c -std="$STD" -O3 -arch="$arch" -Xptxas -v --expt-relaxed-constexpr $inc \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ "$cu" -o "$tmp/out.o" > "$log" 2>&1 || { cat "$log"; exit 1; }
    # ptxas prints per entry: Compiling entry function '<mangled>' / Function properties / N bytes stack frame,
    # N bytes spill stores, N bytes spill loads / Used N registers, ... [, N bytes smem]
    awk -v arch="$arch" '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ { stack = $1; sst = $5; sld = $9 }
      /Used [0-9]+ registers/ {
        regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
        smem = 0; if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
        printf "%-60s %-6s %5s %6s %6s %6s %7s\n", name, arch, regs, sst, sld, stack, smem
      }' "$log" | while read -r line; do
        name=$(echo "$line" | awk '{print $1}')
        pretty=$(echo "$name" | c++filt 2>/dev/null | sed -E 's/^void //; s/\(.*$//; s/ik_fast_cuda:://g; s/ //g')
        echo "$line" | awk -v p="$pretty" '{ $1 = p; printf "%-60s %-6s %5s %6s %6s %6s %7s\n", $1, $2, $3, $4, $5, $6, $7 }'
      done | tee -a "$tmp/table"
  done
done
if awk '$4 != 0 || $5 != 0 || $6 != 0 { found = 1 } END { exit !found }' "$tmp/table"; then
  echo "FAIL: a kernel spills or uses a stack frame" >&2
  bad=1
fi
exit $bad
