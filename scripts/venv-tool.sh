#!/usr/bin/env bash
# Run a development tool (ruff, mypy, pytest...) from the project's venv, so hooks
# and make targets work offline and use the versions pyproject.toml's dev extra
# installed: $CSML_VENV (as scripts/test.sh), else ./.venv, else the active venv,
# else the venv of the program that called us (pre-commit run by its full path),
# else whatever is on PATH.
# Usage: bash scripts/venv-tool.sh TOOL [ARGS...]
set -euo pipefail
tool="$1"
shift
# The caller's interpreter, e.g. /path/venv/bin/python running pre-commit (Linux).
caller="$(tr '\0' '\n' </proc/"$PPID"/cmdline 2>/dev/null | head -n 1 || true)"
caller_venv=""
case "$caller" in */bin/python*) caller_venv="${caller%/bin/*}" ;; esac
for venv in "${CSML_VENV:-}" .venv "${VIRTUAL_ENV:-}" "$caller_venv"; do
  if [ -n "$venv" ] && [ -x "$venv/bin/$tool" ]; then
    exec "$venv/bin/$tool" "$@"
  fi
done
if ! command -v "$tool" >/dev/null 2>&1; then
  echo "$tool not found: create the venv first (bash scripts/test.sh, or pip install -e '.[dev]')" >&2
  exit 1
fi
exec "$tool" "$@"
