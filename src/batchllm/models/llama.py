"""Llama / Mistral / Qwen2 / Qwen3 / Phi3 / Gemma 2 / Gemma 3 decoder (and Mixtral / Qwen3-MoE,
whose MLPs are experts: models/moe.py) over a flat token batch and a paged KV pool.

The architectures differ only in a few switches of `ModelConfig` (q/k/v bias, q/k RMSNorm,
rope scaling, partial rotary, experts, sliding windows per layer, Gemma's norms, scaled
embeddings, gelu-tanh MLP and soft-capping). q/k/v and gate/up projections are fused into one
matmul each.

A layer is two pure functions around attention, `attention_inputs` (norm, q/k/v, rope) and
`attention_output_and_mlp` (output projection, residuals, norm, MLP), over plain tensors.
NOTE: `torch.compile` of these two functions (dynamic token counts) was measured end to end on
the dev CPU: 1.3x on one layer at 2,048 tokens, but no gain on a whole batch, so eager it is.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from batchllm.attention.metadata import AttentionMetadata
from batchllm.attention.select import Attention, PreparedStep
from batchllm.kernels.cpu import CpuKernels
from batchllm.models.config import ModelConfig
from batchllm.models.linear import can_pack, linear, pack
from batchllm.models.moe import SparseMoE, attention_output_and_moe


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm. Llama-style: normalise in float32, cast back, then times the weight; Gemma-style
    (`unit_offset`): times (1 + weight) in float32, then cast back (as transformers does each)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, d] by the angles of its tokens: cos [tokens, 1, r] and `sin` with
    its first half negated (`Rotary.tables`), so the rotated half needs no separate negation.
    With r < d (partial rotary) only the first r dims rotate; the rest pass through."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat([rotate(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = r // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin


def attention_inputs(h: torch.Tensor, ln_w: torch.Tensor, eps: float, qkv_w: torch.Tensor,
                     qkv_b: torch.Tensor | None, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                     cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int, head_dim: int,
                     kernels: CpuKernels | None = None,
                     unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm, fused q/k/v projection, optional q/k norm and rope: q [n, heads, d], k/v [n, kvh, d].
    With `kernels` the input norm is one C pass (`CpuKernels.rms_norm`, Llama-style only);
    `unit_offset`: Gemma-style norms."""
    n = h.shape[0]
    normed = rms_norm(h, ln_w, eps, unit_offset) if kernels is None else kernels.rms_norm(h, ln_w, eps)
    qkv = linear(normed, qkv_w, qkv_b)
    # NOTE: q and k are adjacent in the fused projection: one rope pass rotates both (2x faster
    # than two); q and k come back as views of that one tensor.
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(n, heads + kv_heads, head_dim)
    if q_norm_w is not None and k_norm_w is not None:
        qk = torch.cat([rms_norm(qk[:, :heads], q_norm_w, eps, unit_offset),
                        rms_norm(qk[:, heads:], k_norm_w, eps, unit_offset)], dim=1)
    qk = rotate(qk, cos, sin)
    return qk[:, :heads], qk[:, heads:], qkv[:, (heads + kv_heads) * head_dim:].reshape(n, kv_heads, head_dim)


def attention_output_and_mlp(h: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor, ln_w: torch.Tensor,
                             eps: float, gate_up_w: torch.Tensor, down_w: torch.Tensor,
                             kernels: CpuKernels | None = None) -> torch.Tensor:
    """The rest of a layer: h + o_proj(attn), then the post-attention norm and the gated MLP residual.
    With `kernels` the residual add + norm and SiLU(gate) * up are one C pass each (h, a fresh
    tensor of the step, takes the residual in place)."""
    if kernels is not None:
        normed = kernels.rms_norm(h, ln_w, eps, residual=linear(attn, o_w))
        return h + linear(kernels.silu_mul(linear(normed, gate_up_w)), down_w)
    h = h + linear(attn, o_w)
    gate, up = linear(rms_norm(h, ln_w, eps), gate_up_w).chunk(2, dim=-1)
    return h + linear(F.silu(gate).mul_(up), down_w)


