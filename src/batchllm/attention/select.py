"""Chooses the attention backend for an engine from its `attention` setting."""

from __future__ import annotations

from batchllm.attention.backend import AttentionBackend
from batchllm.attention.prefix_shared import AutoAttention


def make_backend(mode: str) -> AttentionBackend:
    """`reference` | `prefix-shared` | `auto` (prefix-shared in steps where sharing pays off)."""
    return AutoAttention(mode)  # type: ignore[arg-type]
