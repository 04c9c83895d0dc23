"""Data-parallel builds under `accelerate launch`: two CPU processes (gloo) write the same
cache as one, and a build started on two processes resumes on one. Reading on two processes
(`torchrun`): every usual loop sees every sample exactly once per epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_content, decoded_rows

from builder.build_state import BUILD_STATE_DIR
from builder.forward import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build_cache.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
TORCHRUN = Path(sys.executable).with_name("torchrun")
FLAGS = ["--seq-length", "128", "--draft-vocab-size", "200", "--dtype", "fp32", "--quiet", "--batch-size", "4"]


def env() -> dict:
    # One thread per process: both runs then use identical kernels, so results are bit-equal.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def two_process_command(out: Path, *flags: str) -> list[str]:
    return [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "--output-dir",
        str(out),
        *FLAGS,
        *flags,
    ]


def one_process_command(out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--output-dir", str(out), *FLAGS, *flags]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command: list[str]) -> str:
    proc = subprocess.run(command, env=env(), capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "cache"
    stdout = run(one_process_command(out, "--max-samples", "30", "--shard-size", "4"))
    assert "[rank 0/1] wrote 8 shards" in stdout
    return out


def test_two_processes_write_the_same_cache_as_one(tmp_path, reference):
    out = tmp_path / "two"
    stdout = run(two_process_command(out, "--max-samples", "30", "--shard-size", "4"))
    assert "[rank 0/2] wrote 4 shards" in stdout and "[rank 1/2] wrote 4 shards" in stdout
    ranks = sorted((out / BUILD_STATE_DIR / "ranks").glob("rank-*.json"))
    assert [p.name for p in ranks] == ["rank-00000.json", "rank-00001.json"]
    # each rank wrote exactly the shards k with k % 2 == rank
    import json

    for rank, path in enumerate(ranks):
        stats = json.loads(path.read_text())
        assert stats["world_size"] == 2
        assert stats["shards_written"] == [f"train-{k:05d}-of-00008.parquet" for k in range(rank, 8, 2)]
    assert_same_content(decoded_rows(reference), decoded_rows(out))
    assert_same_content(decoded_rows(reference, "nemo"), decoded_rows(out, "nemo"))


def test_two_process_build_killed_midway_resumes_on_one(tmp_path):
    flags = ["--max-samples", "48", "--shard-size", "4"]  # 12 shards, 6 per rank
    reference = tmp_path / "reference"
    run(one_process_command(reference, *flags))
    out = tmp_path / "cache"
    # Each rank SIGKILLs itself right after publishing its 3rd shard; the launcher then stops the other.
    killed = subprocess.run(
        two_process_command(out, *flags), env=env() | {FAULT_ENV: "after_shard:3"}, capture_output=True, text=True, check=False
    )
    assert killed.returncode != 0, killed.stdout[-2000:]
    assert 3 <= len(list((out / "data").glob("train-*.parquet"))) <= 6, "the build was not stopped midway"
    assert not (out / "README.md").exists()

    stdout = run(one_process_command(out, *flags, "--resume"))
    assert "[rank 0/1]" in stdout
    assert_same_content(decoded_rows(reference), decoded_rows(out))


def test_two_processes_read_every_sample_once_in_every_usual_loop(tmp_path, reference):
    """One `torchrun` launch runs each loop of tests/distributed_reading.py; a loop that split twice
    (or not at all) shows up as a rank missing samples (or both ranks holding the same)."""
    out = tmp_path / "seen.json"
    command = [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).with_name("distributed_reading.py")),
        str(reference),
        str(out),
    ]
    proc = subprocess.run(
        command,
        env={**env(), "ACCELERATE_USE_CPU": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = json.loads(out.read_text())
    assert seen["num_processes"] == 2 and seen["world_size"] == 2  # accelerate's MULTI_CPU, two ranks
    everything = [row["sample_id"] for row in decoded_rows(reference)]
    assert seen["every"] == [everything, everything] and len(set(everything)) == 30
    for loop in (
        "accelerate_streaming",
        "accelerate_streaming_not_dispatched",
        "accelerate_map",
        "distributed_sampler",
        "split_by_rank",
        "split_by_rank_workers",
    ):
        rank0, rank1 = seen[loop]
        assert rank0 and rank1 and not set(rank0) & set(rank1), loop
        assert sorted(rank0 + rank1) == sorted(everything), loop
    assert seen["accelerate_nemo_rows"] == [15, 15]
    for rank, runs in enumerate(seen["resume"]):  # per rank: k samples + the resumed rest == the uninterrupted part
        assert len(runs) == 8
        for key, run in runs.items():
            assert run["whole"] and run["head"] + run["tail"] == run["whole"], (rank, key)
    assert sorted(seen["resume"][0]["None/1"]["whole"] + seen["resume"][1]["None/1"]["whole"]) == sorted(everything)
