"""Write small Hugging Face-style model folders with random weights, for tests and benchmarks.

No transformers import and no network: config, safetensors weights, a trained byte-level BPE
tokenizer, tokenizer_config.json (with a ChatML chat template) and generation_config.json.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

__all__ = ["ARCHS", "SHAPES", "SPECIAL_TOKENS", "make_tiny_model", "write_gguf"]

ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "mixtral": ("MixtralForCausalLM", "mixtral"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}

SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=1408, vocab_size=32000),
    "small": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=4, intermediate_size=2816, vocab_size=32000),
    "test": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128, vocab_size=1024),
}

# Special tokens take ids 0..4 in this order.
SPECIAL_TOKENS: list[str] = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
BOS, EOS, IM_START, IM_END, PAD = SPECIAL_TOKENS
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID, PAD_ID = range(len(SPECIAL_TOKENS))

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_TRAINED_VOCAB = 4096
_QWEN_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

_CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_COMMON_WORDS = (
    "the of and to a in is it that was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very"
).split()


def _corpus(seed: int, n_sentences: int = 4000) -> list[str]:
    """A deterministic English-like corpus: common words plus generated syllable words, Zipf-ish."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch",
              "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m"]
    made = {"".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                    for _ in range(rng.randint(1, 3))) for _ in range(3000)}
    words = _COMMON_WORDS + sorted(made)
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(words))]
    sentences = []
    for _ in range(n_sentences):
        toks = rng.choices(words, weights, k=rng.randint(4, 16))
        if rng.random() < 0.2:
            toks.insert(rng.randrange(len(toks)), str(rng.randint(0, 2025)))
        sentence = " ".join(toks)
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ","]))
    return sentences


