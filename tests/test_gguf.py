"""GGUF files: tiny random models written as llama.cpp lays them out (`testing.write_gguf`), read
back by batchllm and, as the oracle, by transformers' own GGUF loader (`gguf_file=`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.models.folder import ModelFolderError, read_config
from batchllm.testing import write_gguf

from batch_files import plan_without_torch

NEW_TOKENS = 12
TEXTS = ["Hello world", " leading space", "  two  spaces\tand a tab\nnew line\n\n", "Numbers 12345, 3.14 and 1,000",
         "ünïcödé café 日本語 🤖", "<|im_start|>user\nhi<|im_end|>", "Don't I'll THEY'VE", "", "   "]


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, **kw)


def token_ids(outs: list) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def gguf_factory(model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> Callable[..., tuple[Path, Path]]:
    """`gguf_factory(arch, quant, **overrides) -> (folder, gguf path)`, cached per arguments."""
    made: dict[str, tuple[Path, Path]] = {}

    def make(arch: str, quant: str = "F32", **overrides: Any) -> tuple[Path, Path]:
        key = json.dumps([arch, quant, overrides], sort_keys=True)
        if key not in made:
            folder = model_factory(arch, **overrides)
            out = tmp_path_factory.mktemp(f"gguf-{arch}") / f"model-{quant}.gguf"
            made[key] = folder, write_gguf(folder, out, quant)
        return made[key]

    return make


# qwen3 with head_dim 128: transformers' GGUF config reader ignores attention.key_length and
# takes Qwen3's default head_dim (128), so only that size loads there.
CASES = {"llama-Q8_0": ("llama", "Q8_0", {}), "qwen2-Q8_0": ("qwen2", "Q8_0", {}),
         "qwen3-F16": ("qwen3", "F16", {"head_dim": 128}), "llama-Q4_1": ("llama", "Q4_1", {})}


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_greedy_matches_transformers(case: str, gguf_factory: Callable[..., tuple[Path, Path]],
                                          random_prompts: Callable[..., list[list[int]]]) -> None:
    """Dequantized in fp32, batched: token for token what transformers generates from the same file."""
    import transformers
    arch, quant, overrides = CASES[case]
    folder, gguf = gguf_factory(arch, quant, **overrides)
    prompts = random_prompts(4, 5, 40, seed=7)
    llm = LLM(str(gguf), dtype="float32", num_kv_blocks=64)
    # both stop at the file's EOS id (a random model emits it now and then)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=NEW_TOKENS),
                        use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    for p, got in zip(prompts, token_ids(outs)):
        with torch.no_grad():
            r = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert got == r[0, len(p):].tolist(), case


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_f32_gguf_equals_its_folder(arch: str, gguf_factory: Callable[..., tuple[Path, Path]],
                                    random_prompts: Callable[..., list[list[int]]]) -> None:
    """Unquantized, the GGUF is the same model as the folder it was written from (the q/k rows
    put back in order), also under prefix sharing with a small KV pool and small chunks."""
    folder, gguf = gguf_factory(arch)
    want = read_config(folder)
    # GGUF stores eps as a float32 (the value the fp32 computation rounds it to anyway)
    assert dataclasses.replace(read_config(gguf), rms_norm_eps=want.rms_norm_eps) == want
    stem = random_prompts(1, 30, 30, seed=3)[0]
    prompts = [stem + tail for tail in random_prompts(12, 3, 20, seed=4)]
    ref = token_ids(LLM(str(folder), dtype="float32", num_kv_blocks=256).generate(prompts, greedy(), use_tqdm=False))
    llm = LLM(str(gguf), dtype="float32", num_kv_blocks=8, max_num_batched_tokens=16, policy="batchllm",
              memory_centric=False)
    assert token_ids(llm.generate(prompts, greedy(), use_tqdm=False)) == ref
    stats = llm.last_run_stats
    assert stats.preemptions > 0 and stats.computed_prefill_tokens < stats.logical_prefill_tokens


def test_llama3_rope_as_frequency_factors(gguf_factory: Callable[..., tuple[Path, Path]],
                                          random_prompts: Callable[..., list[list[int]]]) -> None:
    """Llama 3.1+ GGUFs hold the llama3 rope scaling as a `rope_freqs` tensor of divisors."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    folder, gguf = gguf_factory("llama", rope_scaling=llama3)
    cfg = read_config(gguf)
    assert cfg.rope_scaling is None and cfg.rope_freq_factors is not None
    assert torch.allclose(cfg.inv_freq(), read_config(folder).inv_freq(), rtol=1e-6)
    prompts = random_prompts(6, 40, 70, seed=8)  # positions past 64, where the scaling bites
    want = token_ids(LLM(str(folder), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False))
    assert token_ids(LLM(str(gguf), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False)) == want


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_tokenizer_matches_transformers(arch: str, gguf_factory: Callable[..., tuple[Path, Path]]) -> None:
    import transformers
    folder, gguf = gguf_factory(arch)
    llm_tok = LLM(str(gguf), dtype="float32", num_kv_blocks=8).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for text in TEXTS:
        ids = llm_tok.encode(text)
        assert ids == hf.encode(text), text
        assert llm_tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    conv = [{"role": "user", "content": "Hi there"}]
    assert llm_tok.apply_chat_template(conv) == hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert llm_tok.eos_token_ids == [hf.eos_token_id]


def test_gguf_of_unsupported_architecture_is_one_clear_error(tmp_path: Path) -> None:
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gemma2'") as e:
        read_config(tmp_path / "m.gguf")
    from batchllm.models.gguf_file import GGUF_ARCHITECTURES
    assert all(name in str(e.value) for name in GGUF_ARCHITECTURES) and "\n" not in str(e.value)


