# forge — developer entry points. `make demo` sets everything up and builds the demo recipe;
# `make test` runs the test suite (it sets up the environment first when needed).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.forge-installed
DEMO   ?= recipes/smollm2-135m-demo.yaml
# pytest workers: one per core, at most 4 (each e2e build holds a model and a buildah store)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

TOOLS  := buildah mmdebstrap skopeo umoci docker-registry chromium
.PHONY: setup setup-tools demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $@

setup: $(STAMP) setup-tools

# Daemonless image tooling from Debian (package step). Installed only when missing; needs root or sudo.
setup-tools:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (Debian packages)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(TOOLS) >/dev/null; \
	fi

demo: setup
	$(BIN)/forge build $(DEMO)

test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=40

bench: setup
	$(BIN)/python bench/noop_rebuild.py
	$(BIN)/python bench/scan_policy.py
	$(BIN)/python bench/quantize.py

clean:
	rm -rf $(VENV) build *.egg-info
