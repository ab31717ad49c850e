#!/usr/bin/env bash
# The whole test suite, from a fresh machine: system packages, a venv, lint, types, tests.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CSML_VENV:-.venv}"
PY="${PYTHON:-python3}"

# System packages: PostgreSQL (tests start their own server) and Chromium (tests/e2e/web, headless).
need=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium chromium-driver)
command -v ip >/dev/null 2>&1 || need+=(iproute2)  # tests/e2e/multihost: network namespaces
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing system packages: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# DyNet builds from source only: build once, cache a self-contained wheel outside the clone.
whl="$(PYTHON="$VENV/bin/python" bash .ci/build-dynet-wheel.sh | tail -n 1)"
"$VENV/bin/python" -m pip install -q "$whl"
"$VENV/bin/python" -m pip install -q -e '.[dev,dynet]'
# Container images (Podman; installs podman, runc, debootstrap if missing): tests/e2e/containers uses them.
PYTHON="$VENV/bin/python" bash scripts/build-images.sh
export CSML_USE_BUILT_IMAGES=1

echo "== ruff"
"$VENV/bin/ruff" check src tests bench deploy
"$VENV/bin/ruff" format --check src tests bench deploy
echo "== mypy (src and tests, then bench)"
"$VENV/bin/mypy"
"$VENV/bin/mypy" bench  # its scripts import each other by bare name: checked as files
# In CI, tests needing root facilities (namespaces, containers, a browser) fail rather than skip.
if [ "${CI:-}" = true ]; then export CSML_REQUIRE_NETNS=1; fi
echo "== pytest"
"$VENV/bin/pytest" "$@"
