"""Structured outputs (issue 20): the random test model's constrained outputs (noise) always
parse and validate; constraints mix with free requests and with each other; outputs do not
depend on the batch or on preemption; a constraint that does not compile is its request's error."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from batchllm import LLM, SamplingParams, StructuredOutputsParams

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "additionalProperties": False, "required": ["name", "age"],
     "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    {"type": "object", "additionalProperties": False, "required": ["label", "score"],
     "properties": {"label": {"enum": ["positive", "negative", "neutral"]}, "score": {"type": "integer", "minimum": 1, "maximum": 5}}},
    {"type": "object", "additionalProperties": False, "required": ["tags"],
     "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                             "minItems": 1, "maxItems": 4}}},
    {"type": "object", "additionalProperties": False, "required": ["user", "ok"],
     "properties": {"user": {"type": "object", "additionalProperties": False, "required": ["id", "roles"],
                             "properties": {"id": {"type": "string", "pattern": "^u[0-9]{3}$"},
                                            "roles": {"type": "array", "maxItems": 2,
                                                      "items": {"enum": ["admin", "dev", "ops"]}}}},
                    "ok": {"type": "boolean"}}},
    {"type": "array", "minItems": 2, "maxItems": 3,
     "items": {"type": "object", "additionalProperties": False, "required": ["k"],
               "properties": {"k": {"type": "integer", "minimum": -9, "maximum": 9}}}},
]
REGEXES = [r"[A-Z][a-z]{2,5} [0-9]{1,3}", r"(yes|no|maybe)!", r"\d{4}-\d{2}-\d{2}", r"[a-f0-9]{8}"]
# Bounded (the random model may repeat forever inside an unbounded list).
LARK = 'start: "(" NUM ")" | "(" NUM "," NUM ")" | "(" NUM "," NUM "," NUM ")"\nNUM: /[0-9]{1,2}/\n'
CHOICES = [["red", "green", "blue"], ["cat", "dog"], ["A", "B", "C", "D"]]


def so(**kw: Any) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def constrained(c: StructuredOutputsParams, seed: int | None = None, temperature: float = 1.0,
                max_tokens: int = 160) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens, structured_outputs=c)


def check(c: StructuredOutputsParams, text: str) -> None:
    """The output satisfies its constraint."""
    if c.json is not None:
        jsonschema.validate(json.loads(text), json.loads(c.json) if isinstance(c.json, str) else c.json)
    elif c.json_object:
        assert isinstance(json.loads(text), dict)
    elif c.regex is not None:
        assert re.fullmatch(c.regex, text), (c.regex, text)
    elif c.choice is not None:
        assert text in c.choice


def twenty() -> list[StructuredOutputsParams]:
    """20 different constraints: the schemas (and variants of them), regexes, choices, a Lark
    grammar."""
    out = [so(json=s) for s in SCHEMAS]
    out += [so(json=json.dumps({**s, "title": f"v{i}"})) for i, s in enumerate(SCHEMAS)]  # text form, new content
    out += [so(regex=r) for r in REGEXES] + [so(choice=c) for c in CHOICES]
    out += [so(grammar=LARK), so(regex=r"[a-z]{3}"),
            so(choice=["one", "two"])]
    assert len(out) == 20 and len({c.key() for c in out}) == 20
    return out


@pytest.fixture(scope="module")
def llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=1024)


def test_json_schemas_always_validate(llm: LLM, random_prompts: Callable[..., list[list[int]]]) -> None:
    prompts = random_prompts(len(SCHEMAS) * 4, 3, 30, seed=1)
    params = [constrained(so(json=SCHEMAS[i % len(SCHEMAS)]), seed=i, temperature=0 if i % 4 == 0 else 1.2)
              for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(params, outs):
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
        check(p.structured_outputs, o.outputs[0].text)
    assert llm.last_run_stats.grammar_mask_steps > 0


def test_regexes_choices_grammar_validate(llm: LLM, random_prompts: Callable[..., list[list[int]]]) -> None:
    cs = [so(regex=r) for r in REGEXES] + [so(choice=c) for c in CHOICES]
    prompts = random_prompts(len(cs) * 3, 3, 20, seed=2)
    params = [constrained(cs[i % len(cs)], seed=i) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, o in zip(params, outs):
        assert o.outputs[0].finish_reason == "stop"
        check(p.structured_outputs, o.outputs[0].text)
    lark = constrained(so(grammar=LARK), seed=0)
    text = llm.generate("x", lark, use_tqdm=False)[0].outputs[0].text
    assert re.fullmatch(r"\(\d{1,2}(,\d{1,2}){0,2}\)", text)


def mixed_batch(random_prompts: Callable[..., list[list[int]]]) -> tuple[list[list[int]], list[SamplingParams]]:
    """20 constraints, each greedy and seeded, among free requests (greedy and seeded)."""
    cs = twenty()
    prompts = random_prompts(60, 3, 40, seed=3)
    params = []
    for i in range(60):
        if i % 3 == 2:
            params.append(SamplingParams(temperature=0 if i % 2 else 0.9, seed=i, max_tokens=12, ignore_eos=True))
        else:
            params.append(constrained(cs[(i // 3) % 20], seed=i, temperature=0 if i % 2 else 1.0))
    return prompts, params


def test_twenty_constraints_with_free_requests_invariant(llama_dir: Path, llm: LLM,
                                                         random_prompts: Callable[..., list[list[int]]]) -> None:
    prompts, params = mixed_batch(random_prompts)
    ids = [{"prompt_token_ids": p} for p in prompts]
    outs = llm.generate(ids, params, use_tqdm=False)
    batch = [o.outputs[0].token_ids for o in outs]
    for p, o in zip(params, outs):
        if p.structured_outputs is not None:
            assert o.outputs[0].finish_reason == "stop"
            check(p.structured_outputs, o.outputs[0].text)
        else:
            assert len(o.outputs[0].token_ids) == 12
    for i in (0, 1, 2, 5, 13, 40):  # alone equals in the batch
        assert llm.generate([ids[i]], [params[i]], use_tqdm=False)[0].outputs[0].token_ids == batch[i], i
    small = LLM(str(llama_dir), dtype="float32", num_kv_blocks=14, policy="fcfs")
    assert [o.outputs[0].token_ids for o in small.generate(ids, params, use_tqdm=False)] == batch
    assert small.last_run_stats.preemptions > 0


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_overlapped_masks_equal_the_reference_path(llama_dir: Path, random_prompts: Callable[..., list[list[int]]],
                                                   cpu_kernels: bool) -> None:
    """Masks filled in the worker thread during the forward pass (`grammar_overlap`, the default)
    give the reference path's tokens (masks filled in the sampler) on the mixed batch, with the
    group policy and under preemption; with the C kernel applying them and without it."""
    prompts, params = mixed_batch(random_prompts)
    ids = [{"prompt_token_ids": p} for p in prompts]
    runs = {}
    for overlap in (False, True):
        for blocks, policy in ((1024, "batchllm"), (14, "fcfs")):
            llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=blocks, policy=policy, cpu_kernels=cpu_kernels,
                      grammar_overlap=overlap)
            runs[overlap, policy] = [o.outputs[0].token_ids for o in llm.generate(ids, params, use_tqdm=False)]
            stats = llm.last_run_stats
            assert stats.grammar_mask_steps > 0 and stats.grammar_fill_time_s > 0
            assert stats.preemptions > 0 or policy == "batchllm"
    reference = runs[False, "batchllm"]
    assert all(r == reference for r in runs.values())


def test_json_object(llm: LLM) -> None:
    """Any JSON object; the random model's objects may be long, so only finished ones are read."""
    outs = llm.generate(["a", "b", "c", "d"], [constrained(so(json_object=True), seed=i, max_tokens=300)
                                               for i in range(4)], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(t.startswith("{") for t in texts)
    for o in outs:
        if o.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(o.outputs[0].text), dict)


