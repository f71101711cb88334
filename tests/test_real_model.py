"""The one real checkpoint: SmolLM2-135M-Instruct, a Q4_1 GGUF (downloaded once into
$BATCHLLM_CACHE by `batchllm.models.smollm2`; skipped when it cannot be downloaded, unless
BATCHLLM_REQUIRE_REAL_MODEL is set, as CI sets it), against
transformers loading the same file: tokenizer ids, chat template and greedy fp32 answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.models.smollm2 import ensure_smollm2

QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Explain in one sentence why the sky is blue."]
TEXTS = ["Hello world", "  two  spaces\tand a tab\nnew line\n\n", "Numbers 12345, 3.14159 and 1,000,000 (2025)",
         "ünïcödé café naïve 日本語 한국어 🤖👍", "Don't I'll THEY'VE", "def f(x):\n    return x ** 2  # square",
         "<|im_start|>user\nhi<|im_end|>\n", "", "   "]


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return ensure_smollm2(log=lambda msg: None)
    except RuntimeError as e:
        if os.environ.get("BATCHLLM_REQUIRE_REAL_MODEL"):  # CI sets it: there the download must work
            raise
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.fixture(scope="module")
def hf_tokenizer(gguf: Path):  # noqa: ANN201
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def llm(gguf: Path) -> LLM:
    return LLM(str(gguf), dtype="float32", num_kv_blocks=64)


def test_real_tokenizer_matches_transformers(llm: LLM, hf_tokenizer) -> None:  # noqa: ANN001
    tok = llm.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer.encode(text), text
        assert tok.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids), text
    for conv in ([{"role": "user", "content": QUESTIONS[0]}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]):
        text = tok.apply_chat_template(conv)
        assert text == hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert tok.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.eos_token_ids == [hf_tokenizer.eos_token_id]


def test_real_model_greedy_matches_transformers(llm: LLM, gguf: Path, hf_tokenizer) -> None:  # noqa: ANN001
    """Chat answers that stop at EOS, batched with the shared system prompt computed once."""
    import transformers
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    stats = llm.last_run_stats
    assert stats.computed_prefill_tokens < stats.logical_prefill_tokens  # the template's system prompt is shared
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    for conv, out in zip(convs, outs):
        ids = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert out.prompt_token_ids == list(ids)
        with torch.no_grad():
            r = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, eos_token_id=hf_tokenizer.eos_token_id)
        expected = r[0, len(ids):].tolist()
        assert list(out.outputs[0].token_ids) == expected, (conv, out.outputs[0].text)
    assert "Paris" in outs[0].outputs[0].text


def test_demo_answers_real_questions_with_shared_prefixes(gguf: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`batchllm demo` with the cached model: every good request answered (stopping at EOS),
    the shared texts computed once, some answers printed."""
    import json

    from batchllm.cli import main
    assert main(["demo", "--out-dir", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    for words in ("SmolLM2-135M-Instruct", "20 ok", "2 failed", "prefix saving", "Some answers:", "Paris"):
        assert words in stdout, words
    records = [json.loads(r) for r in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == 20
    assert any(r["response"]["body"]["choices"][0]["finish_reason"] == "stop" for r in records)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["status"] == "complete"
