"""The executor interface: what runs an attention plan, layer by layer."""

from __future__ import annotations

from enum import Enum
from typing import Protocol, TypeVar

import torch

from batchllm.attention.plan import AttentionPlan


class ExecutorKind(Enum):
    """Which executor an engine runs (`select.make_executor`); `select.AUTO_SHARE` says what each
    shares under mode "auto"."""

    TORCH = "torch"  # PyTorch alone: any device and dtype; the reference for every other kind
    CPU_KERNELS = "cpu-kernels"  # the C kernels (kernels/) for decode queries and prefill chunks
    CPU_DECODE_KERNELS = "cpu-decode-kernels"  # C for decode queries, PyTorch for prefill chunks
    TRITON = "triton"  # the Triton kernels (kernels/triton/) for the whole plan, on CUDA


Prepared = TypeVar("Prepared")


class Executor(Protocol[Prepared]):
    """Runs attention plans over one paged KV pool.

    `prepare` runs once per step: it turns the plan into the index tensors this executor reads
    (its `Prepared` type). `run` runs once per layer: `q` is [num_tokens, num_heads, head_dim] in
    the step's flat layout; `k_cache`/`v_cache` are one layer's pool, [num_kv_heads, num_slots,
    head_dim], already holding this step's new KV; it returns [num_tokens, num_heads, head_dim] in
    q's dtype, each row the attention the plan describes for it, a windowed plan's lower key
    bounds included (an executor without them raises in `prepare`, and `select.make_executor`
    does not pick it for models with windows).

    A new executor (a GPU one, say) implements these two methods, gets an `ExecutorKind` and an
    `AUTO_SHARE` entry, and is picked in `select.make_executor`; the tests compare it with
    `TorchExecutor` on the same plans.
    """

    kind: ExecutorKind

    def prepare(self, plan: AttentionPlan) -> Prepared: ...

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prepared: Prepared,
            scale: float) -> torch.Tensor: ...
