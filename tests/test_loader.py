"""Reading Hugging Face model folders: missing files, unsupported architectures and config values,
sharded checkpoints, the spellings of dtype and rope settings, chat templates, EOS lists."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchllm import LLM, SamplingParams
from batchllm.models.config import ARCHITECTURES
from batchllm.models.folder import read_config
from batchllm.testing import EOS_ID, IM_END_ID

PROMPTS = [[5, 17, 300, 42, 7, 99, 512, 8], [900, 11, 12, 13] * 6, [64] * 3, list(range(100, 150))]


def greedy(max_tokens: int = 12, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run(path: Path, prompts: list[list[int]] = PROMPTS, params: SamplingParams | None = None,
        **kwargs: Any) -> list[list[int]]:
    kwargs.setdefault("dtype", "float32")
    llm = LLM(str(path), num_kv_blocks=64, **kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params or greedy(), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: Any) -> None:
    """Set keys of config.json; a value of `...` deletes the key."""
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list[list[int]]:
    return run(llama_dir)


# ---- missing files ---------------------------------------------------------------------------

@pytest.mark.parametrize("missing, named", [
    (["config.json"], ["config.json"]),
    (["tokenizer.json"], ["tokenizer.json"]),
    (["model.safetensors"], ["safetensors"]),
    (["config.json", "tokenizer.json", "model.safetensors"], ["config.json", "tokenizer.json", "safetensors"]),
])
def test_missing_file_is_one_clear_error(llama_dir: Path, tmp_path: Path, missing: list[str], named: list[str]) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    for name in missing:
        (path / name).unlink()
    with pytest.raises(ValueError) as e:
        LLM(str(path))
    msg = str(e.value)
    assert str(path) in msg
    msg = msg.replace(str(path), "")
    for name in named:
        assert name in msg, msg
    present = {"config.json", "tokenizer.json"} - set(missing)
    assert not any(name in msg for name in present), msg


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_missing_shard_named(model_factory: Callable[..., Path], tmp_path: Path) -> None:
    path = copy_model(model_factory("llama", max_shard_size=100_000), tmp_path / "m")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    with pytest.raises(ValueError, match=shards[1].name):
        LLM(str(path))


def test_missing_weight_named(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["lm_head.weight"], tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        LLM(str(path))
    assert "lm_head" in str(e.value) and "layers.1.self_attn" in str(e.value)


def test_wrong_weight_shape_named(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="norm.weight"):
        LLM(str(path))


# ---- config values ---------------------------------------------------------------------------

def test_unknown_architecture_lists_supported(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError) as e:
        LLM(str(path))
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "\n" not in msg  # one line naming it and every supported one
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Phi3ForCausalLM"} <= set(ARCHITECTURES)
    for arch in ARCHITECTURES:
        assert arch in msg


@pytest.mark.parametrize("changes, named", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_hidden_layers=-2), "num_hidden_layers"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(rope_parameters={"rope_type": "mrope", "factor": 4.0, "rope_theta": 10000.0}), "mrope"),
    (dict(rope_parameters=..., rope_scaling={"type": "mrope", "factor": 4.0}), "mrope"),
    (dict(dtype="int8", torch_dtype="int8"), "int8"),
    (dict(vocab_size=...), "vocab_size"),
], ids=["gelu", "negative-layers", "zero-hidden", "kv-heads", "mrope", "mrope-rope-scaling", "int8", "no-vocab"])
def test_bad_config_value(llama_dir: Path, tmp_path: Path, changes: dict, named: str) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, **changes)
    with pytest.raises(ValueError, match=named):
        LLM(str(path))


def test_invalid_json(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        LLM(str(path))


def test_sliding_window_is_per_layer_and_no_length_cap(model_factory: Callable[..., Path]) -> None:
    """A window limits attention, not the context: Mistral's is on every layer, Qwen's only with
    use_sliding_window (from max_window_layers on), Gemma's by layer_types."""
    def windows(arch: str, **kw: Any) -> tuple:
        llm = LLM(str(model_factory(arch, **kw)), num_kv_blocks=16)
        assert llm.engine.max_model_len == 4096
        return llm.engine.model_config.layer_windows
    assert windows("mistral", sliding_window=64) == (64, 64)
    assert windows("mistral") == ()
    assert windows("qwen2", sliding_window=64) == ()
    assert windows("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=1) == (None, 64)
    assert windows("gemma2", sliding_window=16) == (16, None)


# ---- checkpoints and spellings ---------------------------------------------------------------

def test_sharded_checkpoint_equals_unsharded(model_factory: Callable[..., Path], reference: list[list[int]]) -> None:
    path = model_factory("llama", max_shard_size=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not (path / "model.safetensors").exists()
    assert run(path) == reference


@pytest.mark.parametrize("spelling", ["dtype", "torch_dtype"])
def test_dtype_spellings(model_factory: Callable[..., Path], tmp_path: Path, spelling: str) -> None:
    path = copy_model(model_factory("llama", dtype="bfloat16"), tmp_path / "m")
    other = "torch_dtype" if spelling == "dtype" else "dtype"
    edit_config(path, **{other: ...})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg[spelling] == "bfloat16" and other not in cfg
    llm = LLM(str(path), dtype="auto", num_kv_blocks=16)
    assert llm.engine.dtype == torch.bfloat16
    assert llm.engine.runner.model.embed_tokens.weight.dtype == torch.bfloat16
    # an explicit dtype wins over the config's
    assert LLM(str(path), dtype="float32", num_kv_blocks=16).engine.dtype == torch.float32


def test_no_dtype_means_float32(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    edit_config(path, dtype=..., torch_dtype=...)
    assert LLM(str(path), num_kv_blocks=16).engine.dtype == torch.float32


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("scaling", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0}],
                         ids=["default", "llama3", "linear"])
def test_rope_spellings_give_the_same_model(model_factory: Callable[..., Path], tmp_path: Path,
                                            scaling: dict | None) -> None:
    """`rope_parameters` (transformers 5) and `rope_theta` + `rope_scaling` (older) agree."""
    src = model_factory("llama", rope_theta=50_000.0, rope_scaling=scaling)
    new = copy_model(src, tmp_path / "new")
    edit_config(new, rope_theta=..., rope_scaling=...)
    old = copy_model(src, tmp_path / "old")
    legacy = None if scaling is None else {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    edit_config(old, rope_parameters=..., rope_scaling=legacy)
    c_new, c_old = read_config(new), read_config(old)
    assert c_new.rope_theta == c_old.rope_theta == 50_000.0
    assert (c_new.rope_scaling or {}).get("rope_type") == (c_old.rope_scaling or {}).get("rope_type")
    assert (c_new.rope_scaling is None) == (scaling is None)
    assert torch.equal(c_new.inv_freq(), c_old.inv_freq())
    out_new = run(new)
    assert out_new == run(old)
    # the setting matters: the same weights with the default theta and no scaling differ
    plain = copy_model(src, tmp_path / "plain")
    edit_config(plain, rope_parameters=..., rope_scaling=..., rope_theta=...)
    assert read_config(plain).rope_theta == 10_000.0
    assert run(plain) != out_new


def test_chat_template_file(model_factory: Callable[..., Path]) -> None:
    inline = model_factory("qwen2")
    filed = model_factory("qwen2", chat_template_file=True)
    assert (filed / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((filed / "tokenizer_config.json").read_text())
    a = LLM(str(inline), dtype="float32", num_kv_blocks=16)
    b = LLM(str(filed), dtype="float32", num_kv_blocks=16)
    assert b.tokenizer.chat_template == a.tokenizer.chat_template
    conv = [{"role": "user", "content": "Hi there!"}]
    out_a = a.chat(conv, greedy(3), use_tqdm=False)[0]
    out_b = b.chat(conv, greedy(3), use_tqdm=False)[0]
    assert out_a.prompt == out_b.prompt == "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
    assert out_a.prompt_token_ids == out_b.prompt_token_ids


def test_no_chat_template_is_a_clear_error(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(path), num_kv_blocks=16)
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)


# ---- EOS -------------------------------------------------------------------------------------

def test_generation_config_eos_list(llama_dir: Path, reference: list[list[int]], tmp_path: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64)
    assert llm.engine.eos_token_ids == [EOS_ID, IM_END_ID]
    # make a token the greedy run is known to produce the second EOS of the list
    path = copy_model(llama_dir, tmp_path / "m")
    full = reference[1]
    eos = full[4]
    j = full.index(eos)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS_ID, eos]}))
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    assert llm.engine.eos_token_ids == [EOS_ID, eos]
    prompt = [{"prompt_token_ids": PROMPTS[1]}]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[:j + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert llm.generate(prompt, greedy(), use_tqdm=False)[0].outputs[0].token_ids == full  # ignore_eos
    # one id instead of a list
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert LLM(str(path), num_kv_blocks=16).engine.eos_token_ids == [eos]


def test_eos_falls_back_to_tokenizer_config(llama_dir: Path, tmp_path: Path) -> None:
    path = copy_model(llama_dir, tmp_path / "m")
    (path / "generation_config.json").unlink()
    assert LLM(str(path), num_kv_blocks=16).engine.eos_token_ids == [EOS_ID]


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])  # qwen2: q/k/v bias
def test_packed_linear_weights_give_identical_results(model_factory: Callable[..., Path], arch: str,
                                                      tied: bool) -> None:
    """bf16 projections and LM head packed for oneDNN compute exactly what F.linear computes with
    the plain weights; fp32 models are left unpacked (their results must match transformers)."""
    from batchllm.models.linear import can_pack, linear
    from batchllm.models.loader import load_model

    path = model_factory(arch, tie_word_embeddings=tied)
    cfg = read_config(path)
    cpu = torch.device("cpu")
    plain, packed = (load_model(path, cfg, torch.bfloat16, cpu, 64, pack_weights=p) for p in (False, True))
    if not can_pack(plain.lm_head.weight):
        pytest.skip("no oneDNN weight packing in this torch build")
    pairs = [(plain.lm_head, packed.lm_head)] + [
        (x, y) for a, b in zip(plain.layers, packed.layers)
        for x, y in zip((a.self_attn.qkv_proj, a.self_attn.o_proj, a.mlp.gate_up_proj, a.mlp.down_proj),
                        (b.self_attn.qkv_proj, b.self_attn.o_proj, b.mlp.gate_up_proj, b.mlp.down_proj))]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for a, b in pairs:
            assert b.weight.is_mkldnn and not a.weight.is_mkldnn
            for rows in (1, 7, 300):
                x = torch.randn(rows, a.weight.shape[1], generator=gen).to(torch.bfloat16)
                assert torch.equal(linear(x, b.weight, b.bias), torch.nn.functional.linear(x, a.weight, a.bias))
    assert torch.equal(packed.embed_tokens.weight, plain.embed_tokens.weight)  # a tied embedding keeps its weight
    fp32 = load_model(path, cfg, torch.float32, cpu, 64, pack_weights=True)
    assert not fp32.lm_head.weight.is_mkldnn and fp32.pack_linear_weights() == 0


def test_dtype_tables_agree() -> None:
    """The torch dtypes the loader builds in and the byte sizes the KV limits are computed with."""
    from batchllm.models.config import DTYPE_BYTES
    from batchllm.models.loader import DTYPES

    assert set(DTYPES) == set(DTYPE_BYTES)
    assert all(torch.finfo(DTYPES[k]).bits // 8 == DTYPE_BYTES[k] for k in DTYPES)
