# Set-up and checks that bootstrap their own virtual environment, so a fresh machine
# with only Python 3.11 and make can run them.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
DEMO_RUN ?= sample_runs/clipping-every-step

.PHONY: demo test samples benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The analyzer alone: no torch, as a CI gate installs it.
$(VENV)/.analyzer: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.analyzer

# Analyze a sample run. Exit code 1 means findings were reported, which is the point.
demo: $(VENV)/.analyzer
	$(BIN)/runlens analyze $(DEMO_RUN) --fail-on never

test: $(VENV)/.dev
	$(BIN)/python -m pytest

# Record the sample runs again from real training.
samples: $(VENV)/.dev
	$(BIN)/python sample_runs/generate.py

benchmark: $(VENV)/.dev
	$(BIN)/python benchmarks/analyzer_speed.py
	$(BIN)/python benchmarks/recorder_overhead.py
	$(BIN)/python benchmarks/many_runs.py

clean:
	rm -rf $(VENV) .pytest_cache
