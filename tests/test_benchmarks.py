"""The benchmarks measure what they say: the same environment for both tools, like-for-like
baselines, ratios of like units. Each check runs its snippet in a child process, because a
benchmark module must be imported before `datasets` (benchmarks/_common.py), which this test
session has already imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"


def run_in_benchmarks(code: str) -> dict:
    """Run `code` with the benchmarks importable; return the JSON object of its last line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(ROOT)]))
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- nemo_speed.py ---------------------------------------------------------------------------

NEMO_SPEED_CHILD = """
import json, sys, types
import nemo_speed

seen = {}

def record(argv):
    seen["path"] = list(sys.path)
    return 0

import builder.cli
builder.cli.main = record
# NeMo's entry point, stood in for: only the path it runs under matters here
speculative = types.ModuleType("nemo_automodel.components.speculative")
speculative.precompute_eagle3 = types.SimpleNamespace(main=record)
for name in ("nemo_automodel", "nemo_automodel.components"):
    sys.modules[name] = types.ModuleType(name)
sys.modules["nemo_automodel.components.speculative"] = speculative
nemo_speed.run_tool(TOOL, [])
print(json.dumps(seen))
"""


def test_nemo_speed_runs_both_tools_on_the_same_path():
    """transformers imports torchao from NeMo's site folder on each model load: a folder on one
    tool's path only would charge that import to that tool alone."""
    paths = {tool: run_in_benchmarks(NEMO_SPEED_CHILD.replace("TOOL", repr(tool)))["path"] for tool in ("ours", "nemo")}
    assert paths["ours"] == paths["nemo"]
