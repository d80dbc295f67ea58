#!/usr/bin/env bash
# Registers, shared memory and spills of every kernel for sm_90, from `ptxas -v` on the PTX that
# NVRTC makes in tests/nvrtc.rs. Fails if NVRTC is unavailable or if any kernel spills.
#
# Needs NVRTC (RLHF_NVRTC=/path/to/libnvrtc.so.12, as for tests/nvrtc.rs) and ptxas: $PTXAS, else
# ptxas on PATH, else the one in the nvidia-cuda-nvcc-cu12 wheel (pip install nvidia-cuda-nvcc-cu12).
set -euo pipefail
cd "$(dirname "$0")/.."

ptx_dir=$(mktemp -d)
trap 'rm -rf "$ptx_dir"' EXIT
if ! log=$(RLHF_PTX_OUT="$ptx_dir" cargo test --quiet --test nvrtc every_kernel_compiles 2>&1); then
  echo "$log" >&2
  exit 1
fi
shopt -s nullglob
ptx_files=("$ptx_dir"/*.compute_90.ptx)
if [ ${#ptx_files[@]} -eq 0 ]; then
  echo "error: NVRTC wrote no PTX (is RLHF_NVRTC set? see tests/nvrtc.rs)" >&2
  exit 1
fi

ptxas=${PTXAS:-$(command -v ptxas || true)}
if [ -z "$ptxas" ]; then
  ptxas=$(python3 -c 'import nvidia.cuda_nvcc as m; print(m.__path__[0] + "/bin/ptxas")' 2>/dev/null || true)
fi
if [ -z "$ptxas" ] || [ ! -x "$ptxas" ]; then
  echo "error: ptxas not found: set PTXAS, put it on PATH, or pip install nvidia-cuda-nvcc-cu12" >&2
  exit 1
fi

printf '%-16s %-28s %5s %10s %12s %12s %12s\n' file kernel regs smem_bytes stack_bytes spill_st spill_ld
spilled=0
for ptx in "${ptx_files[@]}"; do
  file=$(basename "$ptx" .compute_90.ptx)
  # ptxas -v prints, per entry: "Compiling entry function 'NAME'", then "N bytes stack frame,
  # N bytes spill stores, N bytes spill loads", then "Used N registers, [N bytes smem, ]...".
  report=$("$ptxas" -v -arch=sm_90 "$ptx" -o /dev/null 2>&1)
  rows=$(awk -v file="$file" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2); smem = 0 }
    /bytes stack frame/ { stack = $1; st = $5; ld = $9 }
    /Used [0-9]+ registers/ {
      for (i = 1; i <= NF; i++) {
        if ($i == "registers,") regs = $(i - 1)
        if ($i ~ /^smem,?$/) smem = $(i - 2)
      }
      printf "%-16s %-28s %5s %10s %12s %12s %12s\n", file, name, regs, smem, stack, st, ld
    }' <<<"$report")
  echo "$rows"
  if awk '$6 != 0 || $7 != 0 { found = 1 } END { exit !found }' <<<"$rows"; then
    spilled=1
  fi
done
if [ "$spilled" -ne 0 ]; then
  echo "error: a kernel spills registers (spill_st/spill_ld above)" >&2
  exit 1
fi
echo "no kernel spills"
