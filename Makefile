# Two commands matter: `make demo` (build a cache from the embedded default) and
# `make test`. Both create .venv on first use and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-cache
# The CPU build of torch on machines without an NVIDIA GPU (it lies in /opt/wheels on
# our dev/CI machines); the default (CUDA) build where nvidia-smi finds a GPU.
TORCH_SPEC := $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
FIND_LINKS := $(shell [ -d /opt/wheels ] && echo --find-links /opt/wheels)

.PHONY: demo test bench clean

# NeMo Automodel 0.7.0 is installed for the tests and the benchmark that run its own EAGLE-3
# code next to ours. Without its dependencies: it pins transformers and CUDA-only packages that
# the modules used here do not need; the `nemo` extra holds the few they import (torchao, Pillow).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[test,nemo]"
	$(PY) -m pip install -q $(FIND_LINKS) --no-deps nemo-automodel==0.7.0
	touch $(STAMP)

# The embedded tiny target over the 300 sample chats: 3 shards, a 256-token draft vocabulary.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/eagle3-cache build --output-dir $(DEMO_DIR) --draft-vocab-size 256 --shard-size 100

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
