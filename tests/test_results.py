"""Result records: the per-row memory peak can be reset, so rows run in one process do not inherit a peak."""
from __future__ import annotations

import sys

import pytest
import torch

from lowbit.results import peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is reset through /proc (Linux)")
def test_a_reset_peak_forgets_an_earlier_larger_allocation():
    x = torch.ones(64 * 2**20)  # 256 MiB, touched
    big = peak_memory_mb()
    del x
    assert reset_peak_memory()
    after = peak_memory_mb()
    assert after < big - 200, (big, after)  # the 256 MiB block is no longer in the peak
    y = torch.ones(32 * 2**20)  # 128 MiB: the new peak sees it
    assert peak_memory_mb() > after + 100
    del y
