"""roundtrip keeps freed memory for its next buffer (inspect_tools.freed_memory) instead of faulting fresh pages in
for every tensor."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

# In a fresh process: the minor page faults of a second 64 MiB buffer, written once, after a first one was freed.
SECOND_BUFFER_FAULTS = """
import resource, sys
import torch
from inspect_tools.freed_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def faults_of_a_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20, dtype=torch.float32).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_a_buffer()
print(faults_of_a_buffer())
"""


def second_buffer_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SECOND_BUFFER_FAULTS, mode], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_a_freed_buffer_is_reused_instead_of_faulted_in_again() -> None:
    fresh, kept = second_buffer_faults("plain"), second_buffer_faults("keep")
    assert fresh >= (64 << 20) // 4096 // 2  # without it: every page of the new buffer faults in again
    assert kept < fresh // 10
