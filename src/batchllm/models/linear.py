"""Linear layers with weights packed once at load for oneDNN (CPU, bfloat16).

`F.linear` on a bf16 CPU weight lets oneDNN reorder the weight into its blocked layout on every
call; packing it once at load skips that. The results are bit-identical (tested), so this is a
layout choice, not an approximation. float32 weights are left alone: there the packed path
rounds differently, and fp32 runs must match transformers token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# NOTE: the batch size oneDNN picks the packed layout for. Measured on the dev CPU (bf16, 2
# threads, GFLOP/s for M = 16 / 64 / 250 / 1864 rows), gate_up 512 x 2816: F.linear 267 391 438
# 424, packed with hint 64 377 436 444 439, hint 2048 379 440 452 440; lm_head 512 x 32000:
# 182 318 402 407 -> 317 388 427 442. Hint 0 (no hint) gains nothing.
PACK_BATCH_HINT = 256


def can_pack(weight: torch.Tensor) -> bool:
    """True for weights `pack` takes: bf16 on the CPU, with oneDNN's packing ops present."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] in oneDNN's layout (an mkldnn tensor), for `linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for a plain or a packed (`pack`) weight."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
