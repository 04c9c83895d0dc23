"""Crash safety under SIGKILL, non-finite target outputs, a full disk, and one writer per cache."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from helpers import assert_same_content, decoded_rows, says, small_config
from tiny_targets import make_tiny_target, poisoned_target

from builder.build_state import read_sidecar
from builder.errors import ConfigError, DiskFull, NonFiniteOutput
from builder.forward import FAULT_ENV
from builder.lock import LOCK_FILE, CacheLock, CacheLocked
from builder.pipeline import build
from builder.reader import read_manifest
from builder.verify import verify_cache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_cache.py"
FLAGS = ["--max-samples", "30", "--shard-size", "3", "--seq-length", "96", "--draft-vocab-size", "200", "--dtype", "fp32", "--quiet"]


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--output-dir", str(out), *FLAGS, *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def assert_every_shard_file_is_complete(out: Path) -> None:
    """What a kill leaves behind: each real shard name is a whole file matching its record."""
    for path in (out / "data").glob("train-*.parquet"):
        sidecar = read_sidecar(out, path.name)
        assert sidecar is not None and sidecar["bytes"] == path.stat().st_size, path.name
        assert pq.ParquetFile(path).metadata.num_rows == sidecar["rows"]


def shard_count(out: Path) -> int:
    return len(list((out / "data").glob("train-*.parquet")))


def run_killed_at(out: Path, fault: str) -> None:
    """One run of the build, SIGKILLed by itself at the named point (see builder.forward.FaultPoints)."""
    flags = ("--resume",) if (out / ".eagle3_build" / "identity.json").exists() else ()
    proc = subprocess.run(command(out, *flags), env=env() | {FAULT_ENV: fault}, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {fault}: {proc.stderr[-2000:]}"
    assert_every_shard_file_is_complete(out)


def test_sigkill_at_named_points_then_resume_gives_identical_content(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(command(reference), env=env(), check=True, capture_output=True)

    out = tmp_path / "killed"  # 10 shards of 3 samples, one forward batch each
    run_killed_at(out, "after_batch:1")  # inside the first shard: nothing published yet
    assert shard_count(out) == 0 and (out / ".eagle3_build" / "identity.json").exists()
    run_killed_at(out, "after_shard:3")  # right after a publish (sidecar written, file renamed)
    assert shard_count(out) == 3
    run_killed_at(out, "after_batch:2")  # inside this run's second shard: its first may or may not be on disk
    assert shard_count(out) in (3, 4)
    before = shard_count(out)
    run_killed_at(out, "after_shard:2")
    assert shard_count(out) == before + 2 < 10

    drawings = out / ".eagle3_build"
    assert len(list(drawings.glob("pictures-*"))) == 1  # the last killed run's; each run removed the ones before

    subprocess.run(command(out, "--resume"), env=env(), check=True, capture_output=True)
    assert not list((out / "data").glob(".*"))  # temp files of killed writers are gone
    assert not list(drawings.glob("pictures-*"))  # and the killed runs' picture folders
    assert_same_content(decoded_rows(reference), decoded_rows(out))


def test_non_finite_samples_are_recorded_not_written(tmp_path):
    clean = build(small_config(tmp_path / "clean", make_tiny_target(tmp_path / "clean-target", "llama")), progress=False)
    samples = clean.prepared.samples
    # a token present in some samples but not all
    counts = {}
    for ids in samples["input_ids"]:
        for t in set(ids):
            counts[t] = counts.get(t, 0) + 1
    token = min((t for t, c in counts.items() if 1 <= c <= 3), key=lambda t: (counts[t], t))
    poisoned_ids = {s["sample_id"] for s in samples if token in s["input_ids"]}

    target = poisoned_target(tmp_path, token)
    result = build(small_config(tmp_path / "cache", target), progress=False)
    manifest = read_manifest(result.output_dir)
    assert {f["sample_id"] for f in manifest["failed"]} == poisoned_ids
    assert all(f["reason"] == "non_finite_output" for f in manifest["failed"])
    rows = decoded_rows(result.output_dir)
    survivors = [r for r in decoded_rows(clean.output_dir) if r["sample_id"] not in poisoned_ids]
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in survivors] and 0 < len(rows) < len(samples)
    assert_same_content(rows, survivors)  # every value, torch.equal: the poisoned samples touched no other row
    # resume accepts shards that are short by exactly their recorded failures
    again = build(small_config(tmp_path / "cache", target, resume=True), progress=False)
    assert again.written == []


def target_failing_every_sample_of_the_first_shard(tmp_path: Path) -> Path:
    """A target with NaN embeddings for one token of each sample of small_config's first shard, held by no
    sample of another shard: that shard's samples all fail, every other shard is stored whole."""
    from builder.prepare import prepare

    cfg = small_config(tmp_path / "plan")
    samples = prepare(cfg).samples["input_ids"]
    first, others = samples[: cfg.shard_size], samples[cfg.shard_size :]
    elsewhere = {t for ids in others for t in ids}
    return poisoned_target(tmp_path, [min(set(ids) - elsewhere) for ids in first])


