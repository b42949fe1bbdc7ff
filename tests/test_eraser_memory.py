"""The peak memory that erasure reports record belongs to the process itself, not to whoever started it."""

from __future__ import annotations

import subprocess
import sys

from llmeraser.eraser import peak_memory_mb

CHILD = "from llmeraser.eraser import peak_memory_mb; print(peak_memory_mb())"


def test_peak_memory_of_a_command_started_by_a_large_process_is_its_own():
    ballast = bytearray(400 * 2**20)  # 400 MiB, touched so that it is resident
    for offset in range(0, len(ballast), 4096):
        ballast[offset] = 1
    parent = peak_memory_mb()
    assert parent >= 400  # the parent's high-water mark includes the ballast (and whatever ran before)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=300)
    child = float(done.stdout.strip().splitlines()[-1])
    del ballast
    assert 0 < child < parent - 300, (child, parent)  # getrusage's ru_maxrss would report ≥ the parent's peak
