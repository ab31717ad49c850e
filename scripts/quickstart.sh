#!/usr/bin/env bash
# One command on a fresh machine: install CSML, start it on the embedded default
# (SQLite + local workers), create an anonymous identity, detect faces on a sample
# photo, print where the annotated image is, and stop.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CSML_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[all,demo]'
exec "$VENV/bin/csml" demo "$@"
