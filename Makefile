# `make demo`: set up .venv and run the STG demo on the embedded tiny model.
# `make test`: set up .venv and run the whole test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned: on a CPU machine 2.13.0 resolves to the local CPU wheel, so
# pip never pulls the multi-GB CUDA build. A GPU machine can install its own torch first.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cattune demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/mask_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
