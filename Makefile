# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-heavy bench venv clean

venv: $(STAMP)

# torch first (a local CPU wheel here), so that resolving the project never pulls a CUDA build.
$(STAMP): pyproject.toml configs/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -c configs/constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/subsume demo --workdir demo-work

# make test stays under 15 minutes on 2 cores; the multi-minute cluster rehearsals (multi-node, k8s overlays,
# bitwise resume, concurrent extraction, cached-equals-online training, the learning and ingest benchmarks' quick
# presets, downstream through the CLI) run in make test-heavy. .ci/run runs both; both print the slowest tests.
test: $(STAMP)
	$(PY) -m pytest -q -m "not heavy" --durations=25

test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy --durations=25

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf demo-work .pytest_cache
