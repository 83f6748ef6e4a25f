"""Clocks for timing model work on the CPU or a CUDA GPU, and named running totals of intervals.

On a GPU, kernels run asynchronously: a wall clock read inside a forward hook measures when work was
queued, not when it ran. `CudaClock` marks intervals with CUDA events instead and resolves them only
when totals are read, so timing does not serialise the GPU. The CPU clock is `time.perf_counter`.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

# Unresolved CUDA intervals kept before they are folded into totals (bounds memory in long loops).
MAX_PENDING_INTERVALS = 4096
MIB = 2**20


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist on this machine (e.g. --device cuda without a GPU)."""


class WallClock:
    """Intervals from `time.perf_counter`; peak memory is the process's peak resident set."""

    device = "cpu"

    def mark(self):
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return end - start

    def synchronize(self) -> None:
        """Wait for queued work (nothing to wait for on the CPU)."""

    def reset_peak_memory(self) -> None:
        """The resident-set peak of a process cannot be reset: compare against `peak_memory_mib()` read earlier."""

    def peak_memory_mib(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class CudaClock(WallClock):
    """Intervals between CUDA events; peak memory is `torch.cuda.max_memory_allocated`."""

    device = "cuda"

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats()

    def peak_memory_mib(self) -> float:
        return torch.cuda.max_memory_allocated() / MIB


def clock_for(device: str) -> WallClock:
    """The clock that times work on `device` ("cpu", "cuda" or "cuda:N"); a missing GPU is `DeviceUnavailable`."""
    if device == "cpu":
        return WallClock()
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {device!r} requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})"
            )
        return CudaClock()
    raise ValueError(f"device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


class Timings:
    """Named running totals of intervals measured with one clock."""

    def __init__(self, clock: WallClock | None = None):
        self.clock = clock or WallClock()
        self._totals: dict[str, float] = defaultdict(float)
        self._pending: list[tuple[str, object, object]] = []

    @contextmanager
    def measure(self, name: str):
        start = self.clock.mark()
        yield
        self.add(name, start, self.clock.mark())

    def add(self, name: str, start, end) -> None:
        self._pending.append((name, start, end))
        if len(self._pending) >= MAX_PENDING_INTERVALS:
            self._resolve()

    def _resolve(self) -> None:
        for name, start, end in self._pending:
            self._totals[name] += self.clock.seconds(start, end)
        self._pending.clear()

    def totals(self) -> dict[str, float]:
        """Seconds per name so far (waits for a GPU's queued intervals)."""
        self._resolve()
        return dict(self._totals)

    def total(self) -> float:
        return sum(self.totals().values())

    def clear(self) -> None:
        self._totals.clear()
        self._pending.clear()


class Stopwatch:
    """Seconds spent inside one module's forward per call (hooks, so whatever runs inside it counts)."""

    def __init__(self, module: nn.Module, clock: WallClock):
        self.clock = clock
        self._start = None
        self._intervals: list[tuple[object, object]] = []
        self._hooks = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]

    def _begin(self, *_):
        self._start = self.clock.mark()

    def _end(self, *_):
        self._intervals.append((self._start, self.clock.mark()))

    def calls(self) -> list[float]:
        """Seconds of each call since the last `clear()`, in order."""
        return [self.clock.seconds(start, end) for start, end in self._intervals]

    @property
    def seconds(self) -> float:
        return sum(self.calls())

    def clear(self) -> None:
        self._intervals.clear()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
