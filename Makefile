# Everything runs from a local virtual environment that these targets create on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup smoke test bench clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The main job: the CPU smoke comparison of all four optimizers on offline data (about two minutes).
smoke: setup
	$(BIN)/optbench compare --preset smoke

test: setup
	$(BIN)/python -m pytest

# Speed benchmarks against torchvision's DataLoader, a bare PyTorch loop and PyTorch Lightning (~10 min on
# 2 cores). Lightning is a benchmark-only dependency: the bench extra, installed on first use.
bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/run.py

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	touch $@

clean-results:
	rm -rf results/*/ results/*.json
