"""Peak resident memory of this process over a ``with`` block (shared by the benchmarks)."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """Samples the process's resident memory every ``interval_s`` in a thread.

    After the block: ``base`` (RSS on entry, bytes) and ``peak`` (highest RSS seen, bytes).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s

    def __enter__(self):
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