def test_same_schema_compiled_once(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"once": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["once"], "additionalProperties": False}
    before = len(llm.engine.grammars.compiled)
    # The dict and its JSON text (keys in another order) are one constraint.
    params = [constrained(so(json=schema), seed=i) for i in range(6)]
    params += [constrained(so(json=json.dumps(dict(reversed(list(schema.items()))))), seed=9)]
    outs = llm.generate(["a", "b", "c", "d", "e", "f", "g"], params, use_tqdm=False)
    assert len(llm.engine.grammars.compiled) == before + 1
    for o in outs:
        check(so(json=schema), o.outputs[0].text)


def test_bad_constraint_is_its_requests_error(llm: LLM) -> None:
    bad = constrained(so(regex="(unclosed"))
    with pytest.raises(ValueError, match=r"prompt 1: the structured output constraint does not compile"):
        llm.generate(["a", "b", "c"], [constrained(so(choice=["x"])), bad, SamplingParams(max_tokens=2)],
                     use_tqdm=False)
    bad_schema = constrained(so(json={"type": "no-such-type"}))
    with pytest.raises(ValueError, match="prompt 0"):
        llm.generate(["a"], [bad_schema], use_tqdm=False)
    # The engine still runs after a refused batch.
    assert llm.generate(["a"], constrained(so(choice=["x", "y"])), use_tqdm=False)[0].outputs[0].text in ("x", "y")


def test_grammar_compile_timeout(llama_dir: Path) -> None:
    """A constraint not compiled within the limit is an error, the others compile."""
    from batchllm.structured.grammars import GrammarCache

    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64)
    cache: GrammarCache = llm.engine.grammars
    slow_key = so(regex="slow").key()
    real = cache._compile_one

    def compile_one(c: StructuredOutputsParams) -> Any:
        if c.key() == slow_key:
            import time
            time.sleep(1.0)
        return real(c)

    cache._compile_one = compile_one  # type: ignore[method-assign]
    failed = cache.compile([constrained(so(regex="fast")), constrained(so(regex="slow"))], timeout_s=0.3)
    assert list(failed) == [1] and "within 0.3 s" in failed[1]
    assert so(regex="fast").key() in cache.compiled


def test_logprobs_are_the_models_own(llm: LLM) -> None:
    """Logprobs are the model's distribution before the mask (vLLM's raw logprobs): finite, and
    the same with and without the constraint where the constrained token is the free one."""
    import math

    params = SamplingParams(temperature=0, max_tokens=10, logprobs=5, structured_outputs=so(choice=["red", "green"]))
    out = llm.generate("x", params, use_tqdm=False)[0].outputs[0]
    free = llm.generate("x", SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)[0].outputs[0]
    assert out.text in ("red", "green")
    for step in out.logprobs:
        assert len(step) >= 5 and all(math.isfinite(lp.logprob) for lp in step.values())
    first_top = {t: lp.logprob for t, lp in out.logprobs[0].items() if lp.rank <= 5}
    assert first_top == pytest.approx({t: lp.logprob for t, lp in free.logprobs[0].items() if lp.rank <= 5})
