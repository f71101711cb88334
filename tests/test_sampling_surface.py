"""vLLM's sampling surface (issue 20): repetition penalty equals transformers; presence,
frequency, logit bias and allowed ids equal a reference greedy loop over the same logits; bad
words, include_stop_str_in_output, truncate_prompt_tokens, generation_config defaults."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchllm import LLM, SamplingParams

N = 12


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=512)


@pytest.fixture(scope="module")
def hf(llama_dir: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(random_prompts: Callable[..., list[list[int]]]) -> list[list[int]]:
    # Short vocabulary range, so that tokens repeat and the penalties bite.
    return random_prompts(6, 4, 30, seed=20, vocab=60)


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": N, "ignore_eos": True, **kw})


def test_repetition_penalty_equals_transformers(llm: LLM, hf: Any, prompts: list[list[int]]) -> None:
    penalties = [1.3, 0.7, 2.0, 1.1, 1.5, 1.0]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [greedy(repetition_penalty=r) for r in penalties], use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    for prompt, r, out in zip(prompts, penalties, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=N, min_new_tokens=N, do_sample=False, repetition_penalty=r,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, r
    assert sum(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs, plain)) >= 3  # it bites


def reference_greedy(hf: Any, prompt: list[int], p: SamplingParams) -> list[int]:
    """Greedy decoding with the OpenAI/vLLM definitions written out: allowed ids, then logit
    bias, then repetition (prompt + output), frequency and presence (output) penalties."""
    ids = list(prompt)
    out: list[int] = []
    for _ in range(p.max_tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float().clone()
        if p.allowed_token_ids:
            keep = torch.full_like(logits, float("-inf"))
            keep[p.allowed_token_ids] = 0
            logits += keep
        for t, b in (p.logit_bias or {}).items():
            logits[t] += b
        for t in set(ids):
            if p.repetition_penalty != 1:
                logits[t] = logits[t] / p.repetition_penalty if logits[t] > 0 else logits[t] * p.repetition_penalty
        for t in set(out):
            logits[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        tok = int(logits.argmax())
        ids.append(tok)
        out.append(tok)
    return out


def test_penalties_bias_allowed_equal_reference_loop(llm: LLM, hf: Any, prompts: list[list[int]]) -> None:
    params = [greedy(presence_penalty=1.5), greedy(frequency_penalty=0.8), greedy(frequency_penalty=-0.5),
              greedy(logit_bias={7: 5.0, 9: -100.0, 30: 2.5}), greedy(allowed_token_ids=[5, 11, 17, 40, 41]),
              greedy(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={12: 1.0})]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(), use_tqdm=False)
    for i, (prompt, p, out) in enumerate(zip(prompts, params, outs)):
        assert out.outputs[0].token_ids == reference_greedy(hf, prompt, p), i
    assert set(outs[4].outputs[0].token_ids) <= {5, 11, 17, 40, 41}
    assert sum(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b in zip(outs, plain)) >= 4


def test_bad_words(llm: LLM) -> None:
    free = llm.generate("the water", greedy(max_tokens=24), use_tqdm=False)[0].outputs[0]
    words = free.text.split()
    assert words
    banned = llm.generate("the water", greedy(max_tokens=24, bad_words=words[:3]), use_tqdm=False)[0].outputs[0]
    ids_of = llm.engine.sampler.processors.bad_word_ids(words[:3])
    out = banned.token_ids
    for ids in ids_of:
        assert not any(out[k:k + len(ids)] == ids for k in range(len(out))), ids
    assert banned.token_ids != free.token_ids


def test_include_stop_str_in_output(llm: LLM) -> None:
    free = llm.generate("the water", greedy(max_tokens=16), use_tqdm=False)[0].outputs[0]
    stop = free.text[4:7]
    cut = llm.generate("the water", greedy(max_tokens=16, stop=stop), use_tqdm=False)[0].outputs[0]
    kept = llm.generate("the water", greedy(max_tokens=16, stop=stop, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == cut.text + stop and kept.stop_reason == stop and kept.finish_reason == "stop"


def test_truncate_prompt_tokens(llm: LLM, prompts: list[list[int]]) -> None:
    p = prompts[0] + prompts[1]
    out = llm.generate({"prompt_token_ids": p}, greedy(truncate_prompt_tokens=5), use_tqdm=False)[0]
    assert out.prompt_token_ids == p[-5:]
    assert out.outputs[0].token_ids == llm.generate({"prompt_token_ids": p[-5:]}, greedy(),
                                                    use_tqdm=False)[0].outputs[0].token_ids


def test_generation_config_defaults(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m"
    shutil.copytree(llama_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    gen.update(temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.05, do_sample=True)
    (model / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(model), dtype="float32", num_kv_blocks=64)
    capsys.readouterr()
    llm.generate("a", use_tqdm=False)
    llm.generate("b", use_tqdm=False)
    err = capsys.readouterr().err
    assert err.count("generation_config.json") == 1 and "temperature=0.6" in err
    d = llm.default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.max_tokens) == (0.6, 0.9, 20, 1.05, 16)
    plain = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64)
    assert plain.default_sampling_params() == SamplingParams()
