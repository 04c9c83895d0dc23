"""The benchmarks measure what they say: the same environment for both tools, like-for-like
baselines, ratios of like units. Each check runs its snippet in a child process, because a
benchmark module must be imported before `datasets` (benchmarks/_common.py), which this test
session has already imported."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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


# ---- io_throughput.py ------------------------------------------------------------------------

PLAIN_WRITES = """
import json, sys
import io_throughput
from builder import shards

calls = []
real = shards._start_writeback
def start_writeback(fd, offset, length):
    calls.append([offset, length])
    real(fd, offset, length)

shards._start_writeback, shards.FLUSH_BYTES, io_throughput.CHUNK = start_writeback, 4096, 1024
data = bytes(range(256)) * 70  # 17,920 bytes: four flushes, then a 1,536-byte tail for the fsync
written = {}
for overlapped in (True, False):
    path = io_throughput.Path(sys.argv[1]) / f"plain-{overlapped}"
    io_throughput.plain_write(path, data, overlapped)
    written[str(overlapped)] = {"flushes": calls[:], "same_bytes": path.read_bytes() == data}
    calls.clear()
print(json.dumps(written))
"""


def test_plain_write_baseline_flushes_as_the_writer_does(tmp_path):
    """The writer starts the disk writes of every FLUSH_BYTES as it goes; a baseline flushed by one
    fsync at the end starts the disk late, and a writer could then beat "the disk's speed"."""
    written = run_in_benchmarks(PLAIN_WRITES.replace("sys.argv[1]", repr(str(tmp_path))))
    assert written["True"] == {"flushes": [[0, 4096], [4096, 4096], [8192, 4096], [12288, 4096]], "same_bytes": True}
    assert written["False"] == {"flushes": [], "same_bytes": True}  # the earlier baseline, kept as a diagnostic


WRITE_RATIOS = """
import json
import io_throughput

best = {"plain_write_overlapped_none": 2.0, "plain_write_none": 1.0, "plain_write_overlapped_zstd": 0.5, "plain_write_zstd": 0.8}
best |= {"writer_none_1": 1.25, "writer_zstd_1": 4.0}
print(json.dumps(io_throughput.write_ratios(best, [1])))
"""


def test_the_writer_is_set_against_the_faster_plain_write():
    """Which plain write is faster depends on the disk: the baseline is the faster one, so a way of
    flushing that is slow on this disk does not flatter the writer."""
    ratios = run_in_benchmarks(WRITE_RATIOS)
    assert ratios["writer_none_1_over_fastest_plain_write_of_the_tensor_bytes"] == pytest.approx(1.0 / 1.25)
    assert ratios["writer_zstd_1_over_fastest_plain_write_of_the_tensor_bytes"] == pytest.approx(1.0 / 4.0)
    assert ratios["writer_zstd_1_over_fastest_plain_write_of_its_own_file"] == pytest.approx(0.5 / 4.0)
    assert ratios["writer_none_1_over_overlapped_plain_write_of_the_tensor_bytes"] == pytest.approx(2.0 / 1.25)


READ_RATIOS = """
import importlib.util
import json
import io_throughput

best = {}
for w, scale in (("cold", 1.0), ("warm", 0.5)):
    best |= {f"plain_read_{w}_none": 1.0 * scale, f"plain_read_{w}_zstd": 0.7 * scale}  # the zstd file is smaller
    for c, seconds in (("none", 2.0), ("zstd", 3.5)):
        best |= {f"reader_{w}_{c}": seconds * scale, f"reader_with_open_{w}_{c}": (seconds + 0.5) * scale}
        best |= {f"reader_untouched_{w}_{c}": seconds * scale / 2, f"pyarrow_read_{w}_{c}": scale}
