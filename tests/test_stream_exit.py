"""Exit after a stream stopped mid-shard: wait until Arrow frees the shard files a stream opened."""

from __future__ import annotations

import gc
import logging
import os
import pickle
import threading
import traceback
import weakref

import pytest
from helpers import small_config

import builder.reader as reader
import builder.stream_exit as stream_exit
from builder.pipeline import build
from builder.reader import load_cache

SHARD = "data/train-00000-of-00001.parquet"


@pytest.fixture
def streamed(monkeypatch, tmp_path):
    """A fresh record of streamed shards, and a closed file object at one of their paths."""
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    stream_exit.track_shards([SHARD])
    path = tmp_path / SHARD
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1")
    return path


def test_exit_waits_until_the_last_holder_frees_a_closed_shard_file(streamed):
    held = [open(streamed, "rb")]  # noqa: SIM115 - held by the "Arrow" thread below, closed as datasets closes it
    held[0].close()
    freed_by_holder = threading.Event()

    def arrow_thread(go: threading.Event):
        go.wait()
        held.clear()  # the last reference: Arrow's read ended
        freed_by_holder.set()

    go = threading.Event()
    holder = threading.Thread(target=arrow_thread, args=(go,))
    holder.start()
    assert stream_exit.wait_for_released_shards(timeout=60, on_waiting=go.set) == 1
    assert freed_by_holder.is_set() and not held
    holder.join()


def test_only_closed_files_at_a_streamed_shard_path_are_waited_for(streamed, tmp_path):
    still_reading = open(streamed, "rb")  # noqa: SIM115 - a live read's file: open, not Arrow's leftover
    other = tmp_path / "data" / "train-00000-of-00002.parquet"
    other.write_bytes(b"PAR1")
    unrelated = open(other, "rb")  # noqa: SIM115
    unrelated.close()
    called = []
    assert stream_exit.wait_for_released_shards(timeout=60, on_waiting=lambda: called.append(1)) == 0
    assert called == []  # nothing to wait for: it returned before blocking
    assert stream_exit.shard_files(closed_only=False) == [still_reading]
    still_reading.close()


def test_exit_gives_up_after_the_timeout_with_a_warning_and_sees_frozen_files_too(streamed, caplog):
    kept = open(streamed, "rb")  # noqa: SIM115 - never freed while the wait runs
    kept.close()
    gc.freeze()  # as the command line does at exit: frozen objects are hidden from gc.get_objects()
    try:
        with caplog.at_level(logging.WARNING, logger="builder.stream_exit"):
            assert stream_exit.wait_for_released_shards(timeout=0.01) == 0
        assert gc.get_freeze_count() > 0  # still frozen afterwards
    finally:
        gc.unfreeze()
    assert "1 streamed shard file(s) still held after 0 s at exit; exiting anyway" in caplog.text
    assert stream_exit.shard_files(closed_only=True) == [kept]


def test_a_stream_records_its_shards_and_finds_the_file_datasets_opened(monkeypatch, tmp_path):
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    monkeypatch.setattr(reader, "memory_map_local_shards", lambda hf: False)  # read through datasets' file, as from the Hub
    out = build(small_config(tmp_path / "cache", max_samples=4, shard_size=2), progress=False).output_dir
    rows = iter(load_cache(out, layout="raw", columns=["sample_id"], streaming=True))
    assert stream_exit.STREAMED_SHARDS == {"data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"}
    next(rows)
    reading = stream_exit.shard_files(closed_only=False)
    assert [f.closed for f in reading] == [False]
    assert str(reading[0].name).replace("\\", "/").endswith("data/train-00000-of-00002.parquet")
    del reading
    rows.close()  # the stream stops mid-shard, as a `break` stops it
    del rows
    gc.collect()
    stream_exit.wait_for_released_shards(timeout=60)
    assert stream_exit.shard_files(closed_only=True) == []


def test_a_closed_shard_file_kept_only_by_an_error_traceback_is_freed_not_waited_for(streamed, caplog):
    def read_shard():
        with open(streamed, "rb") as file:  # `datasets` reads a shard so: `file` stays in the frame
            raise OSError(f"corrupt page in {file.name}")  # the file is closed, its frame kept by the traceback

    with pytest.raises(OSError, match="corrupt page") as failed:  # kept, as an uncaught error is kept at exit (sys.last_value)
        read_shard()
    with caplog.at_level(logging.WARNING, logger="builder.stream_exit"):
        assert stream_exit.wait_for_released_shards(timeout=0.01) == 1
    assert "still held" not in caplog.text
    assert stream_exit.shard_files(closed_only=True) == []
    assert "in read_shard" in "".join(traceback.format_exception(failed.value))  # the traceback still says where it failed


