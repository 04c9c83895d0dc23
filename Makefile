# Two commands matter: `make demo` (build a cache from the embedded default) and
# `make test`. Both create .venv on first use and install the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-cache
# pytest workers (pytest-xdist), each with one torch thread (tests/conftest.py): the tests spend much of
# their time in processes they start and in file I/O, so two workers on two cores take half the time of one.
TEST_WORKERS ?= 2
# The default (CUDA) build of torch where nvidia-smi finds a GPU. Elsewhere the CPU build: on
# x86-64 Linux PyPI's torch wheel is the CUDA one (with GBs of nvidia-* packages), so the pin names
# the +cpu build of PyTorch's CPU index; on macOS PyPI's wheel is the CPU build, and other machines
# (Linux on ARM) take PyPI's wheel of that version. A folder of local wheels can be given with
# FIND_LINKS=--find-links DIR (pip also reads PIP_FIND_LINKS); pip takes a +cpu wheel found there
# too, and only warns where the CPU index cannot be reached (two retries, not five: pip asks that
# index for each of torch's dependencies as well).
TORCH_SPEC := $(shell if nvidia-smi -L >/dev/null 2>&1; then echo torch; \
	elif [ "$$(uname -s)-$$(uname -m)" = Linux-x86_64 ]; then echo torch==2.13.0+cpu; else echo torch==2.13.0; fi)
TORCH_INDEX := $(if $(findstring +cpu,$(TORCH_SPEC)),--retries 2 --extra-index-url https://download.pytorch.org/whl/cpu)
FIND_LINKS ?=

.PHONY: demo test bench clean

# NeMo Automodel 0.7.0, which tests and a benchmark run next to ours (its loss masks, its own
# precompute, reader and recipe checks), goes into a site folder of its own, without its
# dependencies (it pins transformers and CUDA-only packages its EAGLE-3 modules do not need) but
# with the one they import beyond ours (torchao). Kept off the project's path, so builds never
# load torchao; tests/conftest.py and the benchmark add it. SpecForge 0.2.0, whose own offline
# reader, vocab-mapping loader and target path tests run over `export --to specforge`, goes into
# another, also without its dependencies (the modules those tests use need none beyond ours and
# triton, which the CUDA build of torch brings) and also off the project's path: tests/conftest.py
# adds it for those tests. The stamp depends on this file too, so an existing venv picks up an
# install step added here.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(FIND_LINKS) $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q $(FIND_LINKS) -e ".[test]"
	$(PY) -m pip install -q $(FIND_LINKS) --no-deps --upgrade --target $(VENV)/nemo-site nemo-automodel==0.7.0 torchao==0.18.0
	$(PY) -m pip install -q $(FIND_LINKS) --no-deps --upgrade --target $(VENV)/specforge-site specforge==0.2.0
	touch $(STAMP)

# The embedded tiny target over the 300 sample chats: 3 shards, a 256-token draft vocabulary.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/eagle3-cache build --output-dir $(DEMO_DIR) --draft-vocab-size 256 --shard-size 100

# Lint and formatting first (configured in pyproject.toml), so CI enforces them.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
