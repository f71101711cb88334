"""Convert a Hugging Face Llama-family folder (safetensors + tokenizer.json) to GGUF for llama.cpp.

    python bench/peers/to_gguf.py MODEL_DIR [OUT.gguf] [--dtype bfloat16|float16|float32]

Needs only `gguf` and `numpy` (safetensors are read directly, bf16 kept bit-exact). Supports the
architectures batchllm runs: llama and mistral (written as GGUF "llama"), qwen2 and qwen3.

llama.cpp's "llama" architecture applies rope to adjacent pairs (GPT-J style) while HF Llama uses
rotate_half (first half / second half of each head), so q_proj and k_proj rows are permuted per
head exactly like llama.cpp's convert_hf_to_gguf.py does. qwen2/qwen3 use NEOX rope in llama.cpp,
which is HF's layout: no permutation.

The tokenizer is written as "gpt2"-style byte-level BPE from tokenizer.json (the runners pass token
ids, so it only has to load); the token list is padded to the model's vocab_size with unused tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

CONVERTER_VERSION = 1
CACHE = Path(os.environ.get("BATCHLLM_CACHE", Path.home() / ".cache" / "batchllm")) / "gguf"

ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_ST_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}


# ---- safetensors, read directly ---------------------------------------------------------------
def _safetensor_files(model: Path) -> list[Path]:
    index = model / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model / n for n in names]
    files = sorted(model.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model}")
    return files


def read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (safetensors dtype, array); BF16 arrays are returned as raw uint16."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = info["dtype"]
        if dt not in _ST_DTYPES:
            raise ValueError(f"{path.name}:{name}: unsupported dtype {dt}")
        a, b = info["data_offsets"]
        out[name] = (dt, data[a:b].view(_ST_DTYPES[dt]).reshape(info["shape"]))
    return out


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, like ggml_compute_fp32_to_bf16 and torch's .to(bfloat16)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), r)


def bf16_bits_to_f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def _to_f32(dt: str, a: np.ndarray) -> np.ndarray:
    return bf16_bits_to_f32(a) if dt == "BF16" else a.astype(np.float32)


# ---- conversion --------------------------------------------------------------------------------
def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp interleaved pairs (convert_hf_to_gguf LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tensor_name(hf: str) -> str | None:
    if hf in ("model.embed_tokens.weight",):
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    if hf.endswith("rotary_emb.inv_freq"):
        return None
    parts = hf.split(".")
    if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
        raise ValueError(f"unexpected tensor {hf}")
    n, rest = parts[2], ".".join(parts[3:])
    table = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    if rest not in table:
        raise ValueError(f"unexpected tensor {hf}")
    return f"blk.{n}.{table[rest]}"


def _tokenizer(writer, model: Path, cfg: dict, vocab_size: int) -> None:
    import gguf

    tok = json.loads((model / "tokenizer.json").read_text())
    m = tok.get("model", {})
    id_to_tok: dict[int, str] = {i: t for t, i in m.get("vocab", {}).items()} if isinstance(m.get("vocab"), dict) else {}
    types: dict[int, int] = {}
    for a in tok.get("added_tokens", []):
        id_to_tok[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = max(vocab_size, max(id_to_tok, default=-1) + 1)
    tokens, ttypes = [], []
    for i in range(n):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            ttypes.append(types.get(i, gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            ttypes.append(gguf.TokenType.UNUSED)
    merges = [" ".join(x) if isinstance(x, list) else x for x in m.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(ttypes)
    if merges:
        writer.add_token_merges(merges)
    bos, eos, pad = cfg.get("bos_token_id"), cfg.get("eos_token_id"), cfg.get("pad_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if bos is not None:
        writer.add_bos_token_id(int(bos))
    if eos is not None:
        writer.add_eos_token_id(int(eos))
    if pad is not None:
        writer.add_pad_token_id(int(pad))
    writer.add_add_bos_token(False)  # the runners pass token ids


def convert(model: str | Path, out: str | Path, dtype: str = "bfloat16") -> Path:
    import gguf

    model, out = Path(model), Path(out)
    cfg = json.loads((model / "config.json").read_text())
    mtype = cfg.get("model_type", "llama")
    if mtype not in ARCHS:
        raise ValueError(f"model_type {mtype!r} is not supported (supported: {', '.join(ARCHS)})")
    arch = ARCHS[mtype]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        print(f"to_gguf: warning: rope scaling {scaling} is not converted", file=sys.stderr)
    qtype, ftype = {
        "bfloat16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "float16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "float32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    }[dtype]

    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for f in _safetensor_files(model):
        tensors.update(read_safetensors(f))
    vocab_size = cfg.get("vocab_size") or tensors["model.embed_tokens.weight"][1].shape[0]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(model.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_key_length(int(head_dim))
    w.add_value_length(int(head_dim))
    w.add_rope_dimension_count(int(head_dim))
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(vocab_size))
    w.add_file_type(int(ftype))
    _tokenizer(w, model, cfg, int(vocab_size))

    for hf_name in sorted(tensors, key=lambda s: (s.count("."), s)):
        name = _tensor_name(hf_name)
        if name is None:
            continue
        dt, a = tensors[hf_name]
        if arch == "llama" and name.endswith("attn_q.weight"):
            a = permute_rope(a, n_head)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            a = permute_rope(a, n_kv)
        if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms and biases stay f32, as upstream
            w.add_tensor(name, np.ascontiguousarray(_to_f32(dt, a)))
        elif qtype == gguf.GGMLQuantizationType.BF16:
            bits = a if dt == "BF16" else f32_to_bf16_bits(_to_f32(dt, a))
            w.add_tensor(name, np.ascontiguousarray(bits), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(_to_f32(dt, a).astype(np.float16)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def cached_gguf(model: str | Path, dtype: str = "bfloat16") -> tuple[Path, bool]:
    """The GGUF for `model` in ~/.cache/batchllm/gguf, converted on first use. Returns (path, converted)."""
    model = Path(model).resolve()
    h = hashlib.sha1(f"{CONVERTER_VERSION}|{model}|{dtype}".encode())
    h.update((model / "config.json").read_bytes())
    for f in [*_safetensor_files(model), model / "tokenizer.json"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = CACHE / f"{model.name}-{dtype}-{h.hexdigest()[:12]}.gguf"
    if out.exists():
        return out, False
    return convert(model, out, dtype), True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out", nargs="?", help="default: cached under ~/.cache/batchllm/gguf")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    path = convert(args.model, args.out, args.dtype) if args.out else cached_gguf(args.model, args.dtype)[0]
    print(path)


if __name__ == "__main__":
    main()
