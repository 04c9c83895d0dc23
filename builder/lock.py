"""One build per cache: an exclusive `flock` on `.eagle3_build/lock`, whose content names the holder
(rank 0), and a shared one on `.eagle3_build/writers.lock` that every process of the build holds
while it writes. A build takes the first and then checks that nobody holds the second: the other
ranks of a build whose rank 0 stopped (a launcher that does not stop them) may still be writing.

The kernel drops the locks when their holder dies (even by SIGKILL), so a dead build's lock is
taken over with no staleness guesswork and no race between two processes taking it over.
The files are never deleted: unlinking a locked file lets a second process lock a new inode.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import ConfigError, Eagle3CacheError
from .files import is_disk_full

LOCK_FILE = ".eagle3_build/lock"
WRITERS_FILE = ".eagle3_build/writers.lock"
LOCK_FILE_MODE = 0o666  # less the umask, as every file of a cache: in a group-shared folder the group can resume the build


class CacheLocked(Eagle3CacheError):
    pass


def holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


class CacheLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self._holder()
            raise CacheLocked(
                f"--output-dir: {self.path.parent.parent} is being written by pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} (since {holder.get('since', '?')}); expected no other build on it. "
                "Wait for that build to finish or stop it (its lock goes with it), then rerun with --resume."
            ) from None
        except OSError as err:  # ENOLCK, ENOSYS, EOPNOTSUPP: the file system keeps no locks
            os.close(fd)
            raise ConfigError(
                "--output-dir",
                str(self.path.parent.parent),
                "a directory whose file system supports file locks (flock), which keep a second build off this cache",
                f"Locking {self.path} failed ({err.strerror or err}). Choose a directory on a local disk, or on a "
                "network file system with locking enabled.",
            ) from err
        self._fd = fd  # held from here: `release` unlocks and closes it even if naming the holder fails
        try:
            check_no_writers(self.path.parent.parent)
        except BaseException:
            self.release()
            raise
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder_info()).encode())
        os.fsync(fd)

    def _open(self) -> int:
        """The lock file, created with its folder; a folder that cannot be created is the user's to change."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_CREAT | os.O_RDWR, LOCK_FILE_MODE)
        except OSError as err:
            if is_disk_full(err):
                raise  # the caller reports a full disk as such
            raise ConfigError(
                "--output-dir",
                str(self.path.parent.parent),
                "a directory this build can create and write to",
                f"Creating {err.filename or self.path} failed ({err.strerror or err}). Choose a writable --output-dir.",
            ) from err

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_no_writers(output_dir: Path) -> None:
    """No process of another build holds the writers' lock: taken exclusively for a moment, under
    the cache lock (which keeps every new build out meanwhile), then let go."""
    path = Path(output_dir) / WRITERS_FILE
    fd = os.open(path, os.O_CREAT | os.O_RDWR, LOCK_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CacheLocked(
            f"--output-dir: {output_dir} is still being written by processes of another build (its other ranks: the "
            "build's first process stopped, but they did not); expected no other build on it. Stop them (their locks "
            f"go with them; `fuser {path}` lists them on each node), then rerun with --resume."
        ) from None
    finally:
        os.close(fd)  # closing lets go of the lock


class WriterHold:
    """The writers' lock in shared mode, held by every process of a build while it writes."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / WRITERS_FILE
        self._fd: int | None = None

    def hold(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, LOCK_FILE_MODE)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a starting build checks, under the cache lock
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
