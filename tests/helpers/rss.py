"""Resident memory of a process, sampled while a test runs.

``getrusage().ru_maxrss`` is no use for this: it is a lifetime peak (so growth within a test hides
under an earlier, larger peak of the pytest process) and Linux carries it into children through
fork and exec. Sampling ``VmRSS`` gives the peak of the interval itself.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size of ``pid`` (default: this process)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssSampler:
    """``with RssSampler() as rss: ...`` then ``rss.growth``: peak RSS over the block minus RSS at its start."""

    def __init__(self, pid: int | str = "self", interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start
