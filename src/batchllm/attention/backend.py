"""The attention backend interface."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from batchllm.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """Paged attention over the KV pool.

    `prepare` runs once per step (index tensors, bucketing); `forward` runs once per layer.
    Contract of `forward`: `q` is [num_tokens, num_heads, head_dim] in the step's flat layout;
    `k_cache`/`v_cache` are one layer's pool, [num_kv_heads, num_slots, head_dim], already
    holding this step's new KV; returns [num_tokens, num_heads, head_dim]. A query at position p
    of its sequence attends to that sequence's KV positions 0..p (causal).
    """

    name: str

    def prepare(self, meta: AttentionMetadata) -> Any: ...

    def forward(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: Any, scale: float
    ) -> torch.Tensor: ...
