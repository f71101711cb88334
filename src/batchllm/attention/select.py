"""Chooses the attention backend for an engine from its `attention` setting."""

from __future__ import annotations

from batchllm.attention.backend import AttentionBackend
from batchllm.attention.prefix_shared import AutoAttention
from batchllm.kernels.cpu import CpuKernels


def make_backend(mode: str, kernels: CpuKernels | None = None) -> AttentionBackend:
    """`reference` | `prefix-shared` | `auto` (prefix-shared in steps where sharing pays off);
    `kernels`: the CPU C kernels (None: PyTorch only)."""
    return AutoAttention(mode, kernels)  # type: ignore[arg-type]
