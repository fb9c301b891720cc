# Two commands for a new user: `make demo` (set up, run the quickstart) and `make test` (set up, run the tests).
# Each creates .venv itself. TORCH picks the torch build: the default is the CPU wheel this
# project is tested with; on a GPU machine use e.g.  make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= workload,cloud,dev,bench,tracking,eval

.PHONY: demo test lint bench bench-quick clean emulators

# The node lock (providers/data/node-lock.txt: what every cloud node installs, == pins) constrains this
# environment too, so the tests pass with exactly the versions the nodes get.
LOCK := providers/data/node-lock.txt

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/optjob apply examples/quickstart.yaml --local --yes

# Azurite (Azure Blob emulator, npm) for the storage tests: pinned by tests/emulators/package-lock.json,
# about 120 MB and 20 s. Without npm the Azure tests skip (outside CI) and say so.
EMULATORS := tests/emulators/node_modules/.bin/azurite-blob
$(EMULATORS): tests/emulators/package.json tests/emulators/package-lock.json
	cd tests/emulators && npm ci --no-audit --no-fund --omit=dev --loglevel=error
	touch $@

emulators:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(EMULATORS); \
	else echo "npm not found: the Azure storage tests will be skipped"; fi

test: $(VENV)/.installed emulators
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy specs manager providers steps benchmarks

bench: $(VENV)/.installed
	$(PY) -m benchmarks

bench-quick: $(VENV)/.installed
	$(PY) -m benchmarks --quick

clean:
	rm -rf $(VENV) build *.egg-info tests/emulators/node_modules
