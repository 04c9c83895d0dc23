"""Data-parallel builds under `accelerate launch`: two CPU processes (gloo) write the same
cache as one, and a build started on two processes resumes on one; rank 0's start-up error
reaches every rank as itself, and ranks that do not see one output directory all refuse at
start-up. Reading on two processes (`torchrun`): every usual loop sees
every sample exactly once per epoch."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import assert_same_content, decoded_rows

import builder
from builder.build_state import BUILD_STATE_DIR, holds_cache
from builder.errors import Eagle3CacheError, ShardRecordsMissing
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
    (or not at all) shows up as a rank missing samples (or both ranks holding the same). The same
    launch resumes through accelerate as the README says, mid-epoch in a later epoch and after an
    epoch's last step."""
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
    # README recipe 1 (2 workers, batches of 3): every sample; a worker's stream ends on a short batch, which
    # accelerate completes with that worker's first samples, so under one batch per worker and rank repeats.
    rank0, rank1 = seen["accelerate_streaming_workers"]
    assert set(rank0 + rank1) == set(everything) and len(rank0) == len(rank1)
    assert len(rank0 + rank1) - len(everything) < 2 * 2 * 3
    assert seen["accelerate_nemo_rows"] == [15, 15]
    for rank, runs in enumerate(seen["resume"]):  # per rank: k samples + the resumed rest == the uninterrupted part
        assert len(runs) == 8
        for key, run in runs.items():
            assert run["whole"] and run["head"] + run["tail"] == run["whole"], (rank, key)
    assert sorted(seen["resume"][0]["None/1"]["whole"] + seen["resume"][1]["None/1"]["whole"]) == sorted(everything)
    check_accelerate_resume(seen["accelerate_resume"], everything)


def check_accelerate_resume(ranks: list[dict], everything: list[str]) -> None:
    """README's resume through accelerate (shuffle_buffer, see distributed_reading.accelerate_resume)."""
    for rank, run in enumerate(ranks):
        whole = run["whole"]
        assert len({tuple(epoch) for epoch in whole}) == 3, rank  # each epoch in its own order
        # Mid-epoch 1 with the prepared loader's set_epoch: the rest of the epoch, then the next epoch, as uninterrupted.
        assert run["head"] + run["tail"] == whole[1] and run["next_epoch"] == whole[2], rank
        # A checkpoint at the epoch's last step: end_of_dataloader says so, and the restart starts the next epoch whole;
        # restarting in the same epoch reads it all again (accelerate saved the epoch as over).
        assert run["end_of_dataloader"] == [False] * 4 + [True], rank
        assert run["after_last_step"] == whole[1] and run["after_last_step_same_epoch"] == whole[0], rank
    assert sorted(sum((run["head"] + run["tail"] for run in ranks), [])) == sorted(everything)
    # The dataset's own set_epoch is overridden by accelerate's epoch counter, which a restart sets back to 0:
    # the resumed rest comes from epoch 0's order, so samples of epoch 1 are lost and others read twice.
    dataset_only = sum((run["head"] + run["tail_dataset_set_epoch"] for run in ranks), [])
    assert len(dataset_only) == len(everything) and set(dataset_only) != set(everything)


# Errors whose constructor takes more than a message, with arguments to build one.
ERROR_ARGUMENTS = {
    "ConfigError": ("--output-dir", "/cache", "an empty or new directory", "Choose another directory."),
    "ResumeMismatch": ({"seq_length": (96, 128)},),
    "HeadMismatch": ("LlamaForCausalLM", "lm_head", 0.5, 1e-3, "fp32"),
    "CacheMismatch": ("the cache", {"seq_length": (2048, 4096)}),
}