def test_resume_of_a_cache_with_a_shard_whose_every_sample_failed(tmp_path):
    target = target_failing_every_sample_of_the_first_shard(tmp_path)
    out = build(small_config(tmp_path / "cache", target), progress=False).output_dir
    manifest = read_manifest(out)
    assert [shard["rows"] for shard in manifest["shards"]] == [0, 4, 4, 2]
    assert [failure["shard"] for failure in manifest["failed"]] == [manifest["shards"][0]["name"]] * 4
    rows = decoded_rows(out)

    (out / "data" / manifest["shards"][1]["name"]).unlink()  # a shard to rebuild: resume checks the empty one too
    again = build(small_config(tmp_path / "cache", target, resume=True), progress=False)
    assert [Path(path).name for path in again.written] == [manifest["shards"][1]["name"]]
    assert_same_content(decoded_rows(out), rows)  # every value, torch.equal
    assert verify_cache(out) == []


def rare_token(tmp_path: Path) -> int:
    """A token of small_config's samples held by one to three of them: poisoning it leaves some standing."""
    from builder.prepare import prepare

    counts = {}
    for ids in prepare(small_config(tmp_path / "rare")).samples["input_ids"]:
        for t in set(ids):
            counts[t] = counts.get(t, 0) + 1
    return min((t for t, c in counts.items() if 1 <= c <= 3), key=lambda t: (counts[t], t))


def non_finite(live: dict, b: int) -> bool:
    real = live["attention"][b].bool()
    return not (live["aux"][b][real].isfinite().all() and live["final_hidden"][b][real].isfinite().all())


@pytest.mark.parametrize(
    "formats", [dict(target_format="topk", topk=8, aux_dtype="fp8"), dict(target_format="hidden")], ids=["topk-fp8", "hidden"]
)
def test_the_cards_quality_figures_are_those_of_the_stored_samples(tmp_path, monkeypatch, formats):
    """Each forward batch's live outputs are kept aside: its figures, and the card's, must be those of its
    finite samples, each measured alone, with nothing of the samples recorded as failed."""
    from helpers import assert_same_figures, quality_of_samples

    import builder.forward as forward_module
    from builder.formats import merge_quality, quality_report

    batches, measure = [], forward_module.quality_of_batch

    def keeping_the_batch(layout, live, encoded, draft_rows=None, transform=None, *finite):
        figures = measure(layout, live, encoded, draft_rows, transform, *finite)
        batches.append((layout, {name: tensor.clone() for name, tensor in live.items()}, draft_rows, transform, figures))
        return figures

    monkeypatch.setattr(forward_module, "quality_of_batch", keeping_the_batch)
    result = build(small_config(tmp_path / "cache", poisoned_target(tmp_path, rare_token(tmp_path)), **formats), progress=False)
    manifest = read_manifest(result.output_dir)
    merged, dropped = {}, 0
    for layout, live, draft_rows, transform, figures in batches:
        kept = [b for b in range(len(live["attention"])) if not non_finite(live, b)]
        dropped += len(live["attention"]) - len(kept)
        expected = quality_of_samples(layout, live, kept, draft_rows, transform)
        figures = {name: value.tolist() for name, value in figures.items()}
        assert [name for name, value in figures.items() if not name.endswith("_hist") and math.isnan(value)] == []
        if kept:  # a batch of failures only adds no figure: checked in test_formats
            assert_same_figures(figures, expected)
        merged = merge_quality(merged, expected)
    assert 0 < dropped == len(manifest["failed"])
    assert_same_figures(manifest["quality"], quality_report(merged))


