# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing (idempotent and fast when present).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# PyTorch first, pinned exactly: these machines ship the CPU wheel of 2.13.0 locally;
# any other spec would download several GB of CUDA packages.
TORCH := torch==2.13.0

.PHONY: demo test test-slow bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kdlab demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/losses.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
