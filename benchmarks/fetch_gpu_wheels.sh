#!/usr/bin/env bash
# Fetch the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no `datasets` and no
# network: datasets and the pure-python packages it needs that such a machine lacks (dill,
# multiprocess), plus xxhash and fsspec in case it lacks those too. Run it where PyPI is
# reachable, in the repository root; it writes .whl/ (ignored by git: carry it to the GPU
# machine). Versions match this project's development venv; the target is CPython 3.12 on
# x86-64 Linux (override with PYVER=3.11 etc.).
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
ls -la .whl
