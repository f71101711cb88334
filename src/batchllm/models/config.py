"""ModelConfig: the architecture settings read from a Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a model and its KV pool run in
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    """The switches by which Llama, Mistral, Qwen2 and Qwen3 differ, plus their shapes."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3
    dtype: str  # the checkpoint's dtype: "float32" | "bfloat16" | "float16"
    sliding_window: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Parse config.json; raise ValueError naming an unsupported architecture or a bad value."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"batchllm supports {', '.join(ARCHITECTURES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks required field(s): {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        act = cfg.get("hidden_act", "silu")
        problems = []
        if act != "silu":
            problems.append(f"hidden_act {act!r} is not supported (only silu)")
        if heads % kv_heads:
            problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if not isinstance(cfg[k], int) or cfg[k] < 1:
                problems.append(f"{k} must be a positive integer, got {cfg[k]!r}")
        # Rope: transformers 5 writes `rope_parameters` (with rope_theta inside); older configs
        # write `rope_theta` and `rope_scaling` at the top level.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        merged = {**scaling, **{k: v for k, v in rope.items() if k != "rope_theta"}}
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            problems.append(f"rope_type {rope_type!r} is not supported (default, linear, llama3)")
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
        if dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {dtype!r} is not supported")
        if problems:
            raise ValueError("bad config.json: " + "; ".join(problems))
        window = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**merged, "rope_type": rope_type},
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=dtype,
            sliding_window=int(window) if window else None,
            extra=cfg,
        )

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V one token takes across all layers, in `dtype` (a DTYPE_BYTES name)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies [head_dim/2] in float32, with linear/llama3 scaling applied."""
        import torch

        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        factor = float(s["factor"])
        if s["rope_type"] == "linear":
            return inv / factor
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