def every_error_class() -> list[type]:
    for module in pkgutil.walk_packages(builder.__path__, "builder."):
        importlib.import_module(module.name)  # each module's own error classes

    def below(cls: type):
        for sub in cls.__subclasses__():
            yield sub
            yield from below(sub)

    return sorted(set(below(Eagle3CacheError)), key=lambda cls: cls.__qualname__)


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda cls: cls.__qualname__)
def test_every_error_survives_the_trip_to_another_rank(cls):
    """`pipeline.agree` hands rank 0's error to the other ranks pickled: each must arrive as itself,
    whatever its constructor takes. A new class with a constructor of its own needs its arguments
    in ERROR_ARGUMENTS."""
    error = cls(*ERROR_ARGUMENTS.get(cls.__name__, ("what was expected, what was found, what to do",)))
    arrived = pickle.loads(pickle.dumps(error))
    assert type(arrived) is cls and str(arrived) == str(error) and vars(arrived) == vars(error)


AGREE_ON_RANK = textwrap.dedent("""
    import json, sys
    from datetime import timedelta
    import torch.distributed as dist
    from builder.pipeline import agree
    from builder.errors import ConfigError, Eagle3CacheError, ResumeMismatch

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))

    class State:
        is_main_process, num_processes = rank == 0, 2

    def raising(error):
        def step():
            raise error
        return step

    for error in (ConfigError("--output-dir", "/cache", "an empty or new directory", "Another build started writing to it."),
                  ResumeMismatch({"seq_length": (96, 128)})):
        try:
            agree(State, raising(error), "taking the output directory")
        except Eagle3CacheError as err:
            print(json.dumps([type(err).__name__, str(err)]), flush=True)
    dist.destroy_process_group()
""")


