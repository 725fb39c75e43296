# Two commands: `make run` (install + main job on the embedded dataset) and `make test`.
# Uses the active virtualenv/conda env when there is one, otherwise creates/reuses .venv.
SHELL := /bin/bash
CONFIG ?= configs/demo-rq.yaml
RUN_DIR ?= runs/demo-rq

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else ifdef CONDA_PREFIX
PY := $(CONDA_PREFIX)/bin/python
else
PY := .venv/bin/python
endif

# The stamp is newer than the packaging files once the editable install succeeded: a second call
# installs nothing, and a change to the dependencies or the pins installs again.
STAMP := $(dir $(PY)).tessera-installed

.PHONY: install run test lint clean
install: $(STAMP)

# Dependency ranges live in pyproject.toml; constraints.txt pins them to the versions CI tests.
$(STAMP): pyproject.toml constraints.txt setup.py
	@if [ ! -x "$(PY)" ]; then python3 -m venv .venv; fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

run: install
	$(dir $(PY))tessera run $(CONFIG) --run-dir $(RUN_DIR)

lint: install
	$(PY) -m ruff check .

# Lint first (seconds), then the tests. pytest exits 5 when it collects nothing: that must fail, not pass.
test: lint
	@$(PY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf runs .pytest_cache
