"""Measuring training steps: the shared code of ``benchmarks/bench_training.py`` and of
``fastdiff train --compare``.

- ``interleaved_step_times(steps, reps)``: seconds per call of each provider's step closure,
  providers interleaved within each repetition (order rotated by one per repetition) so that
  load drift on a shared machine hits every provider alike (garbage collection off while timed).
- ``peak_step_memory(step)``: peak memory of one call of ``step``; CUDA: the allocator's peak
  (``torch.cuda.max_memory_allocated``, reset before); CPU: the peak RSS growth over the RSS
  just before the call, sampled from a thread every 0.2 ms.
- ``allocator_setting()``: how the host allocator is set up, printed beside CPU step times: with
  glibc's default thresholds each step maps its largest tensors afresh and page-faults them in,
  which made the eager small UNet's step ~1.3x slower here than with freed memory kept.
- ``run_isolated(module, args)``: runs ``python -m module *args`` in a fresh interpreter with
  ``ISOLATED_ENV`` and returns its last stdout line parsed as JSON. RSS is per process and
  glibc keeps freed memory, so peak RSS is only comparable measured one provider per process.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from typing import Callable

import torch

__all__ = ["ISOLATED_ENV", "allocator_setting", "interleaved_step_times", "peak_step_memory", "rss_bytes",
           "run_isolated"]

# glibc: blocks over 64 KB get their own mapping (freed tensors leave the RSS at once) and the
# heap is never trimmed (no trim calls inside the measured step).
ISOLATED_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
_SAMPLE_SECONDS = 0.0002
_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def allocator_setting() -> str:
    """The host allocator setup that changes CPU step times: a preloaded allocator (jemalloc,
    tcmalloc, ...) or glibc malloc's thresholds from the environment."""
    preload = [p for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split() if "malloc" in p]
    if preload:
        return "LD_PRELOAD=" + ":".join(preload)
    tuned = [f"{k}={os.environ[k]}" for k in _MALLOC_VARS if k in os.environ]
    return "glibc " + (" ".join(tuned) if tuned else "default")


def interleaved_step_times(steps: dict[str, Callable[[], None]], reps: int, warmup: int = 2,
                           sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each closure in ``steps`` (name -> step()), ``reps`` values each.

    ``warmup`` untimed calls of every provider come first (torch.compile compiles there, the
    allocator and oneDNN caches fill). ``sync`` (e.g. ``torch.cuda.synchronize``) is called
    before and after each timed call so asynchronous devices are timed to completion.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    if sync is not None:
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    # a cyclic-garbage collection inside one provider's call would be charged to it alone
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                if sync is not None:
                    sync()
                start = time.perf_counter()
                steps[name]()
                if sync is not None:
                    sync()
                times[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak_growth(step: Callable[[], None]) -> int:
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(_SAMPLE_SECONDS)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        step()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss_bytes()) - base


def peak_step_memory(step: Callable[[], None], device: torch.device | str = "cpu") -> int:
    """Peak memory (bytes) of one call of ``step`` (run it once before, so that one-time
    allocations such as optimizer state and compiled code are not counted).

    CUDA: ``torch.cuda.max_memory_allocated`` during the call (reset before), i.e. the tensors
    alive at the peak including those alive before the call. CPU: the peak RSS growth during
    the call over the RSS before it (memory alive before the call is not counted); compare
    providers measured in separate processes (``run_isolated``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _rss_peak_growth(step)


def run_isolated(module: str, args: list[str], timeout: float | None = None) -> dict:
    """Runs ``python -m module *args`` in a fresh interpreter (this one's executable, its
    environment plus ``ISOLATED_ENV``) and returns the JSON object its last stdout line holds."""
    env = dict(os.environ, **ISOLATED_ENV)
    res = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    lines = res.stdout.strip().splitlines()
    if res.returncode or not lines:
        raise RuntimeError(f"python -m {module} {' '.join(args)} failed (exit {res.returncode}):\n"
                           f"{res.stderr[-2000:]}")
    return json.loads(lines[-1])
