# The two commands of the README. Both create or update .venv at the repo root and install
# what they need: the CPU build of torch 2.13.0 first when no torch is present (so pip never
# resolves a bare `torch` to a multi-GB CUDA wheel), then the project and its tools.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[triton,test]"
	touch $@

demo: venv
	$(BIN)/python examples/demo_llama.py

# Triton kernels run on CPU tensors under the interpreter when there is no GPU.
test: venv
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -p no:cacheprovider tests

bench: venv
	$(BIN)/python benchmarks/passes.py
	$(BIN)/python benchmarks/attention_cpu.py
	$(BIN)/python benchmarks/runtime_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info dump