def test_non_finite_output_stops_a_strict_build(tmp_path):
    target = poisoned_target(tmp_path, token_id=6)  # <|assistant|>: in every sample
    with pytest.raises(NonFiniteOutput, match=r"--strict: the target produced NaN/Inf for input row \d+"):
        build(small_config(tmp_path / "cache", target, strict=True), progress=False)
    assert not list((tmp_path / "cache" / "data").glob("*.parquet"))


def test_a_build_whose_every_sample_is_non_finite_fails_instead_of_finishing_empty(tmp_path):
    target = poisoned_target(tmp_path, token_id=6)  # <|assistant|>: in every sample
    with pytest.raises(NonFiniteOutput, match=r"NaN or Inf for every sample \(14\): no sample could be stored.*--dtype"):
        build(small_config(tmp_path / "cache", target), progress=False)
    assert not (tmp_path / "cache" / "README.md").exists()  # not a finished cache


def test_a_build_racing_another_onto_the_same_directory_keeps_none_of_its_files(tmp_path, monkeypatch):
    import builder.pipeline as pipeline_module

    out = tmp_path / "cache"
    other = build(small_config(tmp_path / "other", aux_layer_ids=(2, 3, 4)), progress=False).output_dir
    real_prepare = pipeline_module.prepare

    def another_build_starts_meanwhile(cfg):  # after this build checked the directory, before it locks it
        prepared = real_prepare(cfg)
        (out / "data").mkdir(parents=True)
        (out / ".eagle3_build").mkdir()
        for name in ("data/train-00000-of-00004.parquet", ".eagle3_build/identity.json"):
            (out / name).write_bytes((other / name).read_bytes() if name.startswith("data") else b"{}")
        return prepared

    monkeypatch.setattr(pipeline_module, "prepare", another_build_starts_meanwhile)
    with pytest.raises(ConfigError, match=r"--output-dir: expected an empty or new directory.*Another build started writing to it"):
        build(small_config(out), progress=False)
    assert (out / ".eagle3_build" / "identity.json").read_bytes() == b"{}"  # its files untouched, none of ours added
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00004.parquet"]


def test_a_start_that_fails_releases_the_lock_and_says_what_to_do(tmp_path, monkeypatch):
    import builder.pipeline as pipeline_module

    real_write = pipeline_module.write_json_atomic

    def disk_full_once(path, data):
        monkeypatch.setattr(pipeline_module, "write_json_atomic", real_write)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline_module, "write_json_atomic", disk_full_once)  # the build state's first write
    with pytest.raises(DiskFull, match=r"no space left writing .*\.eagle3_build/\w+\.json"):
        build(small_config(tmp_path / "cache"), progress=False)
    again = build(small_config(tmp_path / "cache", resume=True), progress=False)  # as the message says, in the same process
    assert len(again.written) == 4  # its own lock was released; nothing had been written, so the build starts


