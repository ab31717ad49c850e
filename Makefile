# Convenience targets; each is one script, so CI and people run the same thing.
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
PYTEST ?= $(if $(wildcard .venv/bin/pytest),.venv/bin/pytest,pytest)

.PHONY: images wheelhouse test-containers bench-containers

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
