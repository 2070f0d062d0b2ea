# The two commands of the README: `make run` (main job) and `make test`. Each builds the
# virtual environment it needs from pyproject.toml first.
PYTHON ?= python3.11
VENV   ?= .venv
OUT    ?= runs/default
BIN    := $(VENV)/bin

.PHONY: run test test-gpu clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/nfp pipeline --out $(OUT)

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# On a machine with an NVIDIA GPU: the GPU extras (CuPy, onnxruntime-gpu), then the tests marked gpu
# (the CUDA kernels against the NumPy reference, DLPack hand-over, devices and streams; the gpu-profile
# serving smoke test where NFP_TRITONSERVER / NFP_TRITON_BACKENDS name a Triton with onnxruntime).
$(BIN)/.installed-gpu: pyproject.toml $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,gpu]"
	touch $@

test-gpu: $(BIN)/.installed-gpu
	$(BIN)/python -m pytest -m gpu -rs

clean:
	rm -rf $(VENV) runs .pytest_cache