def test_full_disk_gives_a_clear_error_and_resume_completes(tmp_path):
    reference = build(small_config(tmp_path / "reference"), progress=False)
    sizes = [s["bytes"] for s in reference.manifest["shards"]]
    limit = sizes[0] + 1  # the first shard fits; a later, larger one does not
    assert max(sizes) > limit
    out = tmp_path / "cache"

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing

    cmd = [
        sys.executable,
        str(SCRIPT),
        "--output-dir",
        str(out),
        "--max-samples",
        "14",
        "--shard-size",
        "4",
        "--seq-length",
        "96",
        "--batch-size",
        "3",
        "--draft-vocab-size",
        "300",
        "--dtype",
        "fp32",
        "--quiet",
    ]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, preexec_fn=limit_file_size, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: no space left writing" in proc.stderr and "rerun with --resume" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert_every_shard_file_is_complete(out)
    assert not list((out / "data").glob(".*"))  # the failed shard's temp file was removed
    assert (out / "data" / "train-00000-of-00004.parquet").exists()

    subprocess.run(cmd + ["--resume"], env=env(), check=True, capture_output=True)
    assert_same_content(decoded_rows(reference.output_dir), decoded_rows(out))


HOLD_LOCK = """
import sys
from builder.lock import CacheLock
CacheLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()  # holds the lock until killed (or its stdin closes), however long the test takes
"""


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "cache"
    build(small_config(out, max_samples=4), progress=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot_files(out)
        with pytest.raises(CacheLocked, match=says(f"pid {holder.pid}", "Wait for that build")):
            build(small_config(out, max_samples=4, resume=True), progress=False)
        assert snapshot_files(out) == before  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    # its holder died (SIGKILL): the kernel released the lock, and the next build takes it
    result = build(small_config(out, max_samples=4, resume=True), progress=False)
    assert result.manifest is not None


def test_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "cache"
    build(small_config(out, max_samples=4), progress=False)
    dead = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert dead.stdout.readline().strip() == "locked"
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == dead.pid  # its record is still there
    result = build(small_config(out, max_samples=4, resume=True), progress=False)
    assert result.manifest is not None
    CacheLock(out).acquire()  # released again after the build


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_a_file_system_without_locks_is_refused_saying_what_to_do(tmp_path, monkeypatch):
    """flock fails with ENOLCK on NFS without its lock daemon (ENOSYS on some cluster file
    systems): the build stops with what to do, holding no descriptor and having written nothing."""
    import builder.lock as lock_module

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_module, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB))
    out = tmp_path / "cache"
    with pytest.raises(ConfigError, match=says("--output-dir", str(out), "file locks", os.strerror(errno.ENOLCK), "local disk")):
        build(small_config(out), progress=False)
    assert open_descriptors_of(out / LOCK_FILE) == []
    assert [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()] == [LOCK_FILE]  # no identity, no shard


def open_descriptors_of(path: Path) -> list[str]:
    descriptors = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                descriptors.append(fd)
        except OSError:  # the descriptor listing the folder, closed since
            pass
    return descriptors


def snapshot_files(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_build_is_refused_while_processes_of_another_build_still_write_even_with_its_lock_free(tmp_path, monkeypatch):
    """A launcher that does not stop the other ranks when rank 0 stops leaves them writing with the
    cache lock gone: every rank holds the writers' lock, and a new build (a resume) refuses the cache."""
    import builder.pipeline as pipeline_module
    from builder.lock import CacheLocked, WriterHold, check_no_writers

    out = tmp_path / "cache"
    build(small_config(out, max_samples=4), progress=False)
    still_writing = WriterHold(out)  # another build's rank, whose rank 0 (and its cache lock) is gone
    still_writing.hold()
    with pytest.raises(CacheLocked, match=r"still being written by processes of another build.*Stop them.*rerun with --resume"):
        build(small_config(out, max_samples=4, resume=True), progress=False)
    with pytest.raises(CacheLocked):
        CacheLock(out).acquire()
    still_writing.release()
    taken = CacheLock(out)
    taken.acquire()  # the refused builds let go of the cache lock, and nobody writes now
    taken.release()

    seen = []

    def checks_while_writing(*args, **kwargs):
        with pytest.raises(CacheLocked):
            check_no_writers(out)
        seen.append(True)
        return real_run_forward(*args, **kwargs)

    real_run_forward = pipeline_module.run_forward
    monkeypatch.setattr(pipeline_module, "run_forward", checks_while_writing)
    shutil.rmtree(out)
    build(small_config(out, max_samples=4), progress=False)
    assert seen == [True]
    check_no_writers(out)  # let go once the build returned
