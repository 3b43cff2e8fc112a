#!/usr/bin/env bash
# One entry point for users and CI:
#   bash scripts/run.sh demo    # set up (first time) and run the demo: train the O(3) QM9 model's quick preset
#   bash scripts/run.sh test    # set up (first time) and run the test suite
#   bash scripts/run.sh bench   # set up and run the CPU benchmark suite, then the report of every record (python benchmarks/report.py --readme updates the README's results table)
#   bash scripts/run.sh setup   # only set up
# Setup makes .venv with a pinned CPU stack: torch 2.13.0's CPU build, escnn without py3nj (no Fortran compiler
# needed; escnn falls back to a numerical Clebsch-Gordan method), NumPy 1 (lie_learn's wheel is built against it) and
# Triton, then installs ik_fast in place, which builds its native extension (csrc/ -> ik_fast/_C*.so, CPU part; a C++
# compiler and ninja; 134-284 s measured on 2 busy cores).
# Where torch comes from: `torch==2.13.0` with PyTorch's CPU index (https://download.pytorch.org/whl/cpu) as an extra
# index, so that pip takes torch-2.13.0+cpu (a local version, which pip prefers to PyPI's 2.13.0): 0.76 GB installed,
# the whole .venv about 2.7 GB. On this project's machines, where download.pytorch.org does not resolve, pip finds
# the same wheel in its configured local wheels (and skips that index at once: PIP_RETRIES=0). Without either (no
# access to PyTorch's index, no local wheel) the same pin resolves to PyPI's torch 2.13.0, which on Linux x86_64 is
# the CUDA build with its nvidia-* libraries: several GB of downloads (torch 2.14.1+cu130's came to about 3 GB of
# wheels and a 5.7 GB venv here); it runs on the CPU too, and setup says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${IK_FAST_VENV:-.venv}
STAMP="$VENV/.ik_fast-setup-v5"

setup() {
  if [ -f "$STAMP" ]; then return; fi
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
  # torch first and pinned (an unpinned torch pulls a multi-GB CUDA build), its CPU build (see the top of this file)
  if "$PY" -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" 2>/dev/null; then
    $pip install "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  else
    PIP_RETRIES=0 $pip install "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
  "$VENV/bin/python" -W ignore -c "import torch, sys; torch.version.cuda and print('run.sh: note: torch', torch.__version__,
    'is the CUDA build (PyTorch CPU index not reachable); it works on the CPU too', file=sys.stderr)"
  $pip install "numpy>=1.24,<2" "scipy>=1.10,<1.15" autograd joblib pymanopt requests
  $pip install --no-deps "escnn==1.0.11" "lie_learn==0.0.2"
  $pip install --no-deps "qm9pack==1.0.3"   # QM9 data only; its pandas requirement would pull NumPy 2
  # escnn's R3PointConv (the benchmarks' escnn provider) needs torch_geometric; plots need matplotlib
  # (pytest-xdist: the suite runs on every core, one worker each; see test below)
  $pip install "torch_geometric>=2.5,<2.9" "matplotlib>=3.7,<3.10" "pytest>=8" "pytest-benchmark>=4" "hypothesis>=6" \
    "pytest-xdist>=3.5" "numpy<2"
  $pip install "tqdm>=4.60"   # the trainer's progress bar (python -m ik_fast.models.train)
  # the fused backend's kernels; without a GPU the tests run them in Triton's interpreter (TRITON_INTERPRET=1)
  $pip install "triton>=3.6,<3.10"
  # the native extension: torch.utils.cpp_extension builds it with ninja; setuptools builds it in place (editable)
  $pip install ninja "setuptools>=64" wheel
  $pip install --no-deps --no-build-isolation -e .
  touch "$STAMP"
}

cmd=${1:-test}
shift || true
setup
export PYTHONWARNINGS=${PYTHONWARNINGS:-"ignore::UserWarning:escnn.group.groups.so3group"}
case "$cmd" in
  setup) ;;
  demo)  exec "$VENV/bin/python" examples/demo.py "$@" ;;
  test)
    # one pytest-xdist worker per core, at most 4 (each imports the whole stack; IK_FAST_TEST_WORKERS overrides, 1:
    # in one process); most tests run Triton's interpreter on one core, so two workers take about half the time on
    # CI's 2 cores. A venv set up before pytest-xdist was added runs in one process.
    workers=${IK_FAST_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
    [ "$workers" -le 4 ] || workers=4
    if [ "$workers" -gt 1 ] && "$VENV/bin/python" -c "import xdist" 2>/dev/null; then
      set -- -n "$workers" "$@"
    fi
    exec "$VENV/bin/python" -m pytest tests -q "$@" ;;
  bench) "$VENV/bin/python" -m ik_fast.tools.bench --suite cpu "$@" && exec "$VENV/bin/python" benchmarks/report.py ;;
  *) echo "usage: bash scripts/run.sh {demo|test|bench|setup}" >&2; exit 2 ;;
esac
