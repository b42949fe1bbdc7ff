"""Wall time and peak memory of a block, a progress log with elapsed times, the machine description of every result."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch


@contextmanager
def measured(record: dict[str, Any], key: str, interval_s: float = 0.02) -> Iterator[None]:
    """Store ``{"seconds", "peak_rss_mib"}`` of the block under ``record[key]``: wall time in seconds and
    the process's peak resident memory in MiB, sampled every ``interval_s`` seconds while the block runs."""
    process = psutil.Process()
    peak = [process.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(interval_s):
            peak[0] = max(peak[0], process.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
        record[key] = {"seconds": seconds, "peak_rss_mib": max(peak[0], process.memory_info().rss) / 2**20}


def machine() -> dict[str, Any]:
    """The machine and library versions a result was measured with."""
    from llmeraser.eraser import library_versions

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # other work on the machine slows a run (2 cores: a benchmark beside the test suite runs 2–3× slower)
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        **library_versions(),
    }


def elapsed_log(write: Callable[[str], None] = print) -> Callable[[str], None]:
    """A progress log whose lines start with the wall time since it was made, ``[h:mm:ss]``: what a reader
    sizing a run (or an interrupted one) needs to see which stage took how long."""
    start = time.perf_counter()

    def log(line: str) -> None:
        seconds = int(time.perf_counter() - start)
        write(f"[{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}] {line}")

    return log
