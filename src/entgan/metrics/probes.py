"""Cost probes used by the engine: resident memory and named wall-clock durations.

Edge workers are memory-bound, so the engine reports how much RAM training adds on top of the
idle runtime (interpreter + torch + data) and where wall time goes (compute vs waiting on
communication). These probes are deliberately cheap and dependency-light (psutil only).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import psutil

__all__ = ["PeakRSSMonitor", "Stopwatch", "current_rss_bytes", "high_water_mark_bytes", "reset_high_water_mark"]

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


_PROC_STATM = Path("/proc/self/statm")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process, in bytes.

    Read straight from /proc (one small file read) where there is one: the engine asks twice per
    round, and a fresh `psutil.Process` costs a millisecond of the server's critical path."""
    try:
        return int(_PROC_STATM.read_text().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return int(psutil.Process().memory_info().rss)


def high_water_mark_bytes() -> int | None:
    """The kernel's peak RSS of this process since its start or the last `reset_high_water_mark`
    (VmHWM in /proc/self/status), or None where there is none. Unlike sampling, it cannot miss a
    spike however short."""
    try:
        text = _PROC_STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            return int(value) * 1024 if unit.lower() == "kb" else int(value)
    return None


def reset_high_water_mark() -> bool:
    """Lower VmHWM to the current RSS (writing 5 to /proc/self/clear_refs, Linux 4.0+), so that
    it measures from now: after warm-up, or after work that is not to be counted. False where the
    kernel does not offer it (the mark then counts from the process's start)."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Hand memory the allocator holds but no object uses back to the OS (glibc `malloc_trim`).

    Without it, pages freed by earlier work (e.g. an evaluation) stay resident and are silently
    reused by later allocations, so RSS growth would under-count whatever runs next. A no-op where
    glibc is not the allocator."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSSMonitor:
    """This process's peak memory over a window, from `start()` to `stop()`, less `paused()` work.

    Two measures of the same window: RSS sampled on a daemon thread every `interval_s` (a peak
    over time; allocations shorter than the interval can be missed), and the kernel's high-water
    mark (VmHWM), reset at `start()` and after each paused stretch, read before each one: it
    cannot miss a spike. Both are also given as the increase over the baseline RSS at `start()`,
    which isolates what the measured work added.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline = 0
        self._peak = 0
        self._increase = 0
        self._paused = False
        self._hwm = 0
        self._hwm_increase = 0
        self._hwm_available = False

    def _sample(self) -> None:
        rss = current_rss_bytes()
        with self._lock:
            if not self._paused:
                self._peak = max(self._peak, rss)
                self._increase = max(self._increase, rss - self._baseline)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Do not count what happens inside (e.g. the evaluation harness, which is not the method).

        Memory the paused work leaves resident (the allocator keeps freed pages) raises the
        baseline by as much, so it is not charged to the monitored work either."""
        self._sample()
        self._read_high_water_mark()
        before = current_rss_bytes()
        with self._lock:
            self._paused = True
        try:
            yield
        finally:
            release_free_memory()
            left_behind = current_rss_bytes() - before
            with self._lock:
                self._paused = False
                self._baseline += max(0, left_behind)
            self._hwm_available = reset_high_water_mark()

    def _read_high_water_mark(self) -> None:
        mark = high_water_mark_bytes() if self._hwm_available and not self._paused else None
        if mark is not None:
            with self._lock:
                self._hwm = max(self._hwm, mark)
                self._hwm_increase = max(self._hwm_increase, mark - self._baseline)

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def start(self) -> PeakRSSMonitor:
        """Record the baseline and begin sampling. Restarting begins a fresh window."""
        if self._thread is not None:
            raise RuntimeError("PeakRSSMonitor is already running")
        self._stop_event.clear()
        release_free_memory()
        self._baseline = current_rss_bytes()
        with self._lock:
            self._peak = self._baseline
            self._increase = 0
            self._hwm = self._baseline
            self._hwm_increase = 0
        self._hwm_available = reset_high_water_mark()
        self._thread = threading.Thread(target=self._run, name="peak-rss-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, taking one last sample so work ending right before stop() counts."""
        if self._thread is None:
            return
        self._sample()
        self._read_high_water_mark()
        self._stop_event.set()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> PeakRSSMonitor:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def baseline_bytes(self) -> int:
        """RSS when `start()` was called (the idle runtime's footprint), plus what paused work left."""
        return self._baseline

    @property
    def peak_bytes(self) -> int:
        """Largest RSS sampled since `start()` (live while running)."""
        with self._lock:
            return self._peak

    @property
    def increase_bytes(self) -> int:
        """Largest RSS above the baseline seen while sampling: the memory the monitored work added
        (the baseline rises by whatever paused work leaves resident)."""
        with self._lock:
            return max(0, self._increase)

    @property
    def high_water_mark_bytes(self) -> int | None:
        """The kernel's peak RSS over the window so far (None where it cannot be reset)."""
        marks = self.high_water_marks()
        return None if marks is None else marks[0]

    @property
    def high_water_mark_increase_bytes(self) -> int | None:
        """`high_water_mark_bytes` above the baseline: what the monitored work added at its peak."""
        marks = self.high_water_marks()
        return None if marks is None else marks[1]

    def high_water_marks(self) -> tuple[int, int] | None:
        """(`high_water_mark_bytes`, `high_water_mark_increase_bytes`) from one reading of the
        kernel's mark (None where it cannot be reset)."""
        if not self._hwm_available:
            return None
        self._read_high_water_mark()
        with self._lock:
            return self._hwm, max(0, self._hwm_increase)


class Stopwatch:
    """Accumulates wall-clock time under names (e.g. "compute", "comm_wait").

    Thread-safe so that a communication thread and the training loop can share one instance.
    Uses `time.perf_counter` (monotonic, high resolution).
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Time the body of a `with` block and add it to `name` (also if the body raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        """Add an externally measured duration to `name`."""
        with self._lock:
            self._totals[name] = self._totals.get(name, 0.0) + seconds
            self._counts[name] = self._counts.get(name, 0) + 1

    def total(self, name: str) -> float:
        """Accumulated seconds for `name` (0.0 if never measured)."""
        with self._lock:
            return self._totals.get(name, 0.0)

    def count(self, name: str) -> int:
        """How many intervals were added to `name`."""
        with self._lock:
            return self._counts.get(name, 0)

    def as_dict(self) -> dict[str, float]:
        """Copy of all totals in seconds, by name."""
        with self._lock:
            return dict(self._totals)

    def reset(self) -> None:
        """Forget all totals and counts."""
        with self._lock:
            self._totals.clear()
            self._counts.clear()