def test_missing_or_bad_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        read_config(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelFolderError, match="not a GGUF file"):
        read_config(tmp_path / "bad.gguf")


def _sentencepiece_gguf(path: Path) -> Path:
    """A GGUF holding only a SentencePiece-style vocabulary (tokenizer model "llama"): <unk>, <s>,
    </s>, the 256 byte tokens, then pieces learned by BPE on "▁"-joined words, scored by merge
    rank and written without merges (the reader derives them from the scores)."""
    import gguf
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from batchllm.testing import _corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.train_from_iterator(_corpus(1, 1500), trainers.BpeTrainer(vocab_size=700, show_progress=False))
    merged = ["".join(m if isinstance(m, list) else m.split(" ")) for m in json.loads(tok.to_str())["model"]["merges"]]
    chars = sorted(t for t in tok.get_vocab() if len(t) == 1)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars
    tokens += [m for m in dict.fromkeys(merged) if m not in tokens]
    scores = [0.0] * 259 + [-1e4 - i for i in range(len(chars))] + [-float(i) for i in range(len(tokens) - 259 - len(chars))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path: Path) -> None:
    """Byte fallback for characters outside the vocabulary, the "▁" space prefix, BOS added.

    One known difference: transformers' Metaspace skips the prefix when the text already starts
    with a space; SentencePiece and llama.cpp always add it (" Hi" is "▁", "▁Hi"), and so does
    batchllm, so text starting with a space equals transformers' tokens of one more space."""
    import transformers

    from batchllm.tokenizer import Tokenizer
    path = _sentencepiece_gguf(tmp_path / "sp.gguf")
    ours = Tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS + ["The river stone garden.", "water people 2025!"]:
        ids = ours.encode(text)
        assert ids == hf.encode(" " + text if text.startswith(" ") else text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.encode("x")[0] == 1 and any(3 <= i < 259 for i in ours.encode("日本"))  # BOS; byte tokens


def test_run_batch_with_a_gguf_file(gguf_factory: Callable[..., tuple[Path, Path]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--model file.gguf`: results equal LLM.generate on the file; the manifest fingerprints it."""
    from batchllm.cli import main
    _, gguf = gguf_factory("llama", "Q8_0")
    prompts = [f"The river stone garden {i}" for i in range(4)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": p, "max_tokens": 6, "temperature": 0}}) + "\n"
                           for i, p in enumerate(prompts)))
    out = tmp_path / "out.jsonl"
    code = main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(gguf), "--kv-cache-memory", "8MiB"])
    assert code == 0, capsys.readouterr().err
    got = {json.loads(r)["custom_id"]: json.loads(r)["response"]["body"]["choices"][0]["text"]
           for r in out.read_text().splitlines()}
    want = LLM(str(gguf), kv_cache_memory=8 * 2**20).generate(prompts, SamplingParams(temperature=0, max_tokens=6),
                                                              use_tqdm=False)
    assert got == {str(i): w.outputs[0].text for i, w in enumerate(want)}
    manifest = json.loads(out.with_name("out.manifest.json").read_text())
    assert manifest["model"]["fingerprint"]


def test_phi3_gguf_equals_its_folder(gguf_factory: Callable[..., tuple[Path, Path]],
                                    random_prompts: Callable[..., list[list[int]]]) -> None:
    """Phi3 as llama.cpp writes it: fused attn_qkv and ffn_up (gate and up), partial rotary as
    rope.dimension_count, longrope's factor sets as tensors."""
    omax, rot = 40, 8
    rope = {"rope_type": "longrope", "short_factor": [1.5, 2.0, 1.25, 3.0], "long_factor": [2.5, 4.0, 1.75, 6.0],
            "original_max_position_embeddings": omax}
    folder, gguf = gguf_factory("phi3", partial_rotary_factor=rot / 16, max_position_embeddings=256,
                                original_max_position_embeddings=omax, rope_scaling=rope)
    cfg, want = read_config(gguf), read_config(folder)
    assert (cfg.rotary_dim, cfg.rope_parameters()[2:]) == (want.rotary_dim, want.rope_parameters()[2:])
    prompts = random_prompts(6, 20, 50, seed=14)  # some cross the switch at 40
    ref = token_ids(LLM(str(folder), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False))
    assert token_ids(LLM(str(gguf), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False)) == ref


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_gguf_equals_its_folder(arch: str, gguf_factory: Callable[..., tuple[Path, Path]],
                                    random_prompts: Callable[..., list[list[int]]]) -> None:
    """Experts as llama.cpp holds them ([experts, out, in] per layer; Mixtral as a `llama` file
    with experts), unquantized: the same model as the folder."""
    folder, gguf = gguf_factory(arch)
    cfg, want_cfg = read_config(gguf), read_config(folder)
    assert (cfg.architecture, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
            cfg.norm_topk_prob, cfg.sparse_layers) == (want_cfg.architecture, want_cfg.num_experts,
                                                       want_cfg.num_experts_per_tok, want_cfg.moe_intermediate_size,
                                                       want_cfg.norm_topk_prob, want_cfg.sparse_layers)
    prompts = random_prompts(6, 5, 40, seed=12)
    want = token_ids(LLM(str(folder), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False))
    assert token_ids(LLM(str(gguf), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False)) == want


def test_plan_reads_a_gguf_without_torch(gguf_factory: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    """`batchllm plan --model m.gguf` tokenizes and plans with torch unimportable, as for folders."""
    _, gguf = gguf_factory("llama", "Q8_0")
    plan_without_torch(gguf, tmp_path)
