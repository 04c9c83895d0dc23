"""Named fault points for crash tests: the process signals itself at a named point instead of at a
moment a test guesses from the clock."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "EAGLE3_CACHE_FAULT"  # test hook naming a point at which the process signals itself (see FaultPoints)


class FaultPoints:
    """`EAGLE3_CACHE_FAULT=NAME:N` SIGKILLs the process, as a power cut would, the N-th time it reaches
    the point NAME; `NAME:N:SIGTERM` sends it that signal instead (a scheduler's time limit, `docker
    stop`). The build's points: `after_shard` (this run's shard published: renamed, with its record)
    and `after_batch` (a forward batch handed to the writer); the export's: `export_file` (a file of
    the export written in its hidden folder) and `export_complete` (OUT holds the complete export:
    its marker file moved up, or its folder renamed to OUT)."""

    def __init__(self):
        self.spec = os.environ.get(FAULT_ENV)
        self.counts: dict[str, int] = {}  # one key per thread: after_batch (forward), after_shard (writer)

    def reached(self, name: str) -> None:
        if self.spec is None:
            return
        self.counts[name] = self.counts.get(name, 0) + 1
        point, count, *sent = self.spec.split(":")
        if (point, count) == (name, str(self.counts[name])):
            os.kill(os.getpid(), getattr(signal, sent[0]) if sent else signal.SIGKILL)
