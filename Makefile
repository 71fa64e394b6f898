# qemu-mktme: `make demo` runs the main job, `make test` the tests. Each sets up what it needs:
# Debian packages (scripts/setup-host.sh), a virtualenv in .venv, guest images in the cache
# ($QEMU_MKTME_CACHE, default ~/.cache/qemu-mktme). All steps are skipped when already done.
#
#   make test        make lint, then the whole suite (QEMU, guests, a fresh-virtualenv install)
#   make lint        ruff and mypy (configured in pyproject.toml): no finding allowed
#   make test-pure   the tests that need no QEMU, no images and no network: seconds, anywhere
#   make test-busy   the whole suite with a CPU hog pinned beside it (must pass on 2 cores)
#   make verify      every verifier workload, plain vs emulated (qemu-mktme compare), then the
#                    attack matrix on Linux guests (build/attack-matrix.{json,png}, --check), then
#                    the long trials whose bounded forms make test runs (pytest -m verify)
#   make test-qemu10 the shim and snapshot suites on QEMU 10 (bookworm-backports, unpacked in the cache)
#   make bench       every benchmark and one table of their figures, then make verify
#                    (BENCH_ARGS=--quick: a smoke run)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Two workers, each module on one of them (its module fixtures run once): on 2 cores the suite
# takes about 5 min instead of 11 serially (QEMU under TCG and the Python driving it overlap across workers).
XDIST := -n 2 --dist loadscope
# The suite starts Python hundreds of times (each worker's collection, the command line as a user
# runs it, the probes' hosts): compiled from source each time where PYTHONDONTWRITEBYTECODE is set,
# that is ~0.25 s of CPU per start. Its bytecode goes to build/pycache (make clean), never beside
# the sources.
PYCACHE := PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(CURDIR)/build/pycache

.PHONY: all setup host venv images demo lint test test-pure test-busy test-qemu10 verify bench clean

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

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: setup lint
	$(PYCACHE) $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-pure: venv
	$(PYCACHE) $(BIN)/python -m pytest -m "not qemu and not install" $(PYTEST_ARGS)

test-busy: setup
	$(PYCACHE) ./scripts/test-busy.sh $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-qemu10: setup
	QEMU_MKTME_QEMU=$$($(BIN)/qemu-mktme images build qemu10 | sed 's/^qemu10: //') \
	    $(BIN)/python -m pytest tests/trace tests/live/test_snapshot.py tests/qemu10 $(PYTEST_ARGS)

verify: setup
	$(BIN)/qemu-mktme compare
	mkdir -p build && $(BIN)/qemu-mktme attack matrix --guest linux --check \
	    --json build/attack-matrix.json --png build/attack-matrix.png
	$(PYCACHE) $(BIN)/python -m pytest -m verify $(PYTEST_ARGS)

bench: setup
	$(BIN)/python scripts/bench_all.py $(BENCH_ARGS)
	$(BIN)/qemu-mktme compare

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
