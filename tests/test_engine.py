"""The core engine (issue 2): greedy equality with transformers, invariance of outputs under
batching / order / preemption / chunked prefill, sampling, stops, logprobs, bf16, input errors.

transformers is the oracle only: it is imported lazily and every HF model is loaded once.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchllm import LLM, SamplingParams

NEW_TOKENS = 16
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small, so that the test model's positions (up to ~80) cross every regime
               "original_max_position_embeddings": 64}

# name -> (arch, overrides); "test" shape: hidden 64, 4 heads, 2 KV heads (GQA), vocab 1024.
ORACLE_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", {}),
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-tied": ("llama", {"tie_word_embeddings": True, "num_hidden_layers": 4}),
    "qwen2": ("qwen2", {}),
    "mistral": ("mistral", {}),
    "qwen3": ("qwen3", {}),
}


def greedy(max_tokens: int = NEW_TOKENS, **kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def tokens(outs: list) -> list[list[int]]:
    """The token ids of every completion, request by request (sample order within a request)."""
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def ids_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)


@pytest.fixture(scope="module")
def batch50(random_prompts: Callable[..., list[list[int]]]) -> list[list[int]]:
    return random_prompts(50, 5, 60, seed=50)


@pytest.fixture(scope="module")
def batch50_reference(llm: LLM, batch50: list[list[int]]) -> list[list[int]]:
    outs = llm.generate(batch50, greedy(), use_tqdm=False)
    assert [o.request_id for o in outs] == [str(i) for i in range(len(batch50))]
    assert [o.prompt_token_ids for o in outs] == batch50
    assert llm.last_run_stats.preemptions == 0
    assert llm.last_run_stats.kv_blocks_in_use_at_end == 0
    return [o.outputs[0].token_ids for o in outs]


# ---- greedy equality with transformers ------------------------------------------------------

@pytest.mark.parametrize("name", list(ORACLE_MODELS))
def test_greedy_matches_transformers(name: str, model_factory: Callable[..., Path],
                                     random_prompts: Callable[..., list[list[int]]]) -> None:
    """One batched generate call of 8 mixed-length prompts equals HF generate prompt by prompt,
    token for token; the engine's top-5 logprobs equal HF's log-softmaxed logits."""
    import transformers
    arch, overrides = ORACLE_MODELS[name]
    path = model_factory(arch, **overrides)
    prompts = random_prompts(8, 5, 60, seed=list(ORACLE_MODELS).index(name))
    llm = LLM(str(path), dtype="float32", num_kv_blocks=256)
    outs = llm.generate(ids_prompts(prompts), greedy(logprobs=5), use_tqdm=False)
    assert llm.last_run_stats.steps < len(prompts) * NEW_TOKENS  # really batched

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        with torch.no_grad():
            r = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        expected = r.sequences[0, len(prompt):].tolist()
        got = out.outputs[0]
        assert got.token_ids == expected, f"{name}: prompt {i} ({len(prompt)} tokens) differs"
        assert len(got.logprobs) == NEW_TOKENS
        for step, (ours, logits) in enumerate(zip(got.logprobs, r.logits)):
            ref = torch.log_softmax(logits[0].float(), dim=-1)
            for tok, lp in ours.items():
                assert lp.logprob == pytest.approx(ref[tok].item(), abs=2e-4), (name, i, step, tok)

    if name == "llama-tied":
        model = llm.engine.runner.model
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    if name == "llama-llama3-rope":  # the scaling really changes the model (same weights otherwise)
        plain = LLM(str(model_factory(arch)), dtype="float32", num_kv_blocks=256)
        assert tokens(plain.generate(ids_prompts(prompts), greedy(), use_tqdm=False)) != tokens(outs)


# ---- invariance ------------------------------------------------------------------------------

def test_alone_equals_in_batch(llm: LLM, batch50: list[list[int]], batch50_reference: list[list[int]]) -> None:
    for i in (0, 17, 31, 49):
        alone = llm.generate([batch50[i]], greedy(), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == batch50_reference[i], f"prompt {i}"
    # the mixed lengths really mix: some prompt's output differs from another's
    assert len({tuple(t) for t in batch50_reference}) == len(batch50_reference)


def test_reversed_order(llm: LLM, batch50: list[list[int]], batch50_reference: list[list[int]]) -> None:
    outs = llm.generate(batch50[::-1], greedy(), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == batch50[::-1]  # input order out
    assert [o.outputs[0].token_ids for o in outs] == batch50_reference[::-1]


@pytest.mark.parametrize("kwargs", [dict(policy="fcfs"), dict(policy="batchllm", memory_centric=False)],
                         ids=["fcfs", "batchllm-no-memory-centric"])
def test_preemption_leaves_outputs_unchanged(llama_dir: Path, kwargs: dict, batch50: list[list[int]],
                                             batch50_reference: list[list[int]]) -> None:
    # 12 blocks of 16 = 192 KV tokens: the longest prompt + 16 outputs (76 tokens) fits, 50 do not.
    small = LLM(str(llama_dir), dtype="float32", num_kv_blocks=12, **kwargs)
    outs = small.generate(batch50, greedy(), use_tqdm=False)
    stats = small.last_run_stats
    assert stats.preemptions > 0
    assert stats.peak_kv_blocks <= 12
    assert stats.kv_blocks_in_use_at_end == 0
    assert [o.outputs[0].token_ids for o in outs] == batch50_reference


def test_chunked_prefill_leaves_outputs_unchanged(llama_dir: Path, batch50: list[list[int]],
                                                  batch50_reference: list[list[int]]) -> None:
    chunked = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024, max_num_batched_tokens=7)
    outs = chunked.generate(batch50, greedy(), use_tqdm=False)
    stats = chunked.last_run_stats
    assert max(stats.tokens_per_step) <= 7
    assert stats.computed_prefill_tokens >= sum(map(len, batch50))
    assert [o.outputs[0].token_ids for o in outs] == batch50_reference


def test_max_num_seqs_cap(llama_dir: Path, batch50: list[list[int]], batch50_reference: list[list[int]]) -> None:
    capped = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024, policy="fcfs", max_num_seqs=3)
    outs = capped.generate(batch50[:12], greedy(), use_tqdm=False)
    # at most 3 sequences per step: a step computes at most 3 decode tokens once prompts are in
    assert capped.last_run_stats.steps >= 12 * NEW_TOKENS // 3
    assert [o.outputs[0].token_ids for o in outs] == batch50_reference[:12]


# ---- sampling --------------------------------------------------------------------------------

SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True)


def test_seeded_sampling_reproducible_and_batch_independent(llm: LLM, batch50: list[list[int]]) -> None:
    probes = batch50[:4]
    params = [SamplingParams(seed=1000 + i, **SAMPLED) for i in range(4)]
    alone = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(probes, params)]

    # the same requests among 20 others (greedy and differently seeded), in reversed order
    others = batch50[10:30]
    other_params = [greedy() if k % 2 else SamplingParams(seed=k, **SAMPLED) for k in range(len(others))]
    prompts = (probes + others)[::-1]
    all_params = (params + other_params)[::-1]
    outs = llm.generate(prompts, all_params, use_tqdm=False)
    mixed = [o.outputs[0].token_ids for o in outs][::-1][:4]
    assert mixed == alone

    again = llm.generate(probes, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == alone

    # it really samples: not the greedy output, and another seed gives another output
    greedy_out = [o.outputs[0].token_ids for o in llm.generate(probes, greedy(12), use_tqdm=False)]
    assert greedy_out != alone
    reseeded = llm.generate(probes, [SamplingParams(seed=2000 + i, **SAMPLED) for i in range(4)], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in reseeded] != alone


def test_unseeded_sampling_follows_engine_seed(llm: LLM, llama_dir: Path, batch50: list[list[int]]) -> None:
    probes = batch50[:4]
    params = SamplingParams(**SAMPLED)
    first = tokens(llm.generate(probes, params, use_tqdm=False))
    assert tokens(llm.generate(probes, params, use_tqdm=False)) == first  # reproducible
    # independent of batch composition and order
    bigger = llm.generate((probes + batch50[20:30])[::-1], params, use_tqdm=False)
    assert tokens(bigger)[::-1][:4] == first
    alone = tokens(llm.generate([probes[2]], params, use_tqdm=False))
    assert alone[0] == first[2]
    # the same engine seed in a fresh engine gives the same samples; another seed others
    assert tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, seed=0)
                  .generate(probes, params, use_tqdm=False)) == first
    assert tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, seed=1)
                  .generate(probes, params, use_tqdm=False)) != first
    # two identical unseeded requests in one batch are sampled independently
    twice = tokens(llm.generate([probes[0], probes[0]], params, use_tqdm=False))
    assert twice[0] != twice[1]


def test_sampling_unchanged_by_preemption_and_chunking(llm: LLM, llama_dir: Path, batch50: list[list[int]]) -> None:
    """Recomputing a preempted sequence or chunking its prefill draws no random numbers: samples
    (and their logprobs) stay the same."""
    params = SamplingParams(seed=3, logprobs=2, **SAMPLED)
    prompts = batch50[:30]
    ref = llm.generate(prompts, params, use_tqdm=False)
    for kwargs in (dict(policy="fcfs", num_kv_blocks=12), dict(max_num_batched_tokens=7, num_kv_blocks=1024)):
        other = LLM(str(llama_dir), dtype="float32", **kwargs)
        outs = other.generate(prompts, params, use_tqdm=False)
        if "policy" in kwargs:
            assert other.last_run_stats.preemptions > 0
        assert tokens(outs) == tokens(ref)
        for a, b in zip(outs, ref):
            assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-4)


def test_sampling_filters(llm: LLM, batch50: list[list[int]]) -> None:
    """top_k=1, a tiny top_p and min_p=1 leave only the most likely token: greedy. With top_k=5
    every sampled token is among the 5 most likely (the logprobs dict then has just those 5)."""
    prompts = batch50[:6]
    ref = tokens(llm.generate(prompts, greedy(10), use_tqdm=False))
    base = dict(temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    for filt in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        assert tokens(llm.generate(prompts, SamplingParams(**base, **filt), use_tqdm=False)) == ref, filt
    outs = llm.generate(prompts, SamplingParams(**base, top_k=5, logprobs=5), use_tqdm=False)
    assert tokens(outs) != ref
    for o in outs:
        for tok, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs):
            assert tok in step and len(step) == 5


def test_n_gives_n_distinct_completions(llm: LLM, batch50: list[list[int]]) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    outs = llm.generate(batch50[:2], params, use_tqdm=False)
    assert len(outs) == 2
    for o in outs:
        assert [c.index for c in o.outputs] == [0, 1, 2]
        assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in o.outputs)
        assert len({tuple(c.token_ids) for c in o.outputs}) == 3
    assert tokens(llm.generate(batch50[:2], params, use_tqdm=False)) == tokens(outs)
    # greedy n=2: two identical completions
    g = llm.generate([batch50[0]], greedy(8, n=2), use_tqdm=False)[0]
    assert len(g.outputs) == 2 and g.outputs[0].token_ids == g.outputs[1].token_ids


# ---- stops -----------------------------------------------------------------------------------

TEXT_PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a little",
                "Water is made of", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def full_greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(TEXT_PROMPTS, greedy(), use_tqdm=False)]


def test_stop_string_ends_generation_and_is_cut(llm: LLM, full_greedy: list[list[int]]) -> None:
    tok = llm.tokenizer
    checked = 0
    for prompt, full in zip(TEXT_PROMPTS, full_greedy):
        text = tok.decode(full)
        # a stop string known to occur: 3 non-blank characters from the middle of the output
        starts = [i for i in range(len(text) // 3, len(text) - 3) if text[i:i + 3].strip() == text[i:i + 3]]
        if not starts:
            continue
        stop = text[starts[0]:starts[0] + 3]
        # the engine must stop at the first token whose decoded output contains the stop string
        m = next(k for k in range(1, len(full) + 1) if stop in tok.decode(full[:k]))
        out = llm.generate(prompt, greedy(stop=[stop, "never-occurs-\u2603"]), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full[:m]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        decoded = tok.decode(full[:m])
        assert out.text == decoded[:decoded.find(stop)]
        assert stop not in out.text
        assert text.startswith(out.text)
        checked += 1
    assert checked >= 2


def test_stop_token_ids(llm: LLM, full_greedy: list[list[int]]) -> None:
    for prompt, full in zip(TEXT_PROMPTS, full_greedy):
        t = full[5]
        j = full.index(t)
        out = llm.generate(prompt, greedy(stop_token_ids=[t]), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full[:j + 1]
        assert out.finish_reason == "stop" and out.stop_reason == t
    # a stop token that never comes: the run ends by length
    unused = next(t for t in range(1000, 5, -1) if all(t not in f for f in full_greedy))
    outs = llm.generate(TEXT_PROMPTS, greedy(stop_token_ids=[unused]), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == full_greedy
    assert all(o.outputs[0].finish_reason == "length" and o.outputs[0].stop_reason is None for o in outs)


def test_min_tokens(llm: LLM, full_greedy: list[list[int]]) -> None:
    for prompt, full in zip(TEXT_PROMPTS, full_greedy):
        t = full[1]
        min_tokens = full.index(t) + 3
        out = llm.generate(prompt, greedy(stop_token_ids=[t], min_tokens=min_tokens), use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) >= min_tokens
        assert t not in out.token_ids[:min_tokens]  # banned until min_tokens, as vLLM and transformers do
        if out.finish_reason == "stop":
            assert out.token_ids[-1] == t and out.stop_reason == t
        else:
            assert len(out.token_ids) == NEW_TOKENS
        out = llm.generate(prompt, greedy(stop_token_ids=[t], min_tokens=NEW_TOKENS), use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == NEW_TOKENS and out.finish_reason == "length"


def test_min_tokens_bans_eos_and_stop_ids_in_the_sampler() -> None:
    from batchllm.executor.sampler import Sampler
    from batchllm.sequence import Sequence

    logits = torch.zeros(4, 10)
    logits[:, 7], logits[:, 3], logits[:, 5] = 3.0, 2.0, 1.0  # 7 (EOS) best, then 3 (a stop id), then 5
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3]),  # both banned
              SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], ignore_eos=True),  # EOS allowed
              SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[3]),  # min_tokens reached below
              SamplingParams(temperature=0, stop_token_ids=[3])]
    seqs = [Sequence(i, i, 0, [1, 2], 2, p) for i, p in enumerate(params)]
    seqs[2].token_ids.append(4)  # one output token already
    with torch.inference_mode():
        out = logits.clone()  # the model's logits are inference tensors; the sampler must not write them
    assert Sampler()(out, seqs, [7]).token_ids == [5, 7, 7, 7]
    assert torch.equal(out, logits)


# ---- logprobs --------------------------------------------------------------------------------

def test_logprobs_shape(llm: LLM, batch50: list[list[int]]) -> None:
    for params, k in ((greedy(8, logprobs=3), 3), (greedy(8, logprobs=0), 0),
                      (SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=2), 2)):
        for o in llm.generate(batch50[:3], params, use_tqdm=False):
            c = o.outputs[0]
            assert len(c.logprobs) == len(c.token_ids) == 8
            for tok, step in zip(c.token_ids, c.logprobs):
                assert tok in step
                assert k <= len(step) <= k + 1
                assert all(v.logprob <= 1e-6 for v in step.values())
                if params.greedy:
                    assert len(step) == max(k, 1) and step[tok].logprob == max(v.logprob for v in step.values())
            assert c.cumulative_logprob == pytest.approx(sum(s[t].logprob for t, s in zip(c.token_ids, c.logprobs)),
                                                         abs=1e-4)
    c = llm.generate(batch50[:1], greedy(4), use_tqdm=False)[0].outputs[0]
    assert c.logprobs is None and c.cumulative_logprob is None


# ---- bf16 ------------------------------------------------------------------------------------

def test_bf16_runs_and_agrees_with_fp32(llama_dir: Path, llm: LLM, batch50: list[list[int]],
                                        batch50_reference: list[list[int]]) -> None:
    bf = LLM(str(llama_dir), dtype="bfloat16", num_kv_blocks=1024)
    assert bf.engine.dtype == torch.bfloat16 and bf.engine.runner.kv_cache.dtype == torch.bfloat16
    outs = bf.generate(batch50, greedy(4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)
    agree = sum(o.outputs[0].token_ids[0] == ref[0] for o, ref in zip(outs, batch50_reference))
    assert agree >= 0.7 * len(batch50), f"bf16 agrees with fp32 on the first token of {agree}/{len(batch50)}"


# ---- inputs and outputs ----------------------------------------------------------------------

def test_prompt_forms_and_input_order(llm: LLM) -> None:
    text = TEXT_PROMPTS[0]
    ids = llm.tokenizer.encode(text)
    assert ids[0] == 0  # llama: BOS added
    outs = llm.generate([text, ids, {"prompt_token_ids": ids}, {"prompt": text}], greedy(6), use_tqdm=False)
    assert [o.request_id for o in outs] == ["0", "1", "2", "3"]
    assert outs[0].prompt == text and outs[1].prompt is None
    assert all(o.prompt_token_ids == ids for o in outs)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].outputs[0].text == llm.tokenizer.decode(outs[0].outputs[0].token_ids)
    # a single prompt (not a list) gives a list of one
    single = llm.generate(text, greedy(6), use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
    # one SamplingParams per prompt, kept with its prompt
    per = llm.generate([ids, ids, ids], [greedy(2), greedy(5), greedy(3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in per] == [2, 5, 3]
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate([ids, ids, ids], [greedy(2), greedy(5)], use_tqdm=False)


def test_invalid_prompts_rejected_before_running(llm: LLM) -> None:
    before = llm.last_run_stats
    vocab = llm.engine.model_config.vocab_size
    too_long = [7] * llm.engine.max_model_len
    prompts = [[5, 6, 7], [], too_long, [5, vocab], [5, 6], [-1, 5]]
    with pytest.raises(ValueError) as e:
        llm.generate(prompts, greedy(4), use_tqdm=False)
    msg = str(e.value)
    for i in (1, 2, 3, 5):
        assert f"prompt {i}:" in msg
    assert "prompt 0:" not in msg and "prompt 4:" not in msg
    assert "empty" in msg and "max_model_len" in msg and str(vocab) in msg
    assert llm.last_run_stats is before  # nothing ran


def test_invalid_sampling_params() -> None:
    for bad in (dict(top_p=0), dict(temperature=-1), dict(n=0), dict(max_tokens=0), dict(top_k=-2),
                dict(min_p=1.5), dict(min_tokens=5, max_tokens=2), dict(logprobs=-1), dict(stop=[""])):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_invalid_sampling_params_name_the_prompt(llm: LLM) -> None:
    bad = greedy(4)
    bad.top_p = 0  # mutated after construction: caught by validation, naming the prompt
    with pytest.raises(ValueError, match=r"prompt 1: .*top_p"):
        llm.generate([[5, 6], [5, 7], [5, 8]], [greedy(4), bad, greedy(4)], use_tqdm=False)


def test_unknown_engine_argument(llama_dir: Path) -> None:
    with pytest.raises(TypeError, match="max_batch_size"):
        LLM(str(llama_dir), max_batch_size=8)
    with pytest.raises(ValueError, match="policy"):
        LLM(str(llama_dir), policy="random")


def test_max_model_len(llama_dir: Path) -> None:
    short = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, max_model_len=32)
    with pytest.raises(ValueError, match="prompt 0: .*max_model_len"):
        short.generate([[5] * 32], greedy(4), use_tqdm=False)
    out = short.generate([[5] * 28], greedy(16), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"  # capped by max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(llama_dir), max_model_len=10**6)


# ---- chat ------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours."},
    {"role": "assistant", "content": "Red, green, blue."},
    {"role": "user", "content": "And two more?"},
]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chat_renders_the_template_like_transformers(arch: str, model_factory: Callable[..., Path]) -> None:
    import transformers
    path = model_factory(arch)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64)
    convs = [CONVERSATION, CONVERSATION[:2]]
    outs = llm.chat(convs, greedy(4), use_tqdm=False)
    for conv, out in zip(convs, outs):
        expected = hf_tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        if not isinstance(expected, list):
            expected = expected["input_ids"]
        assert out.prompt_token_ids == list(expected)
        assert out.prompt == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert out.prompt.endswith("<|im_start|>assistant\n")
    # a single conversation is accepted too
    one = llm.chat(CONVERSATION, greedy(4), use_tqdm=False)
    assert len(one) == 1 and one[0].prompt_token_ids == outs[0].prompt_token_ids


def test_keep_heap_is_applied_on_cpu_unless_switched_off(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import batchllm.engine as engine_module
    calls: list[bool] = []
    monkeypatch.setattr(engine_module, "keep_heap", lambda: calls.append(True) or True)
    LLM(llama_dir, num_kv_blocks=8, keep_heap=False)
    assert calls == []
    LLM(llama_dir, num_kv_blocks=8)
    assert calls == [True]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_heap_is_accepted_by_glibc() -> None:
    from batchllm.executor.malloc import keep_heap
    assert keep_heap() is True


def test_cpu_kernels_follow_the_switch(llama_dir: Path) -> None:
    from batchllm.attention.executor import ExecutorKind
    from batchllm.kernels.cpu import load_cpu_kernels

    def executor(llm: LLM) -> tuple:
        ex = llm.engine.runner.backend.executor
        return ex.kind, getattr(ex, "kernels", None)

    kernels = load_cpu_kernels()
    assert executor(LLM(llama_dir, num_kv_blocks=8, cpu_kernels=False)) == (ExecutorKind.TORCH, None)
    # head size 16 has no fast C prefill: decode queries in C, prefill chunks in PyTorch
    assert executor(LLM(llama_dir, num_kv_blocks=8)) == ((ExecutorKind.CPU_DECODE_KERNELS, kernels) if kernels
                                                         else (ExecutorKind.TORCH, None))
    # a dtype they do not take
    assert executor(LLM(llama_dir, num_kv_blocks=8, dtype="float16")) == (ExecutorKind.TORCH, None)


def test_float16_runs_the_prefix_shared_path(llama_dir: Path) -> None:
    """float16 has no C kernels: group members' decodes take the PyTorch shared path."""
    llm = LLM(llama_dir, dtype="float16", attention="prefix-shared", num_kv_blocks=64)
    prefix = list(range(10, 60))
    outs = llm.generate([prefix + [70 + i, 80 + i] for i in range(6)], SamplingParams(temperature=0, max_tokens=4),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4] * 6
