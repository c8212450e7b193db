# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The demo: FeDeRA, minilm-l6 on rotten-tomatoes, 10 clients, Dirichlet non-IID (see README).
DEMO_CLIENTS ?= 10
DEMO_CONFIG ?= dirichlet-alpha=1.0 num-server-rounds=8 learning-rate=0.002

.PHONY: install fetch demo deploy test lint format bench compare clean docker-check arm64-check

install: $(BIN)/.installed

# torch==2.13.0 first: it takes the local CPU wheel, any other spec pulls GBs of CUDA wheels.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

fetch: install
	$(BIN)/federa fetch

demo: fetch
	$(BIN)/federa simulate --num-clients $(DEMO_CLIENTS) --run-config "$(DEMO_CONFIG)"

# The same job on a real SuperLink + SuperNodes on this machine (TLS, node auth); see README.
NODES ?= 3
deploy: fetch
	$(BIN)/federa deploy local --nodes $(NODES) --tls --run-config "num-server-rounds=3"

# Two workers: a Ray simulation leaves the second core idle ~40% of the time (start-up, waits).
# tests/conftest.py splits the cores between them (torch threads, Ray actors per simulation) and
# hands out the long files first. loadfile: a file's tests stay on one worker (the smoke grid's
# two tests share one run).
# --durations: the 20 slowest tests, for keeping the suite under its time budget.
TEST_WORKERS ?= 2
test: fetch
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=20

# Real runs that need root, several GB and minutes; not part of `make test` (README: Docker, Edge).
# docker-check: the image built and compose.yaml's TLS federation run on a Docker engine.
docker-check: fetch
	$(BIN)/python deploy/docker_check.py --preflight
	$(BIN)/python -m pytest -p no:xdist -m docker tests/test_docker_engine.py -s -v

# arm64-check: an emulated arm64 SuperNode trains FeDeRA next to an x86 one (TLS, node auth).
arm64-check: fetch
	$(BIN)/python deploy/arm64_check.py --preflight
	$(BIN)/python -m pytest -p no:xdist -m arm64 tests/test_arm64.py -s -v

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: fetch
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_svd.py
	$(BIN)/python benchmarks/bench_deploy.py

# The comparison harness: `make compare GRID=quick` (a preset or a TOML file); see README.
GRID ?= smoke
compare: fetch
	$(BIN)/federa compare $(GRID)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
