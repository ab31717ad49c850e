# Convenience targets; each is one script or tool, so CI and people run the same thing.
# Tools come from ./.venv when it exists (scripts/test.sh makes it), else from PATH;
# override any of them, e.g. `make lint RUFF=/path/to/venv/bin/ruff`.
tool = $(if $(wildcard .venv/bin/$(1)),.venv/bin/$(1),$(1))
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
PYTEST ?= $(call tool,pytest)
RUFF ?= $(call tool,ruff)
MYPY ?= $(call tool,mypy)
MKDOCS ?= $(call tool,mkdocs)
LINTED = src tests bench deploy

.PHONY: lint typecheck test-fast test bench bench-full bench-full-quick docs images wheelhouse test-containers bench-containers

# Lint and formatting (ruff), as scripts/test.sh and pre-commit check them.
lint:
	$(RUFF) check $(LINTED)
	$(RUFF) format --check $(LINTED)

# mypy --strict over src/ and tests/ (configured in pyproject.toml), then bench/.
typecheck:
	$(MYPY)
	$(MYPY) bench

# The fast tier: no root, processes, servers or PostgreSQL.
test-fast:
	$(PYTEST) -q tests/unit

# Everything, from a fresh machine: system packages, venv, images, lint, types, all tiers.
test:
	bash scripts/test.sh

# The core benchmark (throughput, latency, OpenCV overhead); see bench/README.md for the others.
bench:
	$(PYTHON) bench/core.py

# Every acceptance benchmark of the performance issue (a-e, the 1,000-photo batch and
# 1 -> 2 -> 4 coordinators on PostgreSQL included), one table, bench/results/acceptance-*.json.
# Extra options: make bench-full BENCH_ARGS="--only batch,e"
bench-full:
	$(PYTHON) bench/acceptance.py $(BENCH_ARGS)

# The same at smoke-test sizes (a few minutes).
bench-full-quick:
	$(PYTHON) bench/acceptance.py --quick $(BENCH_ARGS)

# The documentation site, failing on any warning or broken link.
docs:
	$(MKDOCS) build --strict

# Every container image (Podman, as root): localhost/csml-*:dev. See deploy/images/.
images:
	PYTHON=$(PYTHON) bash scripts/build-images.sh

# Only the wheelhouse the images install from (~/.cache/csml/wheelhouse).
wheelhouse:
	PYTHON=$(PYTHON) bash scripts/build-images.sh --wheelhouse

# The container-cluster test: builds the images, runs jobs for every app through them.
test-containers: images
	CSML_USE_BUILT_IMAGES=1 $(PYTEST) -q tests/e2e/containers/test_container_cluster.py

# Throughput through containers vs the same processes run natively.
bench-containers: images
	$(PYTHON) bench/containers.py --no-build
