#!/usr/bin/env bash
# Lint: ruff check and ruff format --check over the Python sources (settings in pyproject.toml), clang-format
# --dry-run -Werror over csrc/ (settings in .clang-format). Installs the pinned linters into the venv if missing.
#   bash scripts/lint.sh            # check (exit status non-zero on any finding)
#   bash scripts/lint.sh --fix      # apply ruff's fixes, ruff format and clang-format in place
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IK_FAST_VENV:-.venv}
RUFF=0.17.5
CLANG_FORMAT=23.1.3
pip="$VENV/bin/python -m pip --disable-pip-version-check -q"
[ "$("$VENV/bin/ruff" --version 2>/dev/null)" = "ruff $RUFF" ] || $pip install "ruff==$RUFF"
"$VENV/bin/clang-format" --version 2>/dev/null | grep -q " $CLANG_FORMAT" || $pip install "clang-format==$CLANG_FORMAT"
mapfile -t cfiles < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh')
if [ "${1:-}" = "--fix" ]; then
  "$VENV/bin/ruff" check --fix .
  "$VENV/bin/ruff" format .
  "$VENV/bin/clang-format" -i "${cfiles[@]}"
  exit 0
fi
status=0
"$VENV/bin/ruff" check . || status=1
"$VENV/bin/ruff" format --check . || status=1
"$VENV/bin/clang-format" --dry-run -Werror "${cfiles[@]}" || status=1
exit $status
