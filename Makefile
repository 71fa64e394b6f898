# qemu-mktme: `make demo` runs the main job, `make test` the tests. Each sets up what it needs:
# Debian packages (scripts/setup-host.sh), a virtualenv in .venv, guest images in the cache
# ($QEMU_MKTME_CACHE, default ~/.cache/qemu-mktme). All steps are skipped when already done.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: all setup host venv images demo test bench clean

all: test

setup: host venv images

host:
	@./scripts/setup-host.sh

$(BIN)/.installed: pyproject.toml | host
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

images: venv
	@$(BIN)/qemu-mktme images build

demo: setup
	$(BIN)/qemu-mktme demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python scripts/bench_boot.py
	$(BIN)/python scripts/bench_engine.py
	$(BIN)/python scripts/bench_shim.py
	$(BIN)/python scripts/bench_snapshot.py
	$(BIN)/python scripts/bench_inspect.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
