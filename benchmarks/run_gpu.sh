#!/usr/bin/env bash
# The whole GPU suite as one command, within a time budget, for a GPU machine (e.g. the device tool):
#   bash benchmarks/run_gpu.sh [BUDGET_SECONDS]
# Expects the stack installed (on the lent machines: `source .device-wheels/setup.sh .device-wheels` first, see
# ../shared/device/README.md). Runs the GPU tests, then `python -m ik_fast.bench --suite gpu` (P, M, H, skew and the
# 10^4..10^7-edge sweep of M and H, providers escnn / reference / torch / triton when present), then M and H in TF32,
# writes benchmarks/results/<gpu>-<date>.json and <gpu>-<date>-tf32.json (copied to $OUT when set) and prints a
# short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-420}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest tests -m gpu -q -x 2>&1 | tail -3
# compile every Triton kernel of the suite's configurations first (Triton's disk cache), so no timed step compiles
python3 -m ik_fast.bench --precompile --problems P,M,H,skew --device cuda 2>&1 | tail -12
python3 -m ik_fast.bench --suite gpu --repeats 5 --budget-s "$BUDGET" --timeout 300 | tee /tmp/ik_fast_gpu_table.md
# the same configs M and H in TF32 (torch.set_float32_matmul_precision("high")), every provider alike
python3 -m ik_fast.bench --problems M,H --providers escnn,reference,torch,triton --modes train --device cuda \
  --repeats 5 --precision high --timeout 300 \
  --out "benchmarks/results/$(python3 -c 'import torch,re;print(re.sub("[^a-z0-9]+","-",torch.cuda.get_device_name().lower()).strip("-")[:40])')-$(date +%F)-tf32.json" \
  | tee -a /tmp/ik_fast_gpu_table.md
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true; fi
echo
echo "== short table =="
grep -E "^\| (P|M|H|skew) " /tmp/ik_fast_gpu_table.md || true
