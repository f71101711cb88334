"""What a script written for vLLM passes to `LLM`, `generate` and `chat`, and what it gets back."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.config import EngineConfig
from batchllm.limits import limits_of_config
from batchllm.outputs import Logprob


def greedy(max_tokens: int = 8, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=256)


# ---- engine arguments ------------------------------------------------------------------------

def test_sizes_dtypes_and_devices_as_vllm_takes_them(llama_dir: Path) -> None:
    cfg = EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory="1GiB")
    assert cfg.kv_cache_memory == 2**30
    for given, want in (("half", "float16"), ("float", "float32"), ("bf16", "bfloat16"), (torch.bfloat16, "bfloat16"),
                        (torch.float16, "float16"), ("FLOAT32", "float32")):
        assert EngineConfig.from_kwargs(str(llama_dir), dtype=given).dtype == want
    assert EngineConfig.from_kwargs(str(llama_dir), device=torch.device("cpu")).device == "cpu"
    assert EngineConfig.from_kwargs(str(llama_dir), device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N, got 'meta'"):
        EngineConfig.from_kwargs(str(llama_dir), device="meta")
    with pytest.raises(ValueError, match="dtype must be"):
        EngineConfig.from_kwargs(str(llama_dir), dtype="int8")
    with pytest.raises(ValueError, match="not a size"):
        EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory="lots")
    with pytest.raises(ValueError, match="kv_cache_memory must be"):
        EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory=1.5)


def test_vllm_engine_arguments(llama_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the harmless ones say nothing
        cfg = EngineConfig.from_kwargs(str(llama_dir), tensor_parallel_size=1, enforce_eager=True,
                                       enable_prefix_caching=True, trust_remote_code=False, swap_space=0,
                                       gpu_memory_utilization=0.3, tokenizer=str(llama_dir), disable_log_stats=True,
                                       tokenizer_mode="auto")
    assert cfg.gpu_memory_utilization == 0.3 and cfg.tokenizer == str(llama_dir) and cfg.policy == "batchllm"
    assert EngineConfig.from_kwargs(str(llama_dir), enable_prefix_caching=False).policy == "fcfs"
    assert EngineConfig.from_kwargs(str(llama_dir), enable_prefix_caching=False, policy="lpm").policy == "lpm"
    for kw, words in ((dict(swap_space=4), "swap_space=4 is ignored"),
                      (dict(trust_remote_code=True), "trust_remote_code=True is ignored"),
                      (dict(enforce_eager=False), "enforce_eager=False is ignored")):
        with pytest.warns(UserWarning, match=words):
            EngineConfig.from_kwargs(str(llama_dir), **kw)
    for kw, words in ((dict(tensor_parallel_size=2), "one device"), (dict(quantization="awq"), "quantized"),
                      (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"), (dict(gpu_memory_utilization=1.5), r"\(0, 1\]")):
        with pytest.raises(ValueError, match=words):
            EngineConfig.from_kwargs(str(llama_dir), **kw)
    with pytest.raises(TypeError, match="unknown engine argument.*max_batch_size"):
        EngineConfig.from_kwargs(str(llama_dir), max_batch_size=8)


def test_tokenizer_argument_is_used(llama_dir: Path, model_factory: Any) -> None:
    other = model_factory("qwen3")
    llm = LLM(str(llama_dir), tokenizer=str(other), num_kv_blocks=16)
    assert llm.tokenizer.chat_template == LLM(str(other), num_kv_blocks=16).tokenizer.chat_template


def test_default_kv_pool_follows_free_memory(llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import batchllm.limits as limits_mod

    monkeypatch.setattr(limits_mod, "available_memory", lambda: 64 * 2**20)
    per_block = limits_of_config(EngineConfig.from_kwargs(str(llama_dir), num_kv_blocks=1))
    lim = limits_of_config(EngineConfig.from_kwargs(str(llama_dir)))
    weights = sum(f.stat().st_size for f in llama_dir.glob("*.safetensors"))
    assert lim.num_kv_blocks == (32 * 2**20 - weights) // (per_block.kv_bytes_per_token * 16)
    assert "50% of the 0.1 GiB of memory available" in lim.kv_note
    half = limits_of_config(EngineConfig.from_kwargs(str(llama_dir), gpu_memory_utilization=0.25))
    assert half.num_kv_blocks == (16 * 2**20 - weights) // (per_block.kv_bytes_per_token * 16)
    assert limits_of_config(EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory="1MiB")).kv_note == ""
    LLM(str(llama_dir), gpu_memory_utilization=0.25)
    assert "[batchllm] KV cache" in capsys.readouterr().err
    monkeypatch.setattr(limits_mod, "available_memory", lambda: None)  # not Linux: the fixed default
    assert limits_of_config(EngineConfig.from_kwargs(str(llama_dir))).num_kv_blocks * 16 * \
        per_block.kv_bytes_per_token == 2 * 2**30
    monkeypatch.setattr(limits_mod, "available_memory", lambda: weights)  # the weights leave nothing
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        limits_of_config(EngineConfig.from_kwargs(str(llama_dir)))


def test_sampling_params_vllm_fields_only_when_neutral() -> None:
    SamplingParams(presence_penalty=0.0, frequency_penalty=0, repetition_penalty=1.0, include_stop_str_in_output=False,
                   prompt_logprobs=None, detokenize=True)
    for kw in (dict(detokenize=False),):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name}=.* is not supported by batchllm"):
            SamplingParams(**kw)
    SamplingParams(prompt_logprobs=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs must be an integer"):
            SamplingParams(prompt_logprobs=bad)


def test_sampling_params_penalties_and_constraints_validated() -> None:
    from batchllm import StructuredOutputsParams

    SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.1, include_stop_str_in_output=True,
                   logit_bias={3: -2.0}, allowed_token_ids=[1, 2], bad_words=["x"], truncate_prompt_tokens=4,
                   structured_outputs=StructuredOutputsParams(regex="a+"))
    for kw, msg in ((dict(presence_penalty=3), "presence_penalty must be in"),
                    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
                    (dict(logit_bias={"a": 1}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
                    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens")):
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()


# ---- prompts ---------------------------------------------------------------------------------

def test_one_prompt_as_token_ids(llm: LLM) -> None:
    one = llm.generate([504, 3575 % 1000], greedy(), use_tqdm=False)
    assert len(one) == 1 and one[0].prompt_token_ids == [504, 575]
    assert one[0].outputs[0].token_ids == llm.generate([[504, 575]], greedy(), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(TypeError, match="prompt 1: a prompt is"):
        llm.generate([[5, 6], 3.5], greedy(), use_tqdm=False)


def test_numpy_token_ids(llm: LLM) -> None:
    """Token ids as numpy arrays or numpy integers (what a Ray Dataset or pandas hands over) are
    prompts like Python ints; numpy bools and floats are not."""
    want = llm.generate([[504, 575], [7, 8, 9]], greedy(), use_tqdm=False)
    arrays = [np.array([504, 575], dtype=np.int64), {"prompt_token_ids": np.array([7, 8, 9], dtype=np.int32)}]
    for prompts in (arrays, [[np.int64(504), np.uint16(575)], [7, np.int32(8), 9]]):
        got = llm.generate(prompts, greedy(), use_tqdm=False)
        assert [o.prompt_token_ids for o in got] == [[504, 575], [7, 8, 9]]
        assert all(type(t) is int for o in got for t in o.prompt_token_ids)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    one = llm.generate(np.array([504, 575]), greedy(), use_tqdm=False)  # one prompt as a 1-D array
    assert len(one) == 1 and one[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    with pytest.raises(TypeError, match="prompt 0: a prompt is"):
        llm.generate([np.array([True, False])], greedy(), use_tqdm=False)
    with pytest.raises(TypeError, match="prompt 0: a prompt is.*prompt_token_ids of ndarray"):
        llm.generate([{"prompt_token_ids": np.array([1.0, 2.0])}], greedy(), use_tqdm=False)


def test_return_errors_isolates_invalid_prompts(llm: LLM) -> None:
    """With return_errors, each invalid prompt (unknown shape, empty, out of vocabulary, bad
    parameters, a constraint that does not compile) is its own output with `error` set; the
    others run exactly as they run alone. Without it, the call raises before anything runs."""
    from batchllm import StructuredOutputsParams

    v = llm.engine.model_config.vocab_size
    good = ["Hello there", [5, 6, 7], {"prompt_token_ids": np.array([9, 10])}]
    bad = [3.5, [], [v + 1], "fine", "also fine"]  # the last two: bad parameters (below)
    prompts = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4]]
    params = [greedy(), greedy(), greedy(), greedy(), greedy(), greedy(),
              SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(grammar="start: (((")),
              greedy(logit_bias={v + 5: 1.0})]
    with pytest.raises(TypeError, match="prompt 1"):
        llm.generate(prompts, params, use_tqdm=False)
    with pytest.raises(ValueError, match="4 invalid prompt.*prompt 1: the prompt is empty; prompt 2: token ids"):
        llm.generate(prompts[2:], params[2:], use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False, return_errors=True)
    assert [o.request_id for o in outs] == [str(i) for i in range(len(prompts))]
    failed = {i: o.error for i, o in enumerate(outs) if o.error is not None}
    assert sorted(failed) == [1, 3, 4, 6, 7]
    assert "a prompt is" in failed[1] and "empty" in failed[3] and str(v) in failed[4] and "logit_bias" in failed[7]
    assert all(outs[i].outputs == [] for i in failed)
    alone = llm.generate([good[0], good[1], good[2]], greedy(), use_tqdm=False)
    assert [outs[i].outputs[0].token_ids for i in (0, 2, 5)] == [o.outputs[0].token_ids for o in alone]
    assert all(o.error is None for o in alone)
    assert llm.last_run_stats.num_requests == 3
    everything_bad = llm.generate(bad[:3], greedy(), use_tqdm=False, return_errors=True)
    assert [o.error is not None for o in everything_bad] == [True] * 3


def test_stop_string_inside_min_tokens_does_not_stop(llm: LLM) -> None:
    """A stop string the first `min_tokens` tokens produce is not a stop: only a match that ends
    in text generated after them is (as vLLM). The old rule cut the output after the fact."""
    tok = llm.tokenizer
    checked = 0
    for prompt in ("1, 2, 3, 4,", "The quick brown fox", "Water is made of", "Once upon a time"):
        full = llm.generate(prompt, greedy(16), use_tqdm=False)[0].outputs[0].token_ids
        m = 4
        early = tok.decode(full[:m])
        stop = early.strip()[:2]
        if not stop:
            continue
        floor = len(early)
        # the first k >= m whose text has a match ending after the first m tokens' text
        k = next((k for k in range(m, len(full) + 1)
                  if tok.decode(full[:k]).find(stop, max(0, floor - len(stop) + 1)) >= 0), None)
        out = llm.generate(prompt, greedy(16, stop=[stop], min_tokens=m), use_tqdm=False)[0].outputs[0]
        if k is None:
            assert out.token_ids == full and out.finish_reason == "length"
        else:
            text = tok.decode(full[:k])
            assert out.token_ids == full[:k] and out.finish_reason == "stop" and out.stop_reason == stop
            assert out.text == text[:text.find(stop, max(0, floor - len(stop) + 1))]
            assert len(out.text) >= floor - len(stop) + 1
        checked += 1
    assert checked >= 3


# ---- chat ------------------------------------------------------------------------------------

def test_chat_content_parts_and_template_options(model_factory: Any) -> None:
    llm = LLM(str(model_factory("qwen3")), dtype="float32", num_kv_blocks=64)
    tok = llm.tokenizer
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello\nthere"}]
    a = llm.chat(parts, greedy(4), use_tqdm=False)[0]
    b = llm.chat(plain, greedy(4), use_tqdm=False)[0]
    assert a.prompt == b.prompt and a.outputs[0].token_ids == b.outputs[0].token_ids
    with pytest.raises(ValueError, match="only text content parts"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], use_tqdm=False)
    # chat_template_kwargs reach the template (as Qwen3's enable_thinking=False: an empty think block)
    thinking = ("{% for m in messages %}<{{ m.content }}>{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}")
    off = llm.chat(plain, greedy(2), use_tqdm=False, chat_template=thinking,
                   chat_template_kwargs={"enable_thinking": False})[0].prompt
    assert off == "<Hello\nthere><think></think>"
    assert tok.apply_chat_template(plain, chat_template=thinking) == "<Hello\nthere>"
    # no generation prompt; continue the last message
    conv = plain + [{"role": "assistant", "content": "Sure, the"}]
    cont = llm.chat(conv, greedy(2), use_tqdm=False, add_generation_prompt=False, continue_final_message=True)[0]
    assert cont.prompt.endswith("Sure, the")
    assert not llm.chat(plain, greedy(2), use_tqdm=False, add_generation_prompt=False)[0].prompt.endswith(
        "assistant\n")
    with pytest.raises(ValueError, match="cannot both be true"):
        llm.chat(conv, use_tqdm=False, continue_final_message=True)
    with pytest.raises(ValueError, match="lora_request is not supported"):
        llm.chat(plain, greedy(2), False, object())
    with pytest.raises(ValueError, match="tools are not supported"):
        llm.chat(plain, greedy(2), use_tqdm=False, tools=[{"type": "function"}])
    with pytest.raises(ValueError, match="chat_template_content_format='openai'"):
        llm.chat(plain, greedy(2), use_tqdm=False, chat_template_content_format="openai")
    own = llm.chat(plain, greedy(2), use_tqdm=False, chat_template="{% for m in messages %}<{{ m.content }}>"
                   "{% endfor %}")[0]
    assert own.prompt == "<Hello\nthere>"


# ---- outputs ---------------------------------------------------------------------------------

def test_logprob_objects_and_metrics(llm: LLM) -> None:
    t0 = time.time()
    out = llm.generate([[5, 6, 7], [8, 9]], greedy(6, logprobs=3), use_tqdm=False)
    t1 = time.time()
    for o in out:
        c = o.outputs[0]
        for tid, step in zip(c.token_ids, c.logprobs):
            assert all(isinstance(v, Logprob) for v in step.values())
            assert sorted(v.rank for v in step.values()) == [1, 2, 3]
            assert step[tid].rank == 1  # greedy
            assert all(v.decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
                       for t, v in step.items())
        assert c.cumulative_logprob == pytest.approx(sum(s[t].logprob for t, s in zip(c.token_ids, c.logprobs)))
        m = o.metrics
        assert o.finished and c.finished() and o.prompt_logprobs is None
        assert t0 <= m.arrival_time <= m.first_token_time <= m.last_token_time <= m.finished_time <= t1
    # a sampled token outside the top k still gets its true rank
    sampled = llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=5.0, seed=1, max_tokens=8, logprobs=1),
                           use_tqdm=False)
    ranks = [s[t].rank for o in sampled for t, s in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
    assert max(ranks) > 1


def test_cached_tokens_count_only_reuse(llama_dir: Path) -> None:
    """An n=4 request's own prompt is computed for it: none of it is cached. A second request
    sharing the prefix reuses what the first computed."""
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256)
    prefix = list(range(10, 50))
    alone = llm.generate([prefix + [60, 61]], SamplingParams(n=4, temperature=0.8, seed=2, max_tokens=4),
                         use_tqdm=False)
    assert alone[0].num_cached_tokens == 0
    two = llm.generate([prefix + [60, 61], prefix + [70, 71, 72]], greedy(4), use_tqdm=False)
    assert sorted(o.num_cached_tokens for o in two) == [0, 40]
    for policy in ("fcfs", "fcfs-lru"):
        other = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256, policy=policy)
        assert other.generate([prefix + [60, 61]], SamplingParams(n=4, temperature=0.8, seed=2, max_tokens=4),
                              use_tqdm=False)[0].num_cached_tokens == 0
