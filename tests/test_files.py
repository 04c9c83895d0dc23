"""Atomic writes, the one temp-name pattern and its cleanup, the disk-full error, file hashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save_file

from builder.errors import DiskFull
from builder.files import (
    atomic_write,
    disk_full_as_error,
    file_hash,
    remove_leftovers,
    temp_path,
    write_bytes_atomic,
    write_json_atomic,
)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "vocab" / "vocab.safetensors"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="killed mid-write"), atomic_write(target) as tmp:
        tmp.write_bytes(b"half of the ne")
        raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["vocab.safetensors"]
    write_json_atomic(tmp_path / "state" / "identity.json", {"b": 1, "a": [2]})  # creates the folder
    assert json.loads((tmp_path / "state" / "identity.json").read_text()) == {"a": [2], "b": 1}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names a descriptor's file through /proc")
def test_a_written_name_survives_a_power_cut_with_the_folders_made_for_it(tmp_path, monkeypatch):
    """A power cut keeps a rename or a new folder only up to its folder's last fsync: after the
    rename, the file's folder and each folder made for it are fsynced, the file's before the rename."""
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append(("rename", str(dst))), real_replace(src, dst))[1])
    root = tmp_path.resolve()
    target = root / "cache" / ".eagle3_build" / "identity.json"
    write_json_atomic(target, {"a": 1})
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync", "fsync", "fsync"]
    assert events[0][1].startswith(str(target.parent / ".identity.json.tmp-")) and events[1] == ("rename", str(target))
    assert [name for _, name in events[2:]] == [str(target.parent), str(root / "cache"), str(root)]
    events.clear()
    write_json_atomic(target, {"a": 2})  # the folders exist now: only the file's own is fsynced again
    assert events[1:] == [("rename", str(target)), ("fsync", str(target.parent))]

    events.clear()  # content written by another library (as safetensors writes vocab and head rows)
    with atomic_write(root / "vocab" / "vocab.safetensors") as tmp:
        save_file({"ids": torch.arange(3)}, str(tmp))
    assert events[0][0] == "fsync" and events[0][1].startswith(str(root / "vocab" / ".vocab.safetensors.tmp-"))
    assert events[1] == ("rename", str(root / "vocab" / "vocab.safetensors"))


def test_resume_removes_exactly_the_temp_files(tmp_path):
    kept = ["train-00000-of-00002.parquet", ".gitattributes", "notes.tmp-1"]
    for name in kept:
        (tmp_path / name).write_bytes(b"kept")
    temp_path(tmp_path / "train-00001-of-00002.parquet").write_bytes(b"partial")  # this process's
    (tmp_path / ".train-00001-of-00002.parquet.tmp-999").write_bytes(b"partial")  # a killed rank's
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_a_full_disk_says_what_to_do_other_errors_pass(tmp_path):
    with pytest.raises(DiskFull, match=r"no space left writing /cache/x \(No space left on device\).*rerun with --resume"):
        with disk_full_as_error():
            raise OSError(errno.ENOSPC, "No space left on device", "/cache/x")
    with pytest.raises(DiskFull, match="no space left writing the cache"), disk_full_as_error():
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(PermissionError), disk_full_as_error():
        raise PermissionError(errno.EACCES, "Permission denied", "/cache/x")


def test_file_hash_streams_through_the_named_hash(tmp_path):
    data = bytes(range(256)) * 40_000  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert file_hash(tmp_path / "f", "sha256") == hashlib.sha256(data).hexdigest()
    assert file_hash(tmp_path / "f", "xxh3_128") == xxhash.xxh3_128(data).hexdigest()
    with pytest.raises(ValueError, match=r"checksum algorithm 'md5': expected one of \['sha256', 'xxh3_128'\]"):
        file_hash(tmp_path / "f", "md5")
