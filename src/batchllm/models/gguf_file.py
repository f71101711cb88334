"""GGUF files (llama.cpp's format): the architecture settings and the weights, as a model folder's.

A GGUF holds its config as metadata under llama.cpp's key names and its tensors under llama.cpp's
names, often quantized. This module maps both to what a Hugging Face folder holds: a config.json
dict (read into `ModelConfig` as usual) and tensors with Hugging Face names, dequantized to float32
by the `gguf` package (every quant type it can dequantize). The tokenizer is in gguf_tokenizer.py.
Llama 3.1+ files carry their rope scaling as a tensor, `rope_freqs` (one divisor per rotary
frequency), which becomes the batchllm-only config key `rope_freq_factors`.

llama.cpp's converter reorders the rows of q_proj and k_proj for the `llama` architecture (it
interleaves the two rotary halves of each head, the layout its rope kernel wants); `unpermute`
puts them back. Qwen2/Qwen3/Phi3 files are written unpermuted. Phi3 files keep q/k/v fused
(attn_qkv) and gate/up fused (ffn_up), as Phi3 checkpoints do; longrope's factor sets are the
tensors rope_factors_long/short.

No torch import at module level: `batchllm plan` reads configs without torch.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import gguf
    import torch

# llama.cpp architecture name -> the Hugging Face architecture whose computation it is
# (a `llama` file with experts is Mixtral, as llama.cpp writes it)
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                      "qwen3moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM"}
_PERMUTED_QK = {"llama"}  # architectures whose q/k rows llama.cpp's converter reorders

# llama.cpp tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# expert tensors [experts, out, in], split per expert into the Hub's names
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_LAYER_TENSORS["ffn_gate_inp"] = "mlp.gate"  # the router
# Phi3 files hold q/k/v fused, and gate/up fused under ffn_up
_FUSED_TENSORS = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}


def is_gguf(path: str | Path) -> bool:
    """True for a path naming a GGUF file (by its suffix)."""
    return str(path).lower().endswith(".gguf")


def check_gguf(path: Path) -> None:
    """Raise ValueError (ModelFolderError's base) for a GGUF path that is missing or not a GGUF."""
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{str(path)!r} is not a GGUF file (no GGUF magic)")


@functools.lru_cache(maxsize=2)
def _reader(path: str, mtime_ns: int, size: int) -> "gguf.GGUFReader":
    import gguf

    return gguf.GGUFReader(path)


def reader(path: str | Path) -> "gguf.GGUFReader":
    """The file's GGUFReader (memory-mapped), cached: config, tokenizer and weights read one parse."""
    p = Path(path).resolve()
    st = os.stat(p)
    return _reader(str(p), st.st_mtime_ns, st.st_size)


def metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata field as a Python value (arrays as lists)."""
    return _metadata(reader(path))


@functools.lru_cache(maxsize=2)
def _metadata(r: "gguf.GGUFReader") -> dict[str, Any]:
    return {name: field.contents() for name, field in r.fields.items()}


def hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json a Hugging Face folder of this model would hold."""
    md = metadata(path)
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; batchllm reads GGUF files of "
                         f"{', '.join(sorted(GGUF_ARCHITECTURES))}")

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rot = int(get("rope.dimension_count", head_dim))
    if rot != head_dim and arch != "phi3":
        raise ValueError(f"{path}: partial rotary ({rot} of {head_dim} dims) is not supported for {arch!r}")
    names = {t.name: t for t in reader(path).tensors}
    experts = int(get("expert_count", 0) or 0)
    architecture = "MixtralForCausalLM" if arch == "llama" and experts else GGUF_ARCHITECTURES[arch]
    cfg: dict[str, Any] = {
        "architectures": [architecture],
        "vocab_size": int(get("vocab_size") or len(md["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length") or get("expert_feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "dtype": _dtype(md.get("general.file_type")),
    }
    if experts:
        cfg.update(num_local_experts=experts, num_experts_per_tok=int(get("expert_used_count")))
    if arch == "qwen3moe":  # llama.cpp renormalises the top-k weights of Qwen3-MoE (as its checkpoints say)
        cfg.update(moe_intermediate_size=int(get("expert_feed_forward_length")), norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if rot != head_dim:
        cfg["partial_rotary_factor"] = rot / head_dim
    scaling = get("rope.scaling.type")
    omax = get("rope.scaling.original_context_length")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor", 1.0))}
        if omax is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(omax)
        for key, ours in (("rope.scaling.yarn_beta_fast", "beta_fast"), ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if get(key) is not None:
                cfg["rope_scaling"][ours] = float(get(key))
    if "rope_factors_long.weight" in names:  # Phi3 longrope: the two factor sets as tensors
        def factors(name: str) -> list[float]:
            return [float(x) for x in np.asarray(names[name].data, dtype=np.float32)]
        cfg["rope_scaling"] = {"rope_type": "longrope", "long_factor": factors("rope_factors_long.weight"),
                               "short_factor": factors("rope_factors_short.weight")}
        if get("rope.scaling.attn_factor") is not None:
            cfg["rope_scaling"]["attention_factor"] = float(get("rope.scaling.attn_factor"))
        cfg["original_max_position_embeddings"] = int(omax or cfg["max_position_embeddings"])
    if "rope_freqs.weight" in names:
        # Llama 3.1+: llama.cpp stores the llama3 scaling as one divisor per frequency
        cfg["rope_freq_factors"] = [float(x) for x in np.asarray(names["rope_freqs.weight"].data, dtype=np.float32)]
    if get("attention.sliding_window"):
        cfg["sliding_window"] = int(get("attention.sliding_window"))
    return cfg


def _dtype(file_type: int | None) -> str:
    """The dtype "auto" runs a file in: its own for float files (0 F32, 1 F16, 32 BF16), else
    bfloat16 (a quantized file has no float dtype; bf16 halves the memory of fp32 and keeps its range)."""
    return {0: "float32", 1: "float16", 32: "bfloat16"}.get(file_type, "bfloat16")


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (pairs of rotary dims) back to two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a llama.cpp tensor name; None for tensors without one."""
    stem, _, kind = name.rpartition(".")
    if stem in _TOP_TENSORS:
        return f"{_TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and arch == "phi3" and parts[2] in _FUSED_TENSORS:
        return f"model.layers.{parts[1]}.{_FUSED_TENSORS[parts[2]]}.{kind}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    return None


def tensors(path: str | Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """(Hugging Face name, float32 tensor) for every weight, dequantized, q/k rows in HF order."""
    import gguf
    import torch

    r = reader(path)
    arch = metadata(path)["general.architecture"]
    cfg = hf_config(path)
    for t in r.tensors:
        stem, _, _ = t.name.rpartition(".")
        parts = stem.split(".")
        if len(parts) == 3 and parts[2] in _EXPERT_TENSORS:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            for e in range(w.shape[0]):
                yield f"model.layers.{parts[1]}.mlp.experts.{e}.{_EXPERT_TENSORS[parts[2]]}.weight", torch.from_numpy(w[e].copy())
            continue
        name = hf_name(t.name, arch)
        if name is None:
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            w = unpermute(w, heads)
        yield name, torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else w.copy())
