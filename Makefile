# Two entry points (see README): `make demo` and `make test`. Both go through `make install`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel this kind of machine carries; plain `torch` pulls a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/actex: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/actex

install: $(BIN)/actex

demo: install
	$(BIN)/actex demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/forward.py
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/reader.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
