# Set-up and the two README commands. The venv pins torch to the local CPU build (2.13.0):
# letting pip choose a newer torch would pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
PROMPT ?= a red circle on a blue background

.PHONY: install demo test test-slow test-gpu gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,test,bench]"
	touch $@

# The main job on the CPU default: the built-in demo model (trained on shapes; train/demo-checkpoint)
# writes out.png. Its first run exports it into ~/.cache/diffusion-engine (or $DIFFUSION_ENGINE_CACHE).
demo: install
	@echo 'engine-run --prompt "$(PROMPT)"'
	@$(BIN)/engine-run --prompt "$(PROMPT)"

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

# On an NVIDIA GPU machine: TensorRT + onnxruntime-gpu, engines for the tiny and an SD1.5-architecture
# checkpoint, the GPU suite and engine-bench; one JSON report in $(OUT)/gpu-check.json.
# onnxruntime and onnxruntime-gpu install the same module: swap one for the other.
gpu-check: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,test,trt,bench]"
	$(BIN)/python -m pip uninstall --quiet --yes onnxruntime
	$(BIN)/python -m pip install --quiet -c constraints.txt onnxruntime-gpu
	$(BIN)/python -m diffusion_engine.benchmarks.gpu_check --work $(OUT)/gpu-check --report $(OUT)/gpu-check.json

clean:
	rm -rf $(OUT) .pytest_cache
