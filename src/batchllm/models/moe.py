"""Mixture-of-experts MLP (Mixtral, Qwen3-MoE): softmax top-k routing, experts run per group.

Routing: a linear router gives each token one logit per expert; softmax in float32, the top k
experts, their probabilities renormalised to sum to 1 when `norm_topk` (Mixtral always,
Qwen3-MoE when `norm_topk_prob`). The step's (token, expert) pairs are sorted by expert, so
each expert's tokens are one contiguous slice: one gate_up matmul, SiLU(gate) * up and one down
matmul per expert that got tokens (a loop over experts, never over tokens). The weighted
outputs are summed into each token's row with `index_add_` in expert order, the order
transformers adds them in, so fp32 results are equal, not just close.

Weights as transformers holds them: `gate.weight` [E, H], `experts.gate_up_proj` [E, 2I, H]
(gate rows first), `experts.down_proj` [E, H, I]. The loader also reads the per-expert
checkpoints on the Hub (Mixtral's w1/w3/w2, Qwen3-MoE's gate/up/down_proj per expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.kernels.cpu import CpuKernels
from batchllm.models.config import ModelConfig
from batchllm.models.linear import linear


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class SparseMoE(nn.Module):
    """The router (`gate`) and the experts of one layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk = cfg.norm_topk_prob
        # Qwen3-MoE casts the routing weights to the model dtype before weighting; Mixtral weights
        # in float32 and casts the product (the same thing in fp32, not in bf16)
        self.weights_in_model_dtype = cfg.architecture != "MixtralForCausalLM"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids [n, k], weights [n, k]) of each token."""
        probs = torch.softmax(linear(x, self.gate.weight).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype) if self.weights_in_model_dtype else weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = x.shape[0], self.top_k
        experts, weights = self.route(x)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, token order within
        tokens = order // k
        counts = torch.bincount(flat, minlength=self.experts.gate_up_proj.shape[0]).tolist()
        xs = x[tokens]
        outs = torch.empty_like(xs)
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            gate, up = F.linear(xs[start:start + c], gate_up[e]).chunk(2, dim=-1)
            outs[start:start + c] = F.linear(F.silu(gate) * up, down[e])
            start += c
        weighted = (outs * weights.reshape(-1)[order, None]).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, weighted)


def attention_output_and_moe(h: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor, ln_w: torch.Tensor,
                             eps: float, moe: SparseMoE, kernels: CpuKernels | None = None) -> torch.Tensor:
    """h + o_proj(attn), then the post-attention norm and the MoE residual (llama.py's
    `attention_output_and_mlp` with the experts in place of the dense MLP)."""
    from batchllm.models.llama import rms_norm

    if kernels is not None:
        normed = kernels.rms_norm(h, ln_w, eps, residual=linear(attn, o_w))
        return h + moe(normed)
    h = h + linear(attn, o_w)
    return h + moe(rms_norm(h, ln_w, eps))
