"""Prompt log-probs (issue 23): equal to transformers' log_softmax over the same prompt (fp32),
under prefix sharing (members read their prefix positions from the group's prefix pass),
duplicates, single prompts, preemption and small chunks; and `LLM.loglikelihood`."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from batchllm import LLM, SamplingParams

FIRST_PLAIN_TOKEN = 5
K = 3


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    tok = lambda n: [rng.randrange(FIRST_PLAIN_TOKEN, 1024) for _ in range(n)]  # noqa: E731
    shared_a, shared_b = tok(37), tok(20)
    prompts = [shared_a + tok(rng.randrange(1, 12)) for _ in range(5)]  # one group, 37-token prefix
    prompts += [shared_b + tok(rng.randrange(1, 6)) for _ in range(3)]
    dup = tok(25)
    prompts += [dup, list(dup), list(dup)]  # duplicates
    prompts += [tok(30), tok(2), tok(1)]  # single prompts (a one-token prompt has only None)
    return prompts


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list[torch.Tensor]:
    """transformers' log_softmax per prompt: row t-1 scores token t."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in _prompts():
            logits = hf(torch.tensor([p])).logits[0].float()
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def _check(outputs, prompts, reference, k=K) -> None:
    for out, p, ref in zip(outputs, prompts, reference, strict=True):
        pl = out.prompt_logprobs
        assert pl is not None and len(pl) == len(p) and pl[0] is None
        for t in range(1, len(p)):
            d = pl[t]
            row = ref[t - 1]
            assert abs(d[p[t]].logprob - float(row[p[t]])) < 1e-4
            assert d[p[t]].rank == int((row > row[p[t]]).sum()) + 1
            top = row.topk(k)
            for r, (tid, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                assert tid in d and d[tid].rank == r + 1 and abs(d[tid].logprob - v) < 1e-4
            assert len(d) in (k, k + 1)
            assert d[p[t]].decoded_token is not None


@pytest.mark.parametrize("kwargs", [
    dict(num_kv_blocks=1024),  # groups share prefixes
    dict(num_kv_blocks=1024, max_num_batched_tokens=5),  # small chunks
    dict(num_kv_blocks=24, block_size=4, memory_centric=False, max_tokens=24),  # preemption (small pool)
    dict(num_kv_blocks=24, block_size=4, policy="fcfs", max_tokens=24),
    dict(num_kv_blocks=1024, policy="fcfs-lru"),  # the prefix cache is bypassed for them
])
def test_prompt_logprobs_match_transformers(llama_dir: Path, reference, kwargs) -> None:
    kwargs = dict(kwargs)
    max_tokens = kwargs.pop("max_tokens", 4)
    llm = LLM(str(llama_dir), dtype="float32", **kwargs)
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=K, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    _check(outs, prompts, reference)
    stats = llm.last_run_stats
    if kwargs.get("policy", "batchllm") == "batchllm" and not stats.preemptions:
        # sharing still happens: the shared prefixes are computed once
        assert stats.computed_prefill_tokens < stats.logical_prefill_tokens
    if kwargs.get("num_kv_blocks") == 24:
        assert stats.preemptions > 0


def test_prompt_logprobs_mixed_with_plain_requests(llama_dir: Path, reference) -> None:
    """Only asking members get prompt log-probs; the others' outputs are unchanged."""
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)
    prompts = _prompts()
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    params = [SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=i % 3 if i % 2 else None)
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, (o, q) in enumerate(zip(outs, plain)):
        assert o.outputs[0].token_ids == q.outputs[0].token_ids
        if i % 2:
            _check([o], [prompts[i]], [reference[i]], k=i % 3)
        else:
            assert o.prompt_logprobs is None


def test_loglikelihood_matches_transformers(llama_dir: Path, reference) -> None:
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)
    prompts = _prompts()
    pairs, expected = [], []
    for p, ref in zip(prompts, reference):
        if len(p) < 3:
            continue
        cut = len(p) - min(3, len(p) - 1)
        pairs.append((p[:cut], p[cut:]))
        lp = sum(float(ref[t - 1][p[t]]) for t in range(cut, len(p)))
        greedy = all(int(ref[t - 1].argmax()) == p[t] for t in range(cut, len(p)))
        expected.append((lp, greedy))
    # a greedy continuation, to see `is_greedy` true
    ctx = prompts[0][:36]
    greedy_cont = llm.generate([ctx], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids
    pairs.append((ctx, greedy_cont))
    results = llm.loglikelihood(pairs, use_tqdm=False)
    for (lp, greedy), (got_lp, got_greedy) in zip(expected, results):
        assert abs(lp - got_lp) < 1e-4 and greedy == got_greedy
    assert results[-1][1] is True
    # contexts are shared: the four pairs on one context compute it once
    llm.loglikelihood([(ctx, [t]) for t in range(10, 14)], use_tqdm=False)
    assert llm.last_run_stats.computed_prefill_tokens == len(ctx) + 4


def test_loglikelihood_text_pairs(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)
    (lp, greedy), = llm.loglikelihood([("the cat sat on", " the mat")], use_tqdm=False)
    ctx = llm.tokenizer.encode("the cat sat on")
    whole = llm.tokenizer.encode("the cat sat on the mat")
    (lp2, _), = llm.loglikelihood([(ctx, whole[len(ctx):])], use_tqdm=False)
    assert lp < 0 and isinstance(greedy, bool) and abs(lp - lp2) < 1e-6


def test_completions_echo_returns_prompt_logprobs(llama_dir: Path, tmp_path: Path, capsys) -> None:
    """`/v1/completions` with `echo: true` and `logprobs: k`: the text and the log-probs start
    with the prompt's (the first prompt token has null, null), in the completions shape."""
    import json

    from batchllm.cli import main

    d = "the of and to a in is it that was for on are as with his they at be this have from " * 2
    prompts = [f"{d} item {i}" for i in range(3)]
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": p, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2}}
             for i, p in enumerate(prompts)]
    lines.append({"custom_id": "plain", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": prompts[0], "max_tokens": 3, "temperature": 0, "echo": True}})
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["run-batch", "-i", str(inp), "-o", str(outp), "--model", str(llama_dir), "--dtype", "float32"]) == 0
    got = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in map(json.loads, outp.read_text().splitlines())}
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=256)
    want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2),
                        use_tqdm=False)
    for i, w in enumerate(want):
        c = got[f"r{i}"]
        assert c["text"] == prompts[i] + w.outputs[0].text
        lp = c["logprobs"]
        n = len(w.prompt_token_ids)
        assert len(lp["tokens"]) == n + 3 and "".join(lp["tokens"]) == c["text"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for t in range(1, n):
            want_lp = w.prompt_logprobs[t][w.prompt_token_ids[t]].logprob
            assert abs(lp["token_logprobs"][t] - want_lp) < 1e-5
            assert len(lp["top_logprobs"][t]) in (2, 3)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][n] == len(prompts[i])
    assert got["plain"]["text"] == prompts[0] + want[0].outputs[0].text and got["plain"]["logprobs"] is None


def test_prompt_logprobs_with_several_samples(llama_dir: Path, reference) -> None:
    """n samples of a prompt share its prompt log-probs (the request has one list)."""
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=2, prompt_logprobs=1),
                        use_tqdm=False)
    _check(outs, prompts, reference, k=1)
