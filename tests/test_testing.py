"""Tests for batchllm.testing.make_tiny_model (transformers is used only as an oracle here)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchllm.testing import (  # noqa: E402
    ARCHS,
    BOS_ID,
    EOS_ID,
    IM_END_ID,
    SHAPES,
    SPECIAL_TOKENS,
    make_tiny_model,
)

ARCH_NAMES = sorted(ARCHS)
TEXTS = [
    "Hello world, the quick brown fox.",
    "Cafe\u0301 naïve\n\n  tabs\there",
    "  leading spaces and 12345 numbers!",
    "<|im_start|>user\nhi<|im_end|>",
]


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _load_hf(path: Path):
    import transformers
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), (key, info[key])
    return model


def test_unknown_arch_and_shape() -> None:
    with pytest.raises(ValueError, match="llama"):
        make_tiny_model("/nonexistent", arch="gpt2")
    with pytest.raises(ValueError, match="tiny"):
        make_tiny_model("/nonexistent", shape="huge")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_folder_layout_and_names(tmp_path: Path, arch: str) -> None:
    path = make_tiny_model(tmp_path / arch, arch=arch, shape="test")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (path / name).is_file(), name
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [ARCHS[arch][0]] and cfg["model_type"] == ARCHS[arch][1]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen == {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "do_sample": False}
    tensors = _all_tensors(path)
    hd = cfg["head_dim"]
    assert tensors["model.embed_tokens.weight"].shape == (1024, 64)
    if arch == "mixtral":  # per expert, as on the Hub
        assert tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (64, cfg["intermediate_size"])
    elif arch == "qwen3_moe":
        assert tensors["model.layers.1.mlp.experts.3.down_proj.weight"].shape == (64, cfg["moe_intermediate_size"])
    if arch in ("mixtral", "qwen3_moe"):
        assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (2 * hd, 64)
    elif arch == "phi3":  # fused in the checkpoint: q (4 heads), k, v (2 KV heads each); gate, up
        assert tensors["model.layers.1.self_attn.qkv_proj.weight"].shape == (8 * hd, 64)
        assert tensors["model.layers.1.mlp.gate_up_proj.weight"].shape == (2 * cfg["intermediate_size"], 64)
    else:
        assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (2 * hd, 64)
    assert ("model.layers.0.self_attn.q_proj.bias" in tensors) == (arch == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in tensors) == (arch in ("qwen3", "qwen3_moe", "gemma3"))
    assert ("model.layers.0.pre_feedforward_layernorm.weight" in tensors) == arch.startswith("gemma")
    if arch == "qwen3":
        assert tensors["model.layers.0.self_attn.k_norm.weight"].shape == (hd,)
    assert "lm_head.weight" in tensors
    norm = tensors["model.norm.weight"]
    if arch.startswith("gemma"):  # Gemma's norms multiply by 1 + weight
        norm = norm + 1
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() <= cfg["vocab_size"]
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.decode(tok.encode(TEXTS[0]).ids) == TEXTS[0]
    assert (tok.encode("hi").ids[0] == BOS_ID) == (arch in ("llama", "mistral", "phi3", "mixtral", "gemma2", "gemma3"))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_loads_in_transformers(tmp_path: Path, arch: str) -> None:
    import transformers
    path = make_tiny_model(tmp_path / arch, arch=arch, shape="test")
    model = _load_hf(path)
    tensors = _all_tensors(path)
    # transformers stacks the per-expert matrices into one [experts, ...] tensor per layer
    # (gate_up_proj and down_proj): 2 per MoE layer
    moe_layers = {k.split(".experts.")[0] for k in tensors if ".experts." in k}
    n_tensors = len([k for k in tensors if ".experts." not in k]) + 2 * len(moe_layers)
    assert len(model.state_dict()) == n_tensors
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        assert hf_tok.encode(text) == tok.encode(text).ids, text
    assert hf_tok.bos_token_id == BOS_ID and hf_tok.eos_token_id == EOS_ID
    ids = torch.tensor([tok.encode(TEXTS[0]).ids])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024) and torch.isfinite(logits).all()
    assert logits.std() > 0  # random weights produce non-degenerate logits

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = "<|begin_of_text|>" if arch in ("llama", "mistral", "phi3", "mixtral", "gemma2", "gemma3") else ""
    assert rendered == (bos + "<|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    chat_ids = hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert list(chat_ids) == tok.encode(rendered, add_special_tokens=False).ids  # no doubled BOS
    assert len(hf_tok) <= 1024 and max(hf_tok.get_vocab().values()) < 1024
    no_prompt = hf_tok.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("assistant\n")


def test_chat_template_file(tmp_path: Path) -> None:
    import transformers
    path = make_tiny_model(tmp_path / "m", arch="qwen2", shape="test", chat_template_file=True)
    assert (path / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((path / "tokenizer_config.json").read_text())
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    out = hf_tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert out == "<|im_start|>user\nx<|im_end|>\n"


def test_sharded(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", arch="llama", shape="test", max_shard_size=200_000)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    tensors = {}
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == shard.name
                tensors[key] = f.get_tensor(key)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    whole = _all_tensors(make_tiny_model(tmp_path / "whole", arch="llama", shape="test"))
    assert set(whole) == set(tensors) and all(torch.equal(whole[k], tensors[k]) for k in whole)
    _load_hf(path)


def test_tied_embeddings(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", arch="qwen3", shape="test", tie_word_embeddings=True)
    assert "lm_head.weight" not in _all_tensors(path)
    model = _load_hf(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_rope_scaling_override(tmp_path: Path) -> None:
    import transformers
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}
    path = make_tiny_model(tmp_path / "m", arch="llama", shape="test", rope_scaling=rope,
                           max_position_embeddings=512)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_scaling"] == rope and cfg["rope_parameters"] == {**rope, "rope_theta": 10000.0}
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    assert hf_cfg.rope_parameters == {**rope, "rope_theta": 10000.0}
    model = _load_hf(path)
    inv_freq = model.model.rotary_emb.inv_freq
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert torch.allclose(inv_freq[0], base[0]) and not torch.allclose(inv_freq, base)
    assert torch.allclose(inv_freq[-1], base[-1] / 8.0)  # lowest frequency scaled by `factor`


def test_bfloat16_and_overrides(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", arch="mistral", shape="test", dtype="bfloat16",
                           num_key_value_heads=4, head_dim=32)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16" and cfg["sliding_window"] is None
    tensors = _all_tensors(path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert tensors["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 32)
    _load_hf(path)


def test_deterministic(tmp_path: Path) -> None:
    a = _all_tensors(make_tiny_model(tmp_path / "a", arch="qwen2", shape="test", seed=3))
    b = _all_tensors(make_tiny_model(tmp_path / "b", arch="qwen2", shape="test", seed=3))
    c = _all_tensors(make_tiny_model(tmp_path / "c", arch="qwen2", shape="test", seed=4))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_tiny_param_count(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "m", arch="llama", shape="tiny")
    n = 0
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            n += math.prod(f.get_slice(key).get_shape())
    assert abs(n - 55e6) / 55e6 < 0.10, n
    assert SHAPES["tiny"]["hidden_size"] == 512