print(json.dumps(io_throughput.read_ratios(best)))
"""


def test_reader_ratios_are_ratios_of_times():
    """A zstd read set against a plain read of its own file, in time: the decoded tensor bytes'
    MB/s over the smaller file's MB/s would count the compression as the reader's speed."""
    ratios = run_in_benchmarks(READ_RATIOS)
    for w in ("cold", "warm"):
        assert ratios[f"reader_{w}_zstd_over_plain_read_of_its_files"] == pytest.approx(0.7 / 3.5)
        assert ratios[f"reader_{w}_zstd_over_plain_read_of_the_tensor_bytes"] == pytest.approx(1.0 / 3.5)
        assert ratios[f"reader_with_open_{w}_zstd_over_plain_read_of_its_files"] == pytest.approx(0.7 / 4.0)
        assert ratios[f"reader_with_open_{w}_none_over_plain_read_of_the_tensor_bytes"] == pytest.approx(1.0 / 2.5)
        assert ratios[f"pyarrow_read_{w}_zstd_over_plain_read_of_its_files"] == pytest.approx(0.7)
    assert not [key for key in ratios if key.endswith("_over_plain_read")]  # no ratio of unlike MB/s left


# ---- _nemo_layout.py: NeMo's cache bytes, against the cache NeMo's own code writes ---------------


def load_benchmark_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NEMO_CHATS = {"sample-sharegpt": ("sg-000", "sg-001", "sg-002"), "sample-openai": ("oa-003",)}


@pytest.mark.parametrize("topk", [0, 64], ids=["lossless", "topk-64"])
def test_nemo_bytes_per_position_match_the_cache_nemo_writes(tmp_path, topk):
    """The size comparisons set our caches against NeMo's lossless cache and against its own top-k
    cache of the same samples: both sizes are NeMo's shards' tensor bytes, padding included."""
    precompute_eagle3 = pytest.importorskip("nemo_automodel.components.speculative.precompute_eagle3")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from builder.embedded import EMBEDDED_INPUTS, resolve_target

    chats = tmp_path / "chats.jsonl"
    rows = [json.loads(line) for name in NEMO_CHATS for line in EMBEDDED_INPUTS[name].read_text().splitlines() if line.strip()]
    chats.write_text(
        "".join(json.dumps(row) + "\n" for row in rows if row["id"] in NEMO_CHATS["sample-sharegpt"] + NEMO_CHATS["sample-openai"])
    )
    out, seq_length = tmp_path / "nemo", 96  # some chats longer (truncated), some shorter (padded)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precompute_eagle3, "NeMoAutoModelForCausalLM", AutoModelForCausalLM)  # its loader is CUDA-only
        flags = ["--seq-length", str(seq_length), "--draft-vocab-size", "300", "--target-probs-topk", str(topk), "--dtype", "bf16"]
        io = ["--target-model", str(resolve_target("tiny-llama")), "--input-data", str(chats), "--output-dir", str(out)]
        assert precompute_eagle3.main([*io, *flags, "--device", "cpu", "--log-level", "WARNING"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    stored = 0
    for shard in out.glob("shard-*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            stored += sum(f.get_tensor(key).nbytes for key in f.keys())
    per_position = load_benchmark_module("_nemo_layout").nemo_bytes_per_position(
        manifest["aux_hidden_dim"], manifest["draft_vocab_size"], "bf16", topk
    )
    assert manifest["num_samples"] == 4
    assert stored == manifest["num_samples"] * seq_length * per_position


# ---- run_all.py --------------------------------------------------------------------------------


def test_run_all_summary_shows_the_paired_median_beside_fastest_over_fastest(tmp_path, monkeypatch):
    """The README cites both figures of the tiny target's build ÷ bare; the summary shows both."""
    stored = json.loads((BENCH_DIR / "results" / "build_overhead_tiny_latest.json").read_text())["runs"][0]
    (tmp_path / "build_overhead.json").write_text(json.dumps(stored))
    run_all = load_benchmark_module("run_all")
    monkeypatch.setattr(run_all, "RESULTS_DIR", tmp_path)
    summary = run_all.summary(["build_overhead"], {})
    assert "tiny 0.4M params: paired median 0.873 (0.828-0.916, 4 builds), fastest over fastest 0.782" in summary
