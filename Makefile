# Set-up and the two README commands. The venv pins torch to the local CPU build (2.13.0):
# letting pip choose a newer torch would pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out
PROMPT ?= a red circle on a blue background

.PHONY: install demo test test-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[export,test]"
	touch $@

# The main job on the CPU default: build a tiny checkpoint, export it, generate an image.
demo: install
	$(BIN)/engine-tiny $(OUT)/tiny-sd1
	$(BIN)/engine-export $(OUT)/tiny-sd1 --out $(OUT)/tiny-engine --max-size 512 --max-batch 2 --overwrite
	$(BIN)/engine-info $(OUT)/tiny-engine
	$(BIN)/engine-run --engine $(OUT)/tiny-engine --prompt "$(PROMPT)" --steps 20 --seed 0 --height 256 --width 256 --out $(OUT)/demo.png

test: install
	$(BIN)/python -m pytest -q

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(OUT) .pytest_cache
