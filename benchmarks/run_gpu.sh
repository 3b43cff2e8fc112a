#!/usr/bin/env bash
# The whole GPU suite as one command, within a time budget, for a GPU machine (e.g. the device tool):
#   bash benchmarks/run_gpu.sh [BUDGET_SECONDS]
# Expects the stack installed (on the lent machines: `source .device-wheels/setup.sh .device-wheels` first, see
# ../shared/device/README.md). Runs the GPU tests, then `python -m ik_fast.bench --suite gpu` (P, M, H, skew and the
# 10^4..10^7-edge sweep of M and H, providers escnn / reference / torch / fused ones when present), writes
# benchmarks/results/<gpu>-<date>.json (copied to $OUT when set) and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-420}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python3 -m pytest tests -m gpu -q -x 2>&1 | tail -3
python3 -m ik_fast.bench --suite gpu --repeats 5 --budget-s "$BUDGET" --timeout 300 | tee /tmp/ik_fast_gpu_table.md
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null || true; fi
echo
echo "== short table =="
grep -E "^\| (P|M|H|skew) " /tmp/ik_fast_gpu_table.md || true