def _pipeline(tok: Tokenizer, qwen: bool) -> None:
    """GPT-2 style byte-level pre-tokenization, or Qwen's (NFC + digit-splitting regex)."""
    if qwen:  # must match what transformers' Qwen2Tokenizer rebuilds from vocab + merges
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, seed: int, qwen: bool = False) -> str:
    """Train a byte-level BPE (no post-processor) and return its JSON; cached per (vocab, seed, style)."""
    target = min(vocab_size, _MAX_TRAINED_VOCAB)
    if target < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer (need >= 261)")
    tok = Tokenizer(models.BPE())
    _pipeline(tok, qwen)
    trainer = trainers.BpeTrainer(vocab_size=target, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size and tok.token_to_id(PAD) == PAD_ID
    return tok.to_str()


def _build_config(arch: str, shape: str, dtype: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Assemble config.json contents; overrides win, rope_parameters is derived last."""
    architecture, model_type = ARCHS[arch]
    cfg: dict[str, Any] = dict(SHAPES[shape])
    qwen = arch.startswith("qwen")
    cfg.update(
        architectures=[architecture], model_type=model_type, hidden_act="silu", rms_norm_eps=1e-6,
        rope_theta=1_000_000.0 if qwen else 10_000.0, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        initializer_range=0.02, attention_dropout=0.0, use_cache=True, torch_dtype=dtype, dtype=dtype,
        rope_scaling=None,
    )
    if arch not in ("mistral", "mixtral"):
        cfg["attention_bias"] = arch == "qwen2"  # Qwen2 always has q/k/v biases
    if arch == "llama":
        cfg["mlp_bias"] = False
    if arch in ("mistral", "phi3", "mixtral"):
        cfg["sliding_window"] = None
    if arch == "mixtral":  # 4 experts of the dense shape's width, 2 per token
        cfg.update(num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, output_router_logits=False)
    if arch == "qwen3_moe":  # 4 experts of half the dense width, 2 per token; every layer sparse
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=cfg["intermediate_size"] // 2,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
    if arch == "phi3":
        cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=cfg["max_position_embeddings"],
                   partial_rotary_factor=1.0)
    if qwen:
        cfg.update(use_sliding_window=False, sliding_window=None)
    gemma = arch.startswith("gemma")
    if gemma:  # a small window, so short test prompts cross it; a scale other than head_dim's
        cfg.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                   query_pre_attn_scalar=24, attention_bias=False,
                   final_logit_softcapping=30.0 if arch == "gemma2" else None,
                   attn_logit_softcapping=50.0 if arch == "gemma2" else None)
        if arch == "gemma3":
            cfg.update(rope_local_base_freq=10_000.0, use_bidirectional_attention=False)
    cfg.update(overrides)
    if gemma and "layer_types" not in overrides:  # Gemma 2 alternates; Gemma 3: one global layer in 6 (at least one)
        every, n = (2 if arch == "gemma2" else 6), cfg["num_hidden_layers"]
        cfg["layer_types"] = ["sliding_attention" if (i + 1) % every and i < n - 1 else "full_attention"
                              for i in range(n)]
    if qwen:
        cfg.setdefault("max_window_layers", cfg["num_hidden_layers"])
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if "rope_parameters" not in overrides:
        rope = dict(cfg["rope_scaling"] or {"rope_type": "default"})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        cfg["rope_parameters"] = {**rope, "rope_theta": cfg["rope_theta"]}
        if arch == "gemma3":  # one rope per layer type; the global layers' may be scaled
            cfg["rope_parameters"] = {"full_attention": cfg["rope_parameters"], "sliding_attention": {
                "rope_type": "default", "rope_theta": cfg["rope_local_base_freq"]}}
    return cfg


def _weight_shapes(cfg: dict[str, Any], arch: str) -> dict[str, tuple[int, ...]]:
    """HF parameter names -> shapes, in a fixed order (the order weights are drawn in)."""
    h, hd, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        if arch == "phi3":  # Phi3 checkpoints hold q/k/v and gate/up fused
            shapes[p + "self_attn.qkv_proj.weight"] = (q + 2 * kv, h)
        for name, out in (("q", q), ("k", kv), ("v", kv)) if arch != "phi3" else ():
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, h)
            if arch == "qwen2":
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if arch in ("qwen3", "qwen3_moe", "gemma3"):
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if arch.startswith("gemma"):
            shapes[p + "pre_feedforward_layernorm.weight"] = (h,)
            shapes[p + "post_feedforward_layernorm.weight"] = (h,)
        if arch == "phi3":
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
        elif arch == "mixtral":  # as on the Hub: one w1 (gate), w3 (up), w2 (down) per expert
            shapes[p + "block_sparse_moe.gate.weight"] = (cfg["num_local_experts"], h)
            for e in range(cfg["num_local_experts"]):
                for w, shape in (("w1", (inter, h)), ("w2", (h, inter)), ("w3", (inter, h))):
                    shapes[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = shape
        elif arch == "qwen3_moe" and i not in cfg["mlp_only_layers"] and (i + 1) % cfg["decoder_sparse_step"] == 0:
            m = cfg["moe_intermediate_size"]
            shapes[p + "mlp.gate.weight"] = (cfg["num_experts"], h)
            for e in range(cfg["num_experts"]):
                for w, shape in (("gate_proj", (m, h)), ("up_proj", (m, h)), ("down_proj", (h, m))):
                    shapes[p + f"mlp.experts.{e}.{w}.weight"] = shape
        else:
            shapes[p + "mlp.gate_proj.weight"] = (inter, h)
            shapes[p + "mlp.up_proj.weight"] = (inter, h)
        if arch == "phi3" or not any(".experts." in k and k.startswith(p) for k in shapes):
            shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def _random_weights(
    shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype, unit_offset_norms: bool = False
) -> dict[str, torch.Tensor]:
    """Deterministic per seed: 1 + normal(0, 0.1) for norm weights (normal(0, 0.1) where the
    norm multiplies by 1 + weight, as Gemma's), normal(0, 0.02) for biases, normal(0, 1/sqrt(fan_in))
    for matrices and normal(0, 1) for embeddings.

    NOTE: unit-variance activations (rather than the 0.02 training init) make a random model's
    greedy outputs varied instead of one token repeated, so equality tests have teeth.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            t = t.mul_(0.1).add_(0.0 if unit_offset_norms else 1.0)
        elif "embed_tokens" in name:
            pass
        else:
            t = t.mul_(0.02 if len(shape) == 1 else shape[-1] ** -0.5)
        out[name] = t.to(dtype)
    return out


def _save_weights(path: Path, tensors: dict[str, torch.Tensor], max_shard_size: int | None) -> None:
    """One model.safetensors, or greedy shards + model.safetensors.index.json."""
    meta = {"format": "pt"}
    if max_shard_size is None:
        save_file(tensors, str(path / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_tokenizer(path: Path, cfg: dict[str, Any], arch: str, seed: int, chat_template_file: bool) -> None:
    """tokenizer.json (+ BOS post-processor for llama/mistral) and tokenizer_config.json."""
    add_bos = arch in ("llama", "mistral", "phi3", "mixtral", "gemma2", "gemma3")
    tok = Tokenizer.from_str(_trained_tokenizer_json(cfg["vocab_size"], seed, arch.startswith("qwen")))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, BOS_ID)])
    tok.save(str(path / "tokenizer.json"))
    template = ("{{- bos_token }}" if add_bos else "") + _CHATML
    tcfg: dict[str, Any] = dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=None,  # else transformers' Qwen2Tokenizer appends "<|endoftext|>" at id == vocab size
        add_bos_token=add_bos, add_eos_token=False, model_max_length=cfg["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    if chat_template_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        tcfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


def make_tiny_model(path: str | Path, arch: str = "llama", shape: str = "tiny", seed: int = 0,
                    dtype: str = "float32", max_shard_size: int | None = None,
                    chat_template_file: bool = False, **overrides: Any) -> Path:
    """Write a loadable HF-style model folder with random weights to `path`; return it as a Path.

    `overrides` replace any config.json key (e.g. tie_word_embeddings=True, rope_scaling={...}).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {sorted(SHAPES)}")
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {sorted(_DTYPES)}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _build_config(arch, shape, dtype, overrides)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = _random_weights(_weight_shapes(cfg, arch), seed, _DTYPES[dtype], unit_offset_norms=arch.startswith("gemma"))
    _save_weights(out, tensors, max_shard_size)
    _write_tokenizer(out, cfg, arch, seed, chat_template_file)
    gen = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


# our arch -> (llama.cpp architecture, tokenizer.ggml.pre naming the tiny tokenizer's split)
_GGUF_ARCHS = {"llama": ("llama", "gpt-2"), "mistral": ("llama", "gpt-2"), "mixtral": ("llama", "gpt-2"),
               "qwen2": ("qwen2", "qwen2"), "qwen3": ("qwen3", "qwen2"), "qwen3_moe": ("qwen3moe", "qwen2"),
               "phi3": ("phi3", "gpt-2")}
_GGUF_TENSOR_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "block_sparse_moe.gate": "ffn_gate_inp", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",
}
_GGUF_EXPERT_NAMES = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps", "gate_proj": "ffn_gate_exps",
                      "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def write_gguf(folder: str | Path, out: str | Path, quant: str = "F32") -> Path:
    """Write the tiny model folder `folder` (from `make_tiny_model`) as a GGUF file, the way
    llama.cpp's converter lays it out: llama.cpp tensor names and metadata keys, q/k rows of the
    `llama` architecture interleaved per head, experts stacked per layer (Mixtral as a `llama`
    file with experts), llama3 rope as `rope_freqs` divisors, the byte-level tokenizer as
    vocabulary + merges.
    `quant`: "F32", "F16" or a type `gguf.quants.quantize` writes (e.g. "Q8_0") for the matrices
    (norms and 1-D tensors stay F32, as llama.cpp keeps them)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "config.json").read_text())
    arch = next(a for a, (name, _) in ARCHS.items() if name in cfg["architectures"])
    gguf_arch, pre = _GGUF_ARCHS[arch]
    w = gguf.GGUFWriter(str(out), gguf_arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_dimension_count(int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if arch in ("mixtral", "qwen3_moe"):
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    qtype = gguf.GGMLQuantizationType[quant]
    w.add_file_type({"F32": 0, "F16": 1}.get(quant, 7))
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i < len(SPECIAL_TOKENS) else 1 if i < len(vocab) else 5 for i in range(len(tokens))])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(arch in ("llama", "mistral"))
    w.add_chat_template(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])
    rope = cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) == "longrope":  # as llama.cpp writes Phi3's
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
        w.add_rope_scaling_orig_ctx_len(cfg.get("original_max_position_embeddings") or rope["original_max_position_embeddings"])
        if rope.get("attention_factor") is not None:
            w.add_rope_scaling_attn_factors(rope["attention_factor"])
    if rope.get("rope_type", rope.get("type")) == "llama3":  # as llama.cpp: one divisor per frequency
        from batchllm.models.config import ModelConfig
        mc = ModelConfig.from_hf(cfg)
        plain = ModelConfig.from_hf({**cfg, "rope_scaling": None, "rope_parameters": None})
        w.add_tensor("rope_freqs.weight", (plain.inv_freq() / mc.inv_freq()).numpy().astype(np.float32))
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    stacked: dict[str, list] = {}  # llama.cpp holds a layer's experts as one [experts, out, in] tensor
    for name in list(weights):
        parts = name.split(".")
        if ".experts." in name:
            layer, e, kind = parts[2], int(parts[parts.index("experts") + 1]), parts[-2]
            stacked.setdefault(f"blk.{layer}.{_GGUF_EXPERT_NAMES[kind]}.weight", [None] * experts)[e] = weights.pop(name)
    for gname, ts in stacked.items():
        weights[gname] = np.stack(ts)
    for name, t in weights.items():
        t = t.astype(np.float32)
        if name.startswith("blk."):
            _add(w, name, t, quant, qtype)
            continue
        stem, kind = name.removeprefix("model.").rsplit(".", 1)
        if stem.startswith("layers."):
            _, i, rest = stem.split(".", 2)
            if gguf_arch == "llama" and rest in ("self_attn.q_proj", "self_attn.k_proj"):
                n = heads if rest.endswith("q_proj") else kv_heads
                t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
            gname = f"blk.{i}.{_GGUF_TENSOR_NAMES[rest]}.{kind}"
        else:
            gname = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}[stem] + f".{kind}"
        _add(w, gname, t, quant, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _add(w: Any, name: str, t: Any, quant: str, qtype: Any) -> None:
    """One tensor into the GGUF writer: 1-D and F32 files as float32, else F16 or quantized."""
    import gguf
    import numpy as np

    if t.ndim == 1 or quant == "F32":
        w.add_tensor(name, np.ascontiguousarray(t))
    elif quant == "F16":
        w.add_tensor(name, t.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
