"""Chooses the attention backend for an engine from its `attention` setting."""

from __future__ import annotations

from batchllm.attention.backend import AttentionBackend
from batchllm.attention.prefix_shared import AutoAttention
from batchllm.kernels.cpu import CpuKernels


def make_backend(mode: str, kernels: CpuKernels | None = None, head_dim: int | None = None) -> AttentionBackend:
    """`reference` | `prefix-shared` | `auto` (prefix-shared in steps where sharing pays off);
    `kernels`: the CPU C kernels (None: PyTorch only), prefill included where they have a fast
    path for `head_dim` (None: always)."""
    fast = kernels is not None and (head_dim is None or kernels.fast_prefill(head_dim))
    return AutoAttention(mode, kernels, prefill_in_c=fast)  # type: ignore[arg-type]
