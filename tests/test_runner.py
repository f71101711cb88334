"""The KV pool's memory: zero-filled, and on the CPU resident only where blocks are used."""

from __future__ import annotations

import sys

import pytest
import torch

from batchllm.executor.runner import zeroed_pool


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_large_cpu_pool_costs_memory_only_where_written() -> None:
    before = _resident_bytes()
    pool = zeroed_pool((4, 2, 2, 2**20, 64), torch.bfloat16, torch.device("cpu"))  # 2 GiB
    assert pool.shape == (4, 2, 2, 2**20, 64) and pool.dtype == torch.bfloat16 and pool.is_contiguous()
    assert _resident_bytes() - before < 64 * 2**20
    pool[0, 0, 0, :4096] = 1.5  # one layer's first 4,096 slots of one head: 512 KiB
    assert _resident_bytes() - before < 64 * 2**20
    assert pool[0, 0, 0, :4096].eq(1.5).all() and pool[1:].count_nonzero() == 0
    assert pool[0, 0, 0, 4096:8192].count_nonzero() == 0


def test_pool_is_zero_on_any_device_path() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        pool = zeroed_pool((2, 3, 5), dtype, torch.device("cpu"))
        assert pool.dtype == dtype and pool.count_nonzero() == 0
        pool += 1
        assert pool.sum().item() == 30
