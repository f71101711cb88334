"""ModelConfig: the architecture settings read from a Hugging Face config.json.

Long-context rope. yarn is static: one set of frequencies (a ramp between the original and the
interpolated ones) and an attention factor on cos/sin, for every position, exactly as
transformers. longrope has two sets, short and long factors, and transformers picks one per
forward call by the call's largest position: a sequence whose length stays within
`original_max_position_embeddings` (omax) runs on the short factors throughout, and once it grows
past omax, transformers rotates the whole sequence with the long factors (Phi3's generate drops
its KV cache at that point and recomputes the prompt and every generated token). batchllm
instead gives every position one fixed rotation: short factors below omax, long factors from
omax on. So its outputs equal transformers' token for token while prompt + output stay within
omax, and differ after a sequence crosses it (its keys below omax keep their short-factor
rotation, no recompute). Because a key's rotation depends on its position alone, a shared prefix
is the same for every member of a prefix-sharing group, preemption and chunking change nothing,
and a sequence's output does not depend on what it is batched with (transformers' does: one long
sequence in a batch moves every sequence of that batch to the long factors). Both sets use the
same attention factor, sqrt(1 + ln(factor) / ln(omax)) with factor = max_position_embeddings /
omax unless the config gives `factor` or `attention_factor`, as transformers computes it.
`dynamic` (NTK) rope differs from the default only past max_position_embeddings, which the
engine never reaches, so it runs as the default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the dtypes a model and its KV pool run in
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
                 "MixtralForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


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
    partial_rotary_factor: float = 1.0  # Phi3: rope rotates the first head_dim * factor dims of a head
    # Mixture of experts (models/moe.py); num_experts 0: dense
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: tuple[int, ...] = ()  # the layers whose MLP is the experts
    # GGUF files of Llama 3.1+: rope frequency i is divided by factor i (models/gguf_file.py)
    rope_freq_factors: tuple[float, ...] | None = None
    # Sliding windows per layer (None: global); empty: no layer has one. Mistral/Phi3/Mixtral:
    # every layer; Qwen with use_sliding_window: the layers from max_window_layers on; Gemma: by
    # `layer_types` (or its default pattern).
    layer_windows: tuple[int | None, ...] = ()
    # Gemma 2/3: RMSNorm as x * (1 + w) in float32, norms before and after attention and MLP,
    # embeddings scaled by sqrt(hidden), gelu-tanh MLP (models/llama.py)
    gemma: bool = False
    attn_scale: float | None = None  # softmax scale (Gemma: query_pre_attn_scalar ** -0.5); None: head_dim ** -0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None  # Gemma 3: the sliding layers' rope base (default rope)
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
        gemma = arch in GEMMA
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
        problems = []
        if act != ("gelu_pytorch_tanh" if gemma else "silu"):
            problems.append(f"hidden_act {act!r} is not supported ({'gelu_pytorch_tanh' if gemma else 'silu'} only)")
        if gemma and cfg.get("use_bidirectional_attention"):
            problems.append("use_bidirectional_attention is not supported")
        if heads % kv_heads:
            problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if not isinstance(cfg[k], int) or cfg[k] < 1:
                problems.append(f"{k} must be a positive integer, got {cfg[k]!r}")
        # Rope: transformers 5 writes `rope_parameters` (with rope_theta inside); older configs
        # write `rope_theta` and `rope_scaling` at the top level.
        rope = dict(cfg.get("rope_parameters") or {})
        local_theta = None
        if arch == "Gemma3ForCausalLM":
            # rope per layer type: {"full_attention": {...}, "sliding_attention": {...}} (or the
            # older rope_theta / rope_local_base_freq / rope_scaling at the top level)
            local = rope.get("sliding_attention") or {}
            local_theta = float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0)))
            if local.get("rope_type", "default") != "default":
                problems.append("Gemma 3 sliding layers with a rope type other than default are not supported")
            rope = dict(rope.get("full_attention") or {}) if "full_attention" in rope or "sliding_attention" in rope \
                else rope
            rope.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
        scaling = cfg.get("rope_scaling") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        merged = {**scaling, **{k: v for k, v in rope.items() if k != "rope_theta"}}
        rope_type = merged.get("rope_type", merged.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            problems.append(f"rope_type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")
        if rope_type in ("llama3", "yarn", "longrope"):
            # as transformers: Phi3's top-level original_max_position_embeddings wins, else the
            # rope dict's, else max_position_embeddings
            omax = cfg.get("original_max_position_embeddings") or merged.get("original_max_position_embeddings")
            merged["original_max_position_embeddings"] = int(omax or cfg.get("max_position_embeddings", 4096))
        partial = float(merged.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
        if dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {dtype!r} is not supported")
        if problems:
            raise ValueError("bad config.json: " + "; ".join(problems))
        moe = _moe_fields(arch, cfg)
        window = cfg.get("sliding_window", 4096 if gemma else None)  # transformers' Gemma default
        if gemma and not window:  # its sliding layers (and Gemma 3's local rope) need one
            raise ValueError("bad config.json: a Gemma config needs a sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            window = None
        layers = int(cfg["num_hidden_layers"])
        windows: tuple[int | None, ...] = ()
        if window:
            types = cfg.get("layer_types")
            if types is None and arch.startswith("Qwen"):
                start = int(cfg.get("max_window_layers", layers))
                types = ["sliding_attention" if i >= start else "full_attention" for i in range(layers)]
            elif types is None and gemma:
                every = 2 if arch == "Gemma2ForCausalLM" else int(cfg.get("sliding_window_pattern", 6))
                types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
            elif types is None or arch in ("MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM"):
                types = ["sliding_attention"] * layers  # these apply the window on every layer
            windows = tuple(int(window) if t == "sliding_attention" else None for t in types)
            if all(w is None for w in windows):
                windows = ()
        scalar = cfg.get("query_pre_attn_scalar", 256) if gemma else None
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
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            dtype=dtype,
            sliding_window=int(window) if window else None,
            partial_rotary_factor=partial,
            rope_freq_factors=tuple(cfg["rope_freq_factors"]) if cfg.get("rope_freq_factors") else None,
            layer_windows=windows,
            gemma=gemma,
            attn_scale=float(scalar) ** -0.5 if scalar else None,
            # absent keys take transformers' defaults (Gemma 2: 50 and 30; Gemma 3: none); Gemma 3's
            # attention never soft-caps, whatever its config says
            attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0) if arch == "Gemma2ForCausalLM" else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0 if arch == "Gemma2ForCausalLM" else None)
            if gemma else None,
            local_rope_theta=local_theta,
            **moe,
            extra=cfg,
        )

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V one token takes across all layers, in `dtype` (a DTYPE_BYTES name)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    @property
    def rotary_dim(self) -> int:
        """How many dims of each head rope rotates (all but with Phi3's partial rotary)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def rope_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None, int, float]:
        """(inv_freq, long_inv_freq, switch, attention_scaling), all as transformers computes them:
        positions below `switch` rotate by `inv_freq`, positions from `switch` on by
        `long_inv_freq` (longrope only, else None); cos and sin are scaled by `attention_scaling`
        (yarn's and longrope's attention factor, else 1)."""
        import torch

        d = self.rotary_dim
        exponents = torch.arange(0, d, 2, dtype=torch.int64).float() / d
        s = self.rope_scaling
        kind = s["rope_type"] if s else "default"
        if kind == "longrope":
            omax = s["original_max_position_embeddings"]
            factor = s.get("factor") or self.max_position_embeddings / omax
            scaling = s.get("attention_factor")
            if scaling is None:
                scaling = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(omax))
            short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * self.rope_theta ** exponents)
            long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * self.rope_theta ** exponents)
            return short, long, omax, float(scaling)
        if kind == "yarn":
            inv, scaling = self._yarn(exponents)
            return inv, None, 0, scaling
        return self.inv_freq(), None, 0, 1.0

    def _yarn(self, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
        """YaRN: per dim pair, a ramp between the interpolated (1/factor) and the original frequency."""
        import torch

        s, d, base = self.rope_scaling, self.rotary_dim, self.rope_theta
        assert s is not None
        omax = s["original_max_position_embeddings"]
        factor = s.get("factor") or self.max_position_embeddings / omax
        scaling = s.get("attention_factor")
        if scaling is None:
            def mscale(m: float) -> float:
                return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            mscale_, all_dim = s.get("mscale"), s.get("mscale_all_dim")
            scaling = mscale(mscale_) / mscale(all_dim) if mscale_ and all_dim else mscale(1.0)
        fast, slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def dim_of(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in omax
            return d * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_of(fast), dim_of(slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** exponents
        keep = 1 - ramp  # share of the original (extrapolated) frequency
        return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(scaling)

    def inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies [rotary_dim/2] in float32, with linear/llama3 scaling applied."""
        import torch

        d = self.rotary_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if self.rope_freq_factors is not None:
            inv = inv / torch.tensor(self.rope_freq_factors, dtype=torch.float32)
        s = self.rope_scaling
        # dynamic NTK changes the base only for sequences longer than max_position_embeddings,
        # the engine's limit: within it, it is the default rope (as transformers computes it)
        if s is None or s["rope_type"] == "dynamic":
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


def _moe_fields(arch: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The MoE settings of a Mixtral or Qwen3-MoE config.json (none for dense architectures)."""
    layers = int(cfg["num_hidden_layers"])
    # transformers 5 writes either name for both architectures (an attribute alias)
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if arch == "MixtralForCausalLM":
        return dict(num_experts=int(experts or 8), num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)),
                    moe_intermediate_size=int(cfg["intermediate_size"]), norm_topk_prob=True,
                    sparse_layers=tuple(range(layers)))
    if arch == "Qwen3MoeForCausalLM":
        experts, step = int(128 if experts is None else experts), int(cfg.get("decoder_sparse_step", 1))
        dense = set(cfg.get("mlp_only_layers") or [])
        return dict(num_experts=experts, num_experts_per_tok=int(cfg.get("num_experts_per_tok", 8)),
                    moe_intermediate_size=int(cfg.get("moe_intermediate_size", 768)),
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    sparse_layers=tuple(i for i in range(layers)
                                        if i not in dense and experts > 0 and (i + 1) % step == 0))
    return {}
