"""The shared timing harness: interleaved rounds, medians and quartiles, per-round ratios, memory."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["summarize", "paired_ratios", "interleaved", "Timings", "median_us", "peak_bytes", "machine", "sync"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float], scale: float = 1e3) -> dict[str, float]:
    """Median, quartiles and IQR of ``values`` (seconds) in ms (``scale=1e3``) or µs (``1e6``)."""
    xs = sorted(x * scale for x in values)
    q1, q3 = (xs[0], xs[0]) if len(xs) == 1 else statistics.quantiles(xs, n=4, method="inclusive")[::2]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(xs)}


def paired_ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Quartiles of ``a[i] / b[i]``: calls of the same interleaved round, so shared drift cancels."""
    return summarize([x / y for x, y in zip(a, b, strict=True)], scale=1.0)


@dataclass
class Timings:
    """Seconds per call on both clocks; ``primary`` is the one ratios use."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    clock: str = "wall"

    @property
    def primary(self) -> list[float]:
        return self.cpu if self.clock == "cpu" else self.wall


def default_clock(device: torch.device) -> str:
    """This thread's CPU time on a 1-thread CPU run (the machine is shared: wall time counts time
    spent descheduled), wall time with device syncs on a GPU."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def interleaved(runners: dict[str, Callable[[int], Any]], warmup: int, reps: int, device: torch.device,
                clock: Optional[str] = None) -> dict[str, Timings]:
    """Time each runner's calls round-robin, the start rotating (round ``i`` starts at runner ``i``)."""
    clock = clock or default_clock(device)
    names = list(runners)
    for i in range(warmup):
        for name in names:
            runners[name](i)
    times = {name: Timings(clock=clock) for name in names}
    gc.collect()
    gc.disable()
    try:
        for i in range(reps):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                sync(device)
                cpu, wall = time.thread_time(), time.perf_counter()
                runners[name](i)
                sync(device)
                times[name].wall.append(time.perf_counter() - wall)
                times[name].cpu.append(time.thread_time() - cpu)
    finally:
        gc.enable()
    return times


def median_us(fn: Callable[[], Any], n: int, clock: str = "cpu") -> float:
    """Median microseconds of ``n`` calls of ``fn`` (after one warm-up call)."""
    read = time.thread_time if clock == "cpu" else time.perf_counter
    fn()
    xs = []
    for _ in range(n):
        t0 = read()
        fn()
        xs.append(read() - t0)
    return statistics.median(xs) * 1e6


@contextlib.contextmanager
def _quiet_stderr():
    """Silence kineto's C++ 'profiler_start/stop' lines (written to fd 2, not via Python)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak bytes ``fn`` allocates on top of what was allocated before it.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the torch profiler's
    allocator events, summed in time order (RSS keeps freed pages; tracemalloc misses torch).
    """
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except AttributeError:  # a torch without these profiler internals
        return None
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from."""
    import diffusers
    import peft

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "peft": peft.__version__, "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "threads": torch.get_num_threads(), "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import tlora_diffusers

        info["tlora_diffusers"] = tlora_diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info
