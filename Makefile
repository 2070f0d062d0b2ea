# The two commands of the README: `make run` (main job) and `make test`. Each builds the
# virtual environment it needs from pyproject.toml first.
PYTHON ?= python3.11
VENV   ?= .venv
OUT    ?= runs/default
BIN    := $(VENV)/bin

.PHONY: run test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/nfp pipeline --out $(OUT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
