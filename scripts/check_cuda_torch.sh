#!/usr/bin/env bash
# The first-use native build with a CUDA build of torch on a machine that cannot link CUDA: in a venv with
# torch==2.14.1 (pip's default Linux wheel, a CUDA 13 build: ~5.7 GB in the venv; on this machine from local disk,
# minutes; elsewhere a multi-GB download) and ik_fast installed from a wheel (no prebuilt extension), with CUDA_HOME
# set to a CUDA "toolkit" that has nvcc but no runtime libraries (bin/nvcc only, a link to the machine's nvcc), and an
# empty build cache:
#   1. `import ik_fast; ik_fast.available_backends()` lists "native": the CPU part is compiled, the reason the CUDA
#      part was skipped is printed (the linker's own "cannot find -lcudart"), and no CUDA compile or link is in the
#      build (its build.ninja names no nvcc, no .cu and no -lcudart);
#   2. `IK_FAST_BUILD_CUDA=1 python -m ik_fast.build` fails within a minute (no nvcc compile first) with the linker's
#      message.
# Also prints (checks nothing) what the build would decide with the machine's own CUDA_HOME.
#   bash scripts/check_cuda_torch.sh [venv dir]   (default: a new temporary directory; an existing venv with
#                                                 torch 2.14.1 is reused, with ik_fast reinstalled from this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${1:-$(mktemp -d /tmp/ik_fast-cuda-torch-XXXXXX)/venv}
WORK=$(mktemp -d /tmp/ik_fast-cuda-check-XXXXXX)
TORCH_SPEC="torch==2.14.1"
t0=$(date +%s)
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '2.14.1+cu130')" 2>/dev/null; then
  echo "== reusing $VENV (torch 2.14.1+cu130)"
else
  echo "== fresh venv $VENV: $TORCH_SPEC (a CUDA build of torch)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  "$VENV/bin/python" -m pip install -q "numpy>=1.24,<2" "scipy>=1.10" autograd joblib pymanopt requests ninja
  "$VENV/bin/python" -m pip install -q --no-deps "escnn==1.0.11" "lie_learn==0.0.2"
fi
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$ROOT"
echo "== venv ready after $(( $(date +%s) - t0 )) s; $(du -sb "$VENV" | awk '{printf "%.2f GB", $1/1e9}')"
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'GPU', torch.cuda.is_available())"

# a CUDA "toolkit" with nvcc and nothing to link against
FAKE="$WORK/cuda-without-libraries"
mkdir -p "$FAKE/bin"
REAL_NVCC=$(command -v nvcc || true)
if [ -n "$REAL_NVCC" ]; then
  ln -s "$REAL_NVCC" "$FAKE/bin/nvcc"
else  # no nvcc on this machine: one that reports torch's CUDA version, as far as the decision looks
  printf '#!/bin/sh\necho "Cuda compilation tools, release 13.0, V13.0.0"\n' > "$FAKE/bin/nvcc"
  chmod +x "$FAKE/bin/nvcc"
fi
cd "$WORK"  # outside the checkout: the installed package is imported

echo "== the machine's own CUDA_HOME (for information):"
"$VENV/bin/python" -c "from ik_fast import _build; d = _build.cuda_decision(_build.source_root()); print('  build CUDA part:', d.build, '|', d.reason)" 2>&1 | grep -v "No CUDA runtime is found" || true

echo "== 1. CUDA_HOME=$FAKE, empty cache: import ik_fast; ik_fast.available_backends()"
t1=$(date +%s)
CUDA_HOME="$FAKE" IK_FAST_CACHE="$WORK/cache1" "$VENV/bin/python" - <<'PY' 2> "$WORK/stderr1" | tee "$WORK/out1"
import ik_fast
from ik_fast import _native
print("AVAILABLE:", ik_fast.available_backends("cpu"))
print("INFO:", _native.info())
PY
echo "   took $(( $(date +%s) - t1 )) s; stderr:"
grep -v "No CUDA runtime is found" "$WORK/stderr1" | sed 's/^/   | /'
grep -q "AVAILABLE:.*'native'" "$WORK/out1" || { echo "FAIL: native not available" >&2; exit 1; }
grep -q "CUDA part skipped: linking against CUDA fails" "$WORK/stderr1" || { echo "FAIL: no reason printed" >&2; exit 1; }
grep -q "cannot find -lcudart" "$WORK/stderr1" || { echo "FAIL: the linker's message is not shown" >&2; exit 1; }
ninja_file=$(ls "$WORK"/cache1/*/build.ninja)
if grep -Eq "nvcc|\.cu\b|cudart" "$ninja_file"; then
  echo "FAIL: the CPU-only build still compiles or links CUDA ($ninja_file)" >&2; exit 1
fi
echo "   OK: native available, CPU part only, no CUDA compile or link in $ninja_file"

echo "== 2. IK_FAST_BUILD_CUDA=1 python -m ik_fast.build (same CUDA_HOME, empty cache)"
t2=$(date +%s)
set +e
CUDA_HOME="$FAKE" IK_FAST_CACHE="$WORK/cache2" IK_FAST_BUILD_CUDA=1 "$VENV/bin/python" -m ik_fast.build \
  > "$WORK/out2" 2> "$WORK/stderr2"
rc=$?
set -e
dt=$(( $(date +%s) - t2 ))
grep -v "No CUDA runtime is found" "$WORK/stderr2" | sed 's/^/   | /'
echo "   exit status $rc after $dt s"
[ "$rc" = 1 ] || { echo "FAIL: a forced CUDA build that cannot link must fail (exit 1)" >&2; exit 1; }
grep -q "IK_FAST_BUILD_CUDA=1, but the CUDA part cannot be built here" "$WORK/stderr2" || { echo "FAIL: no reason" >&2; exit 1; }
grep -q "cannot find -lcudart" "$WORK/stderr2" || { echo "FAIL: the linker's message is not shown" >&2; exit 1; }
[ "$dt" -lt 60 ] || { echo "FAIL: the forced build took $dt s to fail (compiled before checking?)" >&2; exit 1; }
if ls "$WORK"/cache2/*/*.o >/dev/null 2>&1; then echo "FAIL: objects were compiled" >&2; exit 1; fi
echo "OK: CUDA torch without CUDA libraries: native available after a CPU-only build; forced CUDA build fails with the linker's message (total $(( $(date +%s) - t0 )) s)"
