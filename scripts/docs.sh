#!/usr/bin/env bash
# The documentation site: installs docs/requirements.txt (every version pinned) into the venv when missing, then
#   bash scripts/docs.sh           # mkdocs build --strict into build/site/ (any warning fails)
#   bash scripts/docs.sh serve     # live preview on http://127.0.0.1:8000
# The API pages and the benchmark tables and plots are generated during the build (docs/hooks.py); the plots need
# matplotlib (the project's plots extra), the rest only what docs/requirements.txt pins.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${IK_FAST_VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.ik_fast-docs-$(sha1sum docs/requirements.txt | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  "$PY" -m pip --disable-pip-version-check -q install -r docs/requirements.txt
  touch "$STAMP"
fi
if [ "${1:-build}" = "serve" ]; then
  exec "$PY" -m mkdocs serve
fi
exec "$PY" -m mkdocs build --strict "$@"
