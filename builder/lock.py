"""One writer per cache: a lock file naming its holder, taken over when the holder is dead.

`O_CREAT | O_EXCL` creation is atomic on local filesystems and NFSv3+; a holder on the
same host is checked by pid and process start time (pids are reused), a holder on another
host cannot be checked, so it is reported and left to the user.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import Eagle3CacheError

LOCK_FILE = ".eagle3_build/lock"


class CacheLocked(Eagle3CacheError):
    pass


def _start_time(pid: int) -> str | None:
    """Process start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start_time": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot tell from here: assume it is working
    return _start_time(holder["pid"]) == holder.get("start_time") is not None


class CacheLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise CacheLocked(
                        f"--output-dir: {self.path.parent.parent} is being written by pid {holder['pid']} on "
                        f"{holder['host']} (since {holder.get('since')}); expected no other build on it. Wait for that "
                        f"build, or, if it is gone, delete {self.path}."
                    ) from None
                self.path.unlink(missing_ok=True)  # a dead holder's lock: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            return
        raise CacheLocked(f"--output-dir: could not take {self.path}; another build is starting on it")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except OSError:
            return None
        except ValueError:  # empty: being written right now, or left half-written by a killed process
            recent = time.time() - self.path.stat().st_mtime < 10
            return {"pid": "?", "host": "?", "since": "just now"} if recent else None

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