def test_a_stream_that_failed_mid_shard_leaves_no_file_for_the_exit_to_wait_on(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    out = build(small_config(tmp_path / "cache", max_samples=4, shard_size=2), progress=False).output_dir
    shard = out / "data" / "train-00001-of-00002.parquet"
    damaged = bytearray(shard.read_bytes())
    damaged[4:40] = b"\xff" * 36  # the first page header of the second shard
    shard.write_bytes(bytes(damaged))
    with pytest.raises(OSError, match="deserialize thrift") as failed:
        list(load_cache(out, layout="raw", columns=["sample_id"], streaming=True))
    with caplog.at_level(logging.WARNING, logger="builder.stream_exit"):
        stream_exit.wait_for_released_shards(timeout=60)
    assert "still held" not in caplog.text
    assert stream_exit.shard_files(closed_only=True) == []  # an exit right now (the error uncaught) has nothing to wait for
    assert "in _windows" in "".join(traceback.format_exception(failed.value))  # the traceback still says where it failed


def test_a_stream_read_in_a_spawned_worker_records_its_shards_there(monkeypatch, tmp_path):
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    monkeypatch.setattr(reader, "memory_map_local_shards", lambda hf: False)  # read through datasets' file, as from the Hub
    out = build(small_config(tmp_path / "cache", max_samples=4, shard_size=2), progress=False).output_dir
    dataset = load_cache(out, layout="raw", columns=["sample_id"], streaming=True)
    # A spawned DataLoader worker gets the dataset pickled, and a fresh module: load_cache never ran there.
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    rows = iter(pickle.loads(pickle.dumps(dataset)))
    next(rows)
    assert stream_exit.STREAMED_SHARDS == {"data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"}
    rows.close()


def test_a_users_own_closed_file_of_a_memory_mapped_shard_is_not_waited_for(monkeypatch, tmp_path, caplog):
    """Memory-mapped shards are read through no Python file, so Arrow holds none: a script that read a
    shard's bytes itself (`with open(shard) as f:` at top level keeps `f`) exits at once, not after the timeout."""
    monkeypatch.setattr(stream_exit, "STREAMED_SHARDS", set())
    out = build(small_config(tmp_path / "cache", max_samples=4, shard_size=2), progress=False).output_dir
    dataset = load_cache(out, layout="raw", columns=["sample_id"], streaming=True)
    assert len(list(pickle.loads(pickle.dumps(dataset)))) == 4  # in a spawned DataLoader worker too
    with open(out / "data" / "train-00000-of-00002.parquet", "rb") as mine:
        assert mine.read(4) == b"PAR1"
    waited = []
    with caplog.at_level(logging.WARNING, logger="builder.stream_exit"):
        assert stream_exit.wait_for_released_shards(timeout=0.01, on_waiting=lambda: waited.append(1)) == 0
    assert waited == [] and "still held" not in caplog.text and mine.closed


def test_exit_closes_every_other_stream_when_one_is_being_read_by_another_thread(monkeypatch, streamed):
    monkeypatch.setattr(stream_exit, "OPEN_READS", weakref.WeakSet())
    reading, done = threading.Event(), threading.Event()
    closed = []

    def busy():  # a stream a daemon thread is still reading when the program ends
        reading.set()
        done.wait()
        yield 1

    def idle(name):
        try:
            yield 1
        finally:
            closed.append(name)

    streams = [busy(), idle("a"), idle("b")]
    for rows in streams:
        stream_exit.track_stream(rows)
    for rows in streams[1:]:
        next(rows)
    reader = threading.Thread(target=next, args=(streams[0],))
    reader.start()
    reading.wait()
    try:
        stream_exit.finish_streams()  # `rows.close()` of the busy one: "generator already executing"
    finally:
        done.set()
        reader.join()
    assert sorted(closed) == ["a", "b"]


def test_a_closed_shard_file_kept_only_by_a_reference_cycle_is_collected_not_waited_for(streamed, caplog):
    cycle = {"file": open(streamed, "rb")}  # noqa: SIM115 - closed below, then left to the collector
    cycle["self"] = cycle
    cycle["file"].close()
    watch = weakref.ref(cycle["file"])
    del cycle
    with caplog.at_level(logging.WARNING, logger="builder.stream_exit"):
        assert stream_exit.wait_for_released_shards(timeout=0.01) == 0  # freed by the collection, before any wait
    assert watch() is None and "still held" not in caplog.text


def test_a_closed_shard_file_in_a_frozen_reference_cycle_is_collected_not_waited_for(streamed, caplog):
    # An fsspec file (a Hub stream's) is always in a cycle: its cache holds its bound fetch method.
    # A `gc.freeze()` while it was alive (a training script's, or the command line's at exit) moves it
    # where a plain collection never looks.
    cycle = {"file": open(streamed, "rb")}  # noqa: SIM115 - closed below, then left to the collector
    cycle["self"] = cycle
    cycle["file"].close()
    watch = weakref.ref(cycle["file"])
    del cycle
    gc.freeze()
    try:
        with caplog.at_level(logging.WARNING, logger="builder.stream_exit"):
            assert stream_exit.wait_for_released_shards(timeout=0.01) == 0
        assert gc.get_freeze_count() > 0  # still frozen afterwards
    finally:
        gc.unfreeze()
    assert watch() is None and "still held" not in caplog.text


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_forgets_the_parents_streams_and_keeps_its_own(streamed, monkeypatch):
    """A child forked mid-stream would otherwise wait at exit on files its parent's Arrow threads hold."""
    monkeypatch.setattr(stream_exit, "OPEN_READS", weakref.WeakSet())
    parents_rows = (row for row in [1, 2, 3])  # stands for a `datasets` iterator the parent left open
    stream_exit.track_stream(parents_rows)
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it would close and wait for at exit, then leave at once
        try:
            inherited = (len(stream_exit.OPEN_READS), len(stream_exit.STREAMED_SHARDS))
            stream_exit.track_shards(["data/child.parquet"])
            os.write(report_write, repr((inherited, sorted(stream_exit.STREAMED_SHARDS))).encode())
        finally:
            os._exit(0)
    os.close(report_write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(report_read, "rb") as report:
        assert report.read().decode() == repr(((0, 0), ["data/child.parquet"]))
    assert status == 0
    assert set(stream_exit.OPEN_READS) == {parents_rows} and stream_exit.STREAMED_SHARDS == {SHARD}  # the parent's own stay
