#!/usr/bin/env bash
# Checks the README's install recipe for an existing environment exactly as the README prints it, in a fresh venv:
# extracts the bash block after "<!-- install-recipe -->" in README.md and runs that text, unchanged, with the venv
# activated (from the checkout, as the README says), then reports its time and the venv's size; then, from outside the
# checkout, imports every subpackage of the installed (non-editable) wheel, ik_fast.kernels_triton included, checks
# that the "native" backend is available, and runs a forward pass with the default backend.
# What the environment adds (the recipe's text is not touched):
# - IK_FAST_CACHE: a new folder, so that the recipe's `python -P -m ik_fast.build` compiles (from the wheel's
#   ik_fast/csrc) instead of finding a build in ~/.cache/ik_fast;
# - PIP_RETRIES=0 only where download.pytorch.org does not resolve (this project's machines, which find
#   torch-2.13.0+cpu in pip's configured local wheels): pip then skips that index at once instead of retrying it five
#   times for torch and each of its requirements (about 80 s here).
#   bash scripts/check_install.sh [venv dir]     (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${1:-$(mktemp -d /tmp/ik_fast-install-XXXXXX)/venv}
recipe=$(awk '/<!-- install-recipe -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g{print}' README.md)
[ -n "$recipe" ] || { echo "no install recipe found in README.md" >&2; exit 1; }
echo "== fresh venv: $VENV"
"$PY" -m venv "$VENV"
export IK_FAST_CACHE
IK_FAST_CACHE="$(dirname "$VENV")/ik_fast-cache"
if ! "$PY" -c "import socket; socket.getaddrinfo('download.pytorch.org', 443)" 2>/dev/null; then
  echo "== download.pytorch.org does not resolve here: PIP_RETRIES=0 (pip takes torch from its local wheels)"
  export PIP_RETRIES=0
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
echo "== running the README recipe:"
echo "----- recipe -----"
printf '%s\n' "$recipe"
echo "----- end of recipe -----"
t0=$(date +%s)
bash -euo pipefail -c "$recipe"
echo "== recipe took $(( $(date +%s) - t0 )) s; the venv holds $(du -sb "$VENV" | awk '{printf "%.2f GB", $1/1e9}')"
pip show ik_fast | grep -E "^(Name|Version|Location)"
python -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
cd "$(dirname "$VENV")"  # outside the checkout: the installed package, not the source tree, is imported
python - <<'PY'
import importlib, importlib.util, pkgutil, warnings
warnings.filterwarnings("ignore")
import torch
import ik_fast
assert "site-packages" in ik_fast.__file__, ik_fast.__file__
mods = [m.name for m in pkgutil.walk_packages(ik_fast.__path__, "ik_fast.")]
assert {"ik_fast.backends", "ik_fast.kernels_triton", "ik_fast.build"} <= set(mods), mods
has_triton = importlib.util.find_spec("triton") is not None
needs_triton = []
for name in mods:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:  # the kernels themselves need the optional `triton` extra
        if has_triton or err.name != "triton":
            raise
        needs_triton.append(name)
assert "ik_fast.kernels_triton" not in needs_triton
if needs_triton:
    print("without the triton extra, these modules need triton:", ", ".join(needs_triton))
from importlib.metadata import version
assert version("ik_fast") == ik_fast.__version__, (version("ik_fast"), ik_fast.__version__)
backends = ik_fast.available_backends("cpu")
from ik_fast import _native
info = _native.info()
assert "native" in backends, (backends, ik_fast.backends.unavailable_reason("native", "cpu"))
assert "site-packages" in info["path"] or info["how"] != "prebuilt", info
print(f"native: {info['how']} ({info['path']}; CUDA part: {info['with_cuda']}, {info['cuda_reason']})")
from escnn import gspaces, nn as enn
gs = gspaces.rot2dOnR2(-1, maximum_frequency=4)
G = gs.fibergroup
ft = enn.FieldType(gs, [G.irrep(0), G.irrep(1)])
conv = ik_fast.ImplicitPointConv(ft, ft, n_layers=2, n_channels=2)  # the default backend, "auto"
pos = torch.randn(10, 2)
y = conv(torch.randn(10, ft.size), torch.randint(0, 10, (2, 30)), pos=pos)
assert y.shape == (10, ft.size) and torch.isfinite(y).all()
print(f"OK: ik_fast {ik_fast.__version__} from {ik_fast.__file__}; imported {len(mods)} modules: {', '.join(mods)}; "
      f"backends {backends}; forward pass {tuple(y.shape)}")
PY