def run_two_ranks(script: str, tmp_path: Path) -> list[list]:
    """Runs `script` as gloo ranks 0 and 1; each line it prints is JSON. A rank still running after
    two minutes (waiting for the other) fails the test rather than hanging it."""
    store = tmp_path / "store"
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(rank), str(store)],
            env={**env(), "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = finish_ranks(ranks)
    assert [status for status, _, _ in outputs] == [0, 0], "\n".join(stderr[-2000:] for _, _, stderr in outputs)
    return [[json.loads(line) for line in stdout.splitlines()] for _, stdout, _ in outputs]


def test_rank_0s_start_up_error_is_raised_on_every_rank_as_itself(tmp_path):
    """Two gloo ranks: each start-up error of rank 0 (here one with a constructor of its own) is
    raised on rank 1 with its own class and message."""
    raised = run_two_ranks(AGREE_ON_RANK, tmp_path)
    assert [name for name, _ in raised[0]] == ["ConfigError", "ResumeMismatch"]
    assert raised[1] == raised[0]


AGREE_ON_A_FOREIGN_ERROR = textwrap.dedent("""
    import json, sys
    from datetime import timedelta
    import torch.distributed as dist
    from builder.pipeline import agree

    rank, store = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60))

    class State:
        is_main_process, num_processes = rank == 0, 2

    def take_the_directory():
        raise PermissionError(13, "Permission denied", "/cache/.eagle3_build/identity.json")

    try:
        agree(State, take_the_directory, "taking the output directory")
    except BaseException as err:
        print(json.dumps([type(err).__name__, str(err)]), flush=True)
    dist.destroy_process_group()
""")


def test_rank_0s_start_up_failure_of_any_kind_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 fails with an error that is not the project's (a PermissionError taking the directory):
    rank 0 raises it as it is, and rank 1, instead of waiting for a broadcast that never comes, an
    error that names it."""
    (rank_0,), (rank_1,) = run_two_ranks(AGREE_ON_A_FOREIGN_ERROR, tmp_path)
    assert rank_0 == ["PermissionError", "[Errno 13] Permission denied: '/cache/.eagle3_build/identity.json'"]
    name, message = rank_1
    assert name == "RankZeroFailed"
    assert "rank 0 stopped while taking the output directory: PermissionError: [Errno 13] Permission denied" in message


def start_ranks(script: str, args: list[str], cwds: list[Path]) -> list[subprocess.Popen]:
    """`script` as ranks 0 and 1 of one launch, as `accelerate launch` or `torchrun` start them (the
    launcher's environment), each in its own working directory, as on two nodes."""
    launch = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=cwd,
            env={**env(), **launch, "RANK": str(rank), "LOCAL_RANK": "0", "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, cwd in enumerate(cwds)
    ]


def finish_ranks(ranks: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each rank; a rank still running after two minutes (waiting for
    the other) fails the test rather than hanging it."""
    try:
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    except subprocess.TimeoutExpired:
        for rank in ranks:
            rank.kill()
        outputs = [rank.communicate() for rank in ranks]
        pytest.fail("a rank was still waiting after 120 s:\n" + "\n".join(stderr[-2000:] for _, stderr in outputs))
    return [(rank.returncode, stdout, stderr) for rank, (stdout, stderr) in zip(ranks, outputs, strict=True)]


BUILD_ON_A_NODE = textwrap.dedent("""
    import sys
    import builder.pipeline as pipeline_module
    from builder.cli import main

    pipeline_module.RUN_TOKEN_WAIT_SECONDS = 0  # local folders show rank 0's token at once: no network file system to wait for
    sys.exit(main(["build", *sys.argv[1:]]))
""")


def test_ranks_that_do_not_see_one_output_dir_all_refuse_before_the_target_runs(tmp_path):
    """Two "nodes" given the relative --output-dir `cache` from other working directories: rank 1
    does not find the token rank 0 wrote, so both stop at start-up with one message, the target
    never run, and rank 0's folder holds no build (a rerun needs no --resume)."""
    import socket

    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    ranks = start_ranks(BUILD_ON_A_NODE, ["--output-dir", "cache", *FLAGS, "--max-samples", "12", "--shard-size", "4"], nodes)
    finished = finish_ranks(ranks)
    host = socket.gethostname()
    says = (
        "error: --output-dir must name the same directory on every node (a shared filesystem; an absolute path): "
        f"rank 0 (on {host}) wrote this run's token to {nodes[0] / 'cache' / BUILD_STATE_DIR / 'run-token.json'}, "
        f"and rank 1 (on {host}) sees {nodes[1] / 'cache'} without it."
    )
    for rank, (status, _, stderr) in enumerate(finished):
        assert status != 0 and says in stderr, (rank, stderr[-3000:])
    for node in nodes:
        assert not (node / "cache" / "data").exists() and not (node / "cache" / BUILD_STATE_DIR / "ranks").exists()
    assert not holds_cache(nodes[0] / "cache")


def test_shards_of_ranks_that_wrote_elsewhere_are_named_with_their_ranks(tmp_path, monkeypatch):
    """Every rank is done, but rank 1's shards have no record in rank 0's directory (rank 1 wrote into
    another one): rank 0 names the shards and the rank that wrote them, and writes no card."""
    from types import SimpleNamespace

    import builder.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "RECORD_WAIT_SECONDS", 0)  # a local folder: no network file system to wait for
    from builder.build_state import sidecar_path
    from builder.pipeline import BuildResult, finish_cache

    out = tmp_path / "cache"
    prep = SimpleNamespace(num_shards=4)
    for k in (0, 2):  # rank 0's, of 2 ranks
        sidecar_path(out, f"train-{k:05d}-of-00004.parquet").parent.mkdir(parents=True, exist_ok=True)
        sidecar_path(out, f"train-{k:05d}-of-00004.parquet").write_text(json.dumps({"rows": 4, "failed": []}))
    missing = "rank 1: train-00001-of-00004.parquet, train-00003-of-00004.parquet"
    with pytest.raises(ShardRecordsMissing, match=rf"2 of the 4 shards have no record in .*\({missing}\).*--resume"):
        finish_cache(out, prep, BuildResult(out, prep, rank=0, world_size=2), None, None)
    assert not (out / "README.md").exists()


def test_shard_records_another_node_shows_late_are_looked_for_again(tmp_path, monkeypatch):
    """Every rank is done, but a network file system shows rank 0 the records rank 1 wrote on its node
    only once its cached view of the folder expires: rank 0 looks again before it refuses, and writes
    the card with every shard's record."""
    from types import SimpleNamespace

    import builder.pipeline as pipeline_module
    from builder.build_state import sidecar_path
    from builder.files import write_json_atomic
    from builder.pipeline import BuildResult, finish_cache

    out = tmp_path / "cache"
    prep = SimpleNamespace(num_shards=4, cfg=SimpleNamespace(target_format="logits"))
    names = [f"train-{k:05d}-of-00004.parquet" for k in range(4)]

    def write_records(ranks_shards):
        for k in ranks_shards:
            sidecar_path(out, names[k]).parent.mkdir(parents=True, exist_ok=True)
            sidecar_path(out, names[k]).write_text(json.dumps({"name": names[k], "rows": 4, "failed": []}))

    write_records((0, 2))  # rank 0's; rank 1's are not shown yet
    for rank in (0, 1):
        stats = {"rank": rank, "world_size": 2, "shards_written": names[rank::2], "samples": 8}
        write_json_atomic(out / BUILD_STATE_DIR / "ranks" / f"rank-{rank:05d}.json", stats)
    looks, cards = [], []

    def rank_1s_records_show_up(seconds):
        looks.append(seconds)
        write_records((1, 3))

    monkeypatch.setattr(pipeline_module.time, "sleep", rank_1s_records_show_up)
    monkeypatch.setattr(pipeline_module, "write_vocab", lambda out, prep: None)
    monkeypatch.setattr(pipeline_module, "write_card", lambda out, prep, shards, ranks, drawing: cards.append(shards) or {})
    finish_cache(out, prep, BuildResult(out, prep, rank=0, world_size=2), None, None)
    assert [[record["name"] for record in shards] for shards in cards] == [names]
    assert len(looks) == 1


def test_rank_records_another_node_shows_late_are_looked_for_again(tmp_path, monkeypatch):
    """The card tells of every rank's work: a rank's record that a network file system shows rank 0
    late is looked for again, not left out (the summary then counted its shards as already complete)."""
    import builder.pipeline as pipeline_module
    from builder.files import write_json_atomic

    ranks = tmp_path / BUILD_STATE_DIR / "ranks"

    def record(rank):
        stats = {"rank": rank, "world_size": 2, "shards_written": [f"train-{rank:05d}-of-00002.parquet"], "samples": 4}
        write_json_atomic(ranks / f"rank-{rank:05d}.json", stats)

    record(0)
    looks = []

    def rank_1s_record_shows_up(seconds):
        looks.append(seconds)
        record(1)

    monkeypatch.setattr(pipeline_module.time, "sleep", rank_1s_record_shows_up)
    stats = pipeline_module.read_rank_stats(tmp_path, world_size=2)
    assert [(s["rank"], s["shards_written"]) for s in stats] == [
        (0, ["train-00000-of-00002.parquet"]),
        (1, ["train-00001-of-00002.parquet"]),
    ]
    assert len(looks) == 1


def test_a_rank_shown_rank_0s_token_late_waits_for_it(tmp_path, monkeypatch):
    """A network file system may show a file another node just created only once its cached view of
    the folder expires: a rank that does not find the token yet looks again before it refuses."""
    import builder.pipeline as pipeline_module
    from builder.build_state import RUN_TOKEN_FILE
    from builder.files import write_json_atomic

    out = tmp_path / "cache"
    looks = []

    def the_token_shows_up(seconds):
        looks.append(seconds)
        write_json_atomic(out / RUN_TOKEN_FILE, {"token": "rank 0's"})

    monkeypatch.setattr(pipeline_module.time, "sleep", the_token_shows_up)
    assert pipeline_module.wait_for_run_token(out, "rank 0's", rank=1) == "rank 0's"
    assert len(looks) == 1


BUILD_WITH_RANK_1_FAILING = textwrap.dedent("""
    import os, sys
    import builder.forward as forward
    from builder.cli import main
    from builder.errors import WriteFailed

    def failing(*args, **kwargs):
        raise WriteFailed("writing train-00001-of-00004.parquet failed (Input/output error)")

    if os.environ["RANK"] == "1":
        forward.write_one_shard = failing
    sys.exit(main(["build", *sys.argv[1:]]))
""")


def test_a_rank_that_fails_mid_build_stops_the_others_with_a_message_naming_it(tmp_path):
    """Rank 1 fails while writing its shards under a launcher that does not stop the other ranks: rank 1
    says why, and rank 0, once its own shards are done, stops too, saying that another rank failed,
    where to read why, and that its shards are kept for --resume (not a raw error of the process group)."""
    out = tmp_path / "cache"
    flags = ["--output-dir", str(out), *FLAGS, "--max-samples", "16", "--shard-size", "4"]
    (rank_0, _, stderr_0), (rank_1, _, stderr_1) = finish_ranks(start_ranks(BUILD_WITH_RANK_1_FAILING, flags, [tmp_path, tmp_path]))
    assert rank_1 == 2 and "error: writing train-00001-of-00004.parquet failed (Input/output error)" in stderr_1, stderr_1[-3000:]
    assert rank_0 == 2, stderr_0[-3000:]
    assert re.search(
        r"error: rank 0 finished its shards, but another rank stopped before finishing its own \(.+\); that rank's "
        r"output says why\. The 2 shards this rank wrote are kept and the cache was not finished \(no card\): fix what "
        r"that rank reports, then rerun with --resume, which builds only the missing shards\.",
        stderr_0,
    ), stderr_0[-3000:]
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == ["train-00000-of-00004.parquet", "train-00002-of-00004.parquet"]
    assert not (out / "README.md").exists()


BUILD_AFTER_THE_CALLERS_STATE = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from accelerate import Accelerator
    from builder import BuildConfig, build
    from builder.errors import Eagle3CacheError

    Accelerator()  # a caller's own, made without cpu=True: one process, though the launch's gloo group holds two
    cfg = BuildConfig(target_model="tiny-llama", input_data="sample-chats", output_dir=sys.argv[1], seq_length=128,
                      draft_vocab_size=200, dtype="fp32", batch_size=4, max_samples=12, shard_size=4)
    try:
        build(cfg, progress=False)
    except Eagle3CacheError as err:
        print(json.dumps([type(err).__name__, str(err)]), flush=True)
        dist.destroy_process_group()  # as a caller leaving its launch: a group left up may abort the process at exit
        sys.exit(2)
""")


def test_a_callers_state_that_counts_one_process_of_two_is_refused_on_every_rank(tmp_path):
    """A caller created an accelerate state counting one process before calling build() under a
    2-process launch: every rank refuses, naming both counts and what to do, before anything is
    written, instead of each building alone as rank 0 of 1."""
    out = tmp_path / "cache"
    finished = finish_ranks(start_ranks(BUILD_AFTER_THE_CALLERS_STATE, [str(out)], [tmp_path, tmp_path]))
    for rank, (status, stdout, stderr) in enumerate(finished):
        assert status == 2, (rank, stdout[-2000:], stderr[-3000:])
        name, message = json.loads(stdout.splitlines()[-1])
        assert name == "ProcessCountMismatch"
        assert re.search(r"torch.distributed runs 2 processes, but the accelerate state created before build\(\) counts 1", message)
        assert "Accelerator(cpu=True) or PartialState(cpu=True), or call build() before creating one" in message
    assert not out.exists()


BUILD_THEN_REPORT_THE_GROUP = textwrap.dedent("""
    import atexit, sys
    import torch.distributed as dist
    from builder.cli import main

    atexit.register(lambda: print("process group left up:", dist.is_initialized(), flush=True))
    sys.exit(main(["build", *sys.argv[1:]]))
""")


def test_a_build_that_succeeded_leaves_no_process_group_up_at_exit(tmp_path):
    """A gloo group left up at exit can abort the process after the build succeeded, and the launcher
    then reads the rank as failed: the CLI tears down the group the build's launch made."""
    ranks = start_ranks(BUILD_THEN_REPORT_THE_GROUP, ["--output-dir", str(tmp_path / "cache"), *FLAGS, "--dry-run"], [tmp_path, tmp_path])
    for status, stdout, stderr in finish_ranks(ranks):
        assert status == 0, stderr[-3000:]
        assert "process group left up: False" in stdout, stdout[-2000:] + stderr[-2000:]
