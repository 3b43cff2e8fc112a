#!/usr/bin/env bash
# Checks the README's install recipe for an existing environment, verbatim, in a fresh venv: extracts the bash block
# after "<!-- install-recipe -->" in README.md, runs it with the venv activated (torch pinned to the local CPU build
# through TORCH_SPEC, since an unpinned torch would download GBs), then, from outside the checkout, imports every
# subpackage of the installed (non-editable) wheel, ik_fast.kernels_triton included, and runs a forward pass.
#   bash scripts/check_install.sh [venv dir]     (default: a new temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${1:-$(mktemp -d /tmp/ik_fast-install-XXXXXX)/venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
recipe=$(awk '/<!-- install-recipe -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g{print}' README.md)
[ -n "$recipe" ] || { echo "no install recipe found in README.md" >&2; exit 1; }
# the one substitution: the torch requirement of the first line becomes the pinned local build
recipe=${recipe//\"torch>=2.11\"/\"$TORCH_SPEC\"}
echo "== fresh venv: $VENV"
"$PY" -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
echo "== running the README recipe"
echo "$recipe"
t0=$(date +%s)
bash -euo pipefail -c "$recipe"
echo "== recipe took $(( $(date +%s) - t0 )) s"
pip show ik_fast | grep -E "^(Name|Version|Location)"
cd "$(dirname "$VENV")"  # outside the checkout: the installed package, not the source tree, is imported
python - <<'PY'
import importlib, importlib.util, pkgutil, warnings
warnings.filterwarnings("ignore")
import torch
import ik_fast
assert "site-packages" in ik_fast.__file__, ik_fast.__file__
mods = [m.name for m in pkgutil.walk_packages(ik_fast.__path__, "ik_fast.")]
assert {"ik_fast.backends", "ik_fast.kernels_triton"} <= set(mods), mods
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
from escnn import gspaces, nn as enn
gs = gspaces.rot2dOnR2(-1, maximum_frequency=4)
G = gs.fibergroup
ft = enn.FieldType(gs, [G.irrep(0), G.irrep(1)])
conv = ik_fast.ImplicitPointConv(ft, ft, n_layers=2, n_channels=2, backend="torch")
pos = torch.randn(10, 2)
y = conv(torch.randn(10, ft.size), torch.randint(0, 10, (2, 30)), pos=pos)
assert y.shape == (10, ft.size) and torch.isfinite(y).all()
print(f"OK: ik_fast {ik_fast.__version__} from {ik_fast.__file__}; imported {len(mods)} modules: {', '.join(mods)}; "
      f"forward pass {tuple(y.shape)}")
PY
