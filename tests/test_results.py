"""Result records: the per-row memory peak can be reset, so rows run in one process do not inherit a peak."""
from __future__ import annotations

import mmap
import sys

import pytest
import torch

from lowbit.results import peak_memory_mb, reset_peak_memory


def _resident(mib: int) -> mmap.mmap:
    """``mib`` MiB of fresh anonymous pages, all touched. A private mmap, not a tensor: malloc may serve a tensor
    from heap memory freed by an earlier test that is still resident, so the RSS would not grow."""
    m = mmap.mmap(-1, mib * 2**20)
    torch.frombuffer(m, dtype=torch.uint8).fill_(1)
    return m


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is reset through /proc (Linux)")
def test_a_reset_peak_forgets_an_earlier_larger_allocation():
    x = _resident(256)
    big = peak_memory_mb()
    x.close()  # munmap: the pages leave the resident set
    assert reset_peak_memory()
    after = peak_memory_mb()
    assert after < big - 200, (big, after)  # the 256 MiB block is no longer in the peak
    y = _resident(128)  # the new peak sees it
    assert peak_memory_mb() > after + 100
    y.close()
