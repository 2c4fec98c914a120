# Set-up and the two README commands. The venv pins torch to the local CPU build (2.13.0):
# letting pip choose a newer torch would pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
PROMPT ?= a red circle on a blue background

# Wheels the GPU layer's API is checked against on any machine (tests/test_gpu_api.py), downloaded into
# $(API_WHEELS), not installed: the TensorRT 11 and 10 bindings (their compiled module is read as bytes, as
# x86-64 code: their libnvinfer is not on PyPI) and the CUDA 12 bindings (imported in a subprocess; the venv
# has CUDA 13's, the test extra). A failed download is a warning, and those tests skip saying which wheel.
API_WHEELS := $(VENV)/api-wheels
TRT_API_WHEELS := tensorrt-cu12-bindings==11.4.0.106 tensorrt-cu12-bindings==10.16.1.11
CUDA_API_WHEELS := cuda-bindings==12.9.10

# tritonserver for tests/test_triton.py: the binary, python backend and stubs in the nvidia-pytriton wheel (CPU-capable).
# Installed without dependencies: pytriton's own Python side (which pins numpy < 2) is never imported.
PYTRITON := nvidia-pytriton==0.7.0

.PHONY: install demo test test-slow test-gpu gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,test,bench,serve,triton]"
	$(BIN)/python -m pip install --quiet --no-deps $(PYTRITON) \
		|| echo "warning: $(PYTRITON) could not be installed: tests/test_triton.py skips its tritonserver test"
	for w in $(TRT_API_WHEELS); do $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
		--platform manylinux_2_28_x86_64 --python-version 3.11 -d $(API_WHEELS) $$w \
		|| echo "warning: $$w could not be downloaded: tests/test_gpu_api.py skips its checks"; done
	for w in $(CUDA_API_WHEELS); do $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d $(API_WHEELS) $$w \
		|| echo "warning: $$w could not be downloaded: tests/test_gpu_api.py skips its checks"; done
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