def gemma_attention_output_and_mlp(h: torch.Tensor, attn: torch.Tensor, o_w: torch.Tensor, post_attn_w: torch.Tensor,
                                   pre_ff_w: torch.Tensor, post_ff_w: torch.Tensor, eps: float,
                                   gate_up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """The rest of a Gemma 2/3 layer: the attention output and the gelu-tanh MLP are each normed
    before they join the residual, and the MLP's input is normed too (all Gemma-style norms)."""
    h = h + rms_norm(linear(attn, o_w), post_attn_w, eps, True)
    gate, up = linear(rms_norm(h, pre_ff_w, eps, True), gate_up_w).chunk(2, dim=-1)
    return h + rms_norm(linear(F.gelu(gate, approximate="tanh").mul_(up), down_w), post_ff_w, eps, True)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (None: x unchanged)."""
    return x if cap is None else torch.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)


class Rotary(nn.Module):
    """cos/sin tables for every position up to `max_positions`, indexed per token.

    A position's angles depend on the position alone (never on the sequence or the step), so a
    shared prefix's keys are the same for every member of its group. longrope: positions below
    `original_max_position_embeddings` rotate by the short factors, later ones by the long
    factors (see "Long-context rope" in models/config.py). yarn and longrope scale cos and sin by their
    attention factor, as transformers does."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        inv, long_inv, switch, scaling = cfg.rope_parameters()
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(pos, inv)
        if long_inv is not None:
            freqs = torch.where(pos[:, None] < switch, freqs, torch.outer(pos, long_inv))
        emb = torch.cat([freqs, freqs], dim=-1)
        half = emb.shape[-1] // 2
        cos, sin = emb.cos(), emb.sin()
        if scaling != 1.0:
            cos, sin = cos * scaling, sin * scaling
        self.register_buffer("cos", cos, persistent=False)
        # NOTE: sin with its first half negated, the sign `rotate` needs (exact: -a*b == a*-b).
        self.register_buffer("sin", torch.cat([-sin[:, :half], sin[:, half:]], dim=-1), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and (half-negated) sin of the step's positions, [tokens, 1, d], once per step."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


class Attention(nn.Module):
    """The attention block's weights (the computation is in the layer functions above)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps, cfg.gemma) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps, cfg.gemma) if cfg.qk_norm else None
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.d ** -0.5


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.mlp: MLP | SparseMoE = SparseMoE(cfg) if cfg.is_sparse(index) else MLP(cfg)
        if cfg.gemma:  # the MLP's input and output norms
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, True)


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and LM head. `kv_cache` is [layers, 2, kvh, slots, d]."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg, max_positions)
        # Gemma 3's sliding layers rotate by their own (default) rope base
        self.local_rotary = Rotary(local_rope_config(cfg), max_positions) if cfg.local_rope_theta is not None else None
        self.windows = cfg.layer_windows or (None,) * cfg.num_layers
        self.kernels: CpuKernels | None = None  # set by the engine: the C norm and activation passes

    def pack_linear_weights(self) -> int:
        """Replace the projection and LM head weights by their oneDNN-packed form where `can_pack`
        (CPU bf16; see models/linear.py); returns how many were packed. The embedding keeps its
        own weight (a tied LM head gets a packed copy)."""
        mods = [self.lm_head] + [m for layer in self.layers for m in (
            (layer.self_attn.qkv_proj, layer.self_attn.o_proj) + ((layer.mlp.gate_up_proj, layer.mlp.down_proj)
                                                                   if isinstance(layer.mlp, MLP) else ()))]
        packed = 0
        for m in mods:
            if can_pack(m.weight):
                m.weight = nn.Parameter(pack(m.weight.detach()), requires_grad=False)
                packed += 1
        return packed

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend: Attention, prepared: PreparedStep,
                logits_rows: torch.Tensor) -> torch.Tensor:
        """Run the flat batch; return the logits of the rows in `logits_rows` only, in the model's
        dtype (the sampler widens what it needs: a float32 copy of every row cost more than the
        greedy argmax itself)."""
        cfg, n = self.cfg, input_ids.shape[0]
        h = self.embed_tokens(input_ids)
        # NOTE: Gemma norms run in PyTorch: the C norm is Llama-style.
        kernels = None if cfg.gemma else self.kernels
        if cfg.gemma:  # the scale rounded to the model dtype first, as transformers does
            h = h * torch.tensor(cfg.hidden_size ** 0.5, dtype=torch.float32).to(h.dtype)
        cos, sin = self.rotary.tables(positions, h.dtype)
        local = self.local_rotary.tables(positions, h.dtype) if self.local_rotary is not None else (cos, sin)
        for i, layer in enumerate(self.layers):
            at, window = layer.self_attn, self.windows[i]
            lcos, lsin = (cos, sin) if window is None else local
            q, k, v = attention_inputs(
                h, layer.input_layernorm.weight, cfg.rms_norm_eps, at.qkv_proj.weight, at.qkv_proj.bias,
                at.q_norm.weight if at.q_norm is not None else None,
                at.k_norm.weight if at.k_norm is not None else None,
                lcos, lsin, at.h, at.kvh, at.d, kernels, cfg.gemma)
            k_cache, v_cache = kv_cache[i, 0], kv_cache[i, 1]
            k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
            v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
            attn = backend.forward(q, k_cache, v_cache, prepared, at.scale, window).reshape(n, at.h * at.d)
            if cfg.gemma:
                assert isinstance(layer.mlp, MLP)
                h = gemma_attention_output_and_mlp(
                    h, attn, at.o_proj.weight, layer.post_attention_layernorm.weight,
                    layer.pre_feedforward_layernorm.weight, layer.post_feedforward_layernorm.weight, cfg.rms_norm_eps,
                    layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)
                continue
            if isinstance(layer.mlp, SparseMoE):
                h = attention_output_and_moe(h, attn, at.o_proj.weight, layer.post_attention_layernorm.weight,
                                             cfg.rms_norm_eps, layer.mlp, self.kernels)
                continue
            h = attention_output_and_mlp(h, attn, at.o_proj.weight, layer.post_attention_layernorm.weight,
                                         cfg.rms_norm_eps, layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight,
                                         self.kernels)
        h = self.norm(h[logits_rows])
        return soft_cap(linear(h, self.lm_head.weight), cfg.final_logit_softcapping)


def local_rope_config(cfg: ModelConfig) -> ModelConfig:
    """The config Gemma 3's sliding layers rotate by: its local base, default rope."""
    assert cfg.local_rope_theta is not None
    return dataclasses.replace(cfg, rope_theta=cfg.local_rope_theta, rope_scaling=None)
