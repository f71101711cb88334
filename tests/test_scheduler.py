"""Scheduling policies (issue 3): every policy and ablation gives the fcfs reference outputs; the
engine prefills exactly what the plan says; the KV pool empties; small pools error early or
finish without deadlock; run statistics add up; LLM.plan works without the model."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from batchllm import LLM, SamplingParams
from batchllm.outputs import RequestOutput, RunStats
from batchllm.planner import Group

BLOCK = 16
POOL = 512  # blocks: ample, nothing is preempted
MAX_STEPS = 5000  # deadlock guard

# name -> LLM keyword arguments; "fcfs" is the reference (no sharing at all).
VARIANTS: dict[str, dict[str, Any]] = {
    "fcfs": dict(policy="fcfs"),
    "batchllm": dict(policy="batchllm"),
    "fcfs-lru": dict(policy="fcfs-lru"),
    "lpm": dict(policy="lpm"),
    "no-global-groups": dict(policy="batchllm", global_groups=False),
    "no-decode-ratio-order": dict(policy="batchllm", decode_ratio_order=False),
    "no-memory-centric": dict(policy="batchllm", memory_centric=False),
    "partial-block-recompute": dict(policy="batchllm", partial_block="recompute"),
    "batchllm-chunked": dict(policy="batchllm", max_num_batched_tokens=24),
    "batchllm-block8": dict(policy="batchllm", block_size=8),
    "batchllm-prefix-shared-attention": dict(policy="batchllm", attention="prefix-shared"),
    "batchllm-reference-attention": dict(policy="batchllm", attention="reference"),
    "fcfs-prefix-shared-attention": dict(policy="fcfs", attention="prefix-shared"),
    "batchllm-no-kernels": dict(policy="batchllm", cpu_kernels=False),
    "fcfs-no-kernels": dict(policy="fcfs", cpu_kernels=False),
    "fcfs-lru-chunked": dict(policy="fcfs-lru", max_num_batched_tokens=24),
}
BATCHLLM_VARIANTS = [k for k, v in VARIANTS.items() if v["policy"] == "batchllm"]


def _toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, 1024) for _ in range(n)]


def nested_workload(seed: int = 3) -> tuple[list[list[int]], list[SamplingParams]]:
    """System prompt -> documents -> questions, plus prompts sharing only the system prompt, a prompt
    that is a prefix of others, exact duplicates, unrelated prompts and one n=2 request; shuffled.
    Greedy, `ignore_eos`, with varied max_tokens (so the decode-ratio order matters)."""
    rng = random.Random(seed)
    system = _toks(rng, 40)  # not a multiple of the block size
    docs = [_toks(rng, n) for n in (37, 50, 21)]
    prompts: list[list[int]] = []
    for doc in docs:
        for _ in range(rng.randint(3, 5)):
            prompts.append(system + doc + _toks(rng, rng.randint(4, 15)))
    prompts += [system + _toks(rng, 6), system + _toks(rng, 9)]  # share only the system prompt
    prompts.append(system + docs[0])  # a prefix of the first document's questions
    prompts += [list(prompts[0]), list(prompts[5])]  # exact duplicates
    prompts += [_toks(rng, rng.randint(10, 30)) for _ in range(3)]  # unrelated
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(4, 10), ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(n=2, temperature=0, max_tokens=7, ignore_eos=True)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    return [prompts[i] for i in order], [params[i] for i in order]


PROMPTS, PARAMS = nested_workload()
N2_REQUEST = next(i for i, p in enumerate(PARAMS) if p.n == 2)
NUM_SEQS = sum(p.n for p in PARAMS)


def seq_to_request(params: list[SamplingParams]) -> list[int]:
    """Sequence index (as the planner numbers them: n samples per request, in order) -> request."""
    return [i for i, p in enumerate(params) for _ in range(p.n)]


def generate_bounded(llm: LLM, prompts: list, params: Any, max_steps: int = MAX_STEPS) -> list[RequestOutput]:
    """generate(), but failing instead of hanging when the engine makes no progress."""
    stop = lambda: llm.last_run_stats is not None and llm.last_run_stats.steps >= max_steps  # noqa: E731
    results: list[RequestOutput | None] = [None] * len(prompts)
    for out in llm.iter_generate(prompts, params, use_tqdm=False, should_stop=stop):
        results[int(out.request_id)] = out
    done = sum(r is not None for r in results)
    assert done == len(prompts), f"only {done}/{len(prompts)} requests finished in {max_steps} steps"
    return results  # type: ignore[return-value]


def tokens(outs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in outs]


class Run:
    def __init__(self, llm: LLM, outs: list[RequestOutput], stats: RunStats) -> None:
        self.llm, self.outs, self.stats = llm, outs, stats


@pytest.fixture(scope="module")
def runs(llama_dir: Path) -> Callable[[str], Run]:
    """`runs(variant)`: the workload generated once per variant (cached for the module)."""
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=POOL, **VARIANTS[name])
            outs = generate_bounded(llm, PROMPTS, PARAMS)
            cache[name] = Run(llm, outs, llm.last_run_stats)
        return cache[name]

    return get


def test_workload_really_shares() -> None:
    """The workload has the structure the other tests rely on: nested shared groups, duplicates."""
    lens = [len(p) for p in PROMPTS]
    assert len(set(map(tuple, PROMPTS))) < len(PROMPTS)  # duplicates
    assert min(lens) >= 10 and max(lens) > 90
    assert PARAMS[N2_REQUEST].n == 2


# ---- outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_outputs_identical_to_fcfs(runs: Callable[[str], Run], name: str) -> None:
    ref, run = runs("fcfs"), runs(name)
    assert [o.prompt_token_ids for o in run.outs] == PROMPTS
    assert tokens(run.outs) == tokens(ref.outs)
    assert [len(o.outputs) for o in run.outs] == [p.n for p in PARAMS]
    for o, p in zip(run.outs, PARAMS):
        assert all(len(c.token_ids) == p.max_tokens and c.finish_reason == "length" for c in o.outputs)
    n2 = run.outs[N2_REQUEST].outputs
    assert n2[0].token_ids == n2[1].token_ids  # greedy n=2: identical completions
    # duplicates give identical outputs
    for i, p in enumerate(PROMPTS):
        j = PROMPTS.index(p)
        if j != i and PARAMS[i].max_tokens == PARAMS[j].max_tokens:
            assert run.outs[i].outputs[0].token_ids == run.outs[j].outputs[0].token_ids


def test_fcfs_reference_equals_requests_alone(runs: Callable[[str], Run]) -> None:
    """The reference itself: a few requests run alone give the same outputs as in the batch."""
    ref = runs("fcfs")
    for i in (0, N2_REQUEST, len(PROMPTS) - 1):
        alone = ref.llm.generate([PROMPTS[i]], PARAMS[i], use_tqdm=False)
        assert tokens(alone) == [tokens(ref.outs)[i]]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_pool_empty_after_run(runs: Callable[[str], Run], name: str) -> None:
    stats = runs(name).stats
    assert stats.kv_blocks_in_use_at_end == 0
    assert 0 < stats.peak_kv_blocks <= stats.num_kv_blocks == POOL
    assert stats.preemptions == 0  # the pool is ample
    assert stats.policy == VARIANTS[name]["policy"]


# ---- prefill accounting ----------------------------------------------------------------------

@pytest.mark.parametrize("name", BATCHLLM_VARIANTS)
def test_computed_prefill_equals_plan(runs: Callable[[str], Run], name: str) -> None:
    run = runs(name)
    plan = run.llm.plan(PROMPTS, PARAMS)
    stats = run.stats
    assert stats.preemptions == 0
    # logical prefill counts every sample: n=2 prefills its prompt twice without sharing
    assert stats.logical_prefill_tokens == plan.stats.logical_prefill_tokens == sum(
        p.n * len(x) for x, p in zip(PROMPTS, PARAMS))
    assert stats.computed_prefill_tokens == plan.stats.planned_prefill_tokens
    assert plan.stats.multilevel_optimum_tokens <= plan.stats.planned_prefill_tokens
    if VARIANTS[name].get("global_groups", True):
        assert plan.stats.num_shared_groups >= 3
        assert stats.computed_prefill_tokens < 0.6 * stats.logical_prefill_tokens
        assert stats.saving > 0.4
    else:
        assert plan.stats.num_shared_groups == 0
        assert stats.computed_prefill_tokens == plan.stats.logical_prefill_tokens


def test_attention_paths_really_ran(runs: Callable[[str], Run]) -> None:
    """Forced prefix-shared attention runs every step on that path, reference attention none; so
    the equality tests above compare both attention paths with the fcfs reference."""
    forced = runs("batchllm-prefix-shared-attention").stats
    assert forced.prefix_shared_attention_steps == forced.steps
    assert runs("batchllm-reference-attention").stats.prefix_shared_attention_steps == 0
    assert runs("fcfs").stats.prefix_shared_attention_steps == 0


def test_partial_block_copy_saves_over_recompute(runs: Callable[[str], Run]) -> None:
    copy, recompute = runs("batchllm").stats, runs("partial-block-recompute").stats
    assert copy.computed_prefill_tokens < recompute.computed_prefill_tokens


def test_fcfs_prefills_everything_and_lru_no_more(runs: Callable[[str], Run]) -> None:
    logical = sum(map(len, PROMPTS)) + len(PROMPTS[N2_REQUEST])  # n=2: two sequences
    assert runs("fcfs").stats.computed_prefill_tokens == logical == runs("fcfs").stats.logical_prefill_tokens
    for name in ("fcfs-lru", "lpm", "fcfs-lru-chunked"):
        assert runs(name).stats.computed_prefill_tokens <= logical
    # chunked admission lets later requests hit blocks cached by earlier ones
    assert runs("fcfs-lru-chunked").stats.computed_prefill_tokens < logical


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tokens_per_step_add_up(runs: Callable[[str], Run], name: str) -> None:
    """One entry per step; the entries sum to the prefilled tokens plus one decode token per
    output token that was fed back (every output token but each sequence's last). Prefix
    pseudo-requests only prefill; they add nothing to the output side."""
    stats = runs(name).stats
    budget = VARIANTS[name].get("max_num_batched_tokens", 2048)
    assert len(stats.tokens_per_step) == stats.steps > 0
    assert max(stats.tokens_per_step) <= budget
    assert min(stats.tokens_per_step) >= 1
    assert stats.output_tokens == sum(p.n * p.max_tokens for p in PARAMS)
    assert stats.preemptions == 0
    assert sum(stats.tokens_per_step) == stats.computed_prefill_tokens + stats.output_tokens - NUM_SEQS


@pytest.mark.parametrize("name", ["batchllm", "partial-block-recompute", "batchllm-block8", "fcfs"])
def test_num_cached_tokens_is_the_group_prefix(runs: Callable[[str], Run], name: str) -> None:
    """A request's cached tokens are its group's prefix, computed once for the group's first
    member's request: that request (all its samples) counts it as computed, not cached."""
    run = runs(name)
    plan = run.llm.plan(PROMPTS, PARAMS)
    owner = seq_to_request(PARAMS)
    prefix_of = {}
    for g in plan.groups:
        for m in g.members:
            reused = g.shared and owner[m] != owner[g.members[0]]
            prefix_of.setdefault(owner[m], set()).add(g.prefix_len if reused else 0)
    for i, o in enumerate(run.outs):
        if name == "fcfs":
            assert o.num_cached_tokens == 0
        else:
            assert o.num_cached_tokens == min(prefix_of[i]), f"request {i}"
    if name != "fcfs":
        assert sum(o.num_cached_tokens > 0 for o in run.outs) >= len(PROMPTS) // 2


# ---- small KV pools --------------------------------------------------------------------------

def _group_need(plan_groups: tuple[Group, ...], lens: list[int], max_tokens: list[int], bs: int) -> int:
    """Blocks a shared group needs to run its prefix plus its largest member (as the scheduler counts)."""
    blocks = lambda t: -(-t // bs)  # noqa: E731
    need = 0
    for g in plan_groups:
        if not g.shared:
            continue
        own = max(blocks(lens[m] + max_tokens[m]) - g.prefix_len // bs for m in g.members)
        need = max(need, blocks(g.prefix_len) + own)
    return need


def test_pool_too_small_for_prefix_plus_member(llama_dir: Path) -> None:
    """One group: a 40-token prefix (2 full blocks + 8 tokens) and three 10-token questions, 6
    output tokens. A member alone needs 56 tokens (4 blocks) but, with the prefix's partial block
    copied, the prefix (3 blocks) plus a member's own blocks (2) need 5."""
    rng = random.Random(11)
    prefix = _toks(rng, 40)
    prompts = [prefix + _toks(rng, 10) for _ in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    reference = tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, policy="fcfs")
                       .generate(prompts, params, use_tqdm=False))

    small = LLM(str(llama_dir), dtype="float32", num_kv_blocks=4)
    plan = small.plan(prompts, params)
    assert [g.prefix_len for g in plan.groups] == [40]
    # the group cannot share in 4 blocks: its members run unshared, one at a time (a member alone
    # needs 4), each computing its whole prompt; no exception for the batch
    outs = generate_bounded(small, prompts, params)
    assert tokens(outs) == reference
    assert [o.num_cached_tokens for o in outs] == [0, 0, 0]
    assert small.last_run_stats.computed_prefill_tokens == 3 * 50
    assert small.last_run_stats.kv_blocks_in_use_at_end == 0

    # one block more fits: it finishes (members one at a time) with the same outputs
    fits = LLM(str(llama_dir), dtype="float32", num_kv_blocks=5)
    assert tokens(generate_bounded(fits, prompts, params)) == reference
    assert fits.last_run_stats.kv_blocks_in_use_at_end == 0
    assert fits.last_run_stats.computed_prefill_tokens == plan.stats.planned_prefill_tokens == 40 + 3 * 10
    # recomputing the partial block needs no copy block: 4 blocks are enough then
    rec = LLM(str(llama_dir), dtype="float32", num_kv_blocks=4, partial_block="recompute")
    assert tokens(generate_bounded(rec, prompts, params)) == reference
    assert rec.last_run_stats.computed_prefill_tokens == 32 + 3 * 18


def test_later_prefix_does_not_starve_an_earlier_group(llama_dir: Path) -> None:
    """Regression: group A (19-token prefix, members needing 4 own blocks) starts; in the same step
    group B's 50-token prefix fits the memory check (A's waiting members are in no reserve). With
    both prefixes pinned (6 of 9 blocks) no member of A fits, so it preempted itself forever. A
    later prefix must leave room for one member of every live group."""
    rng = random.Random(0)
    a, b = _toks(rng, 19), _toks(rng, 50)
    prompts = [a + _toks(rng, 36), a + _toks(rng, 46), b + _toks(rng, 10), b + _toks(rng, 10), b + _toks(rng, 10)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 5, 4, 4, 4)]
    reference = tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, policy="fcfs")
                       .generate(prompts, params, use_tqdm=False))
    for kwargs in (dict(), dict(decode_ratio_order=False), dict(partial_block="recompute")):
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=9, max_num_batched_tokens=32, **kwargs)
        assert [g.prefix_len for g in llm.plan(prompts, params).groups if g.shared] in ([19, 50], [16, 48])
        assert tokens(generate_bounded(llm, prompts, params, max_steps=500)) == reference, kwargs
        assert llm.last_run_stats.kv_blocks_in_use_at_end == 0


def test_pool_smaller_than_one_request(llama_dir: Path) -> None:
    """A prompt that leaves no room in the pool for one output token is rejected before running,
    under every policy, naming the prompt and the pool."""
    for policy in ("batchllm", "fcfs", "fcfs-lru", "lpm"):
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=3, policy=policy)
        with pytest.raises(ValueError, match=r"prompt 1: .*KV pool holds 48"):
            llm.generate([[5] * 10, [6] * 48], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        assert llm.last_run_stats is None


def test_max_tokens_beyond_the_pool_or_context_is_capped(llama_dir: Path) -> None:
    """A max_tokens the pool (or the context) can never hold is capped there: the sequence ends
    with "length" when it fills them, its tokens the reference's first ones; the other requests
    run as they would alone. Before, the batch raised ("group needs ... blocks") or was rejected."""
    prompts = [[5] * 10, [6] * 45, [7] * 20]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    ref = tokens(LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, policy="fcfs").generate(
        prompts, [params[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), params[2]],
        use_tqdm=False))
    for policy in ("batchllm", "fcfs", "fcfs-lru", "lpm"):
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=3, policy=policy)  # 48 tokens
        outs = generate_bounded(llm, prompts, params)
        assert tokens(outs) == ref, policy
        assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 3
        assert llm.last_run_stats.kv_blocks_in_use_at_end == 0
    # the context caps it the same way (max_model_len 30 < pool 64 * 16)
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, max_model_len=30)
    out = generate_bounded(llm, [[5] * 10], [SamplingParams(temperature=0, max_tokens=10**9, ignore_eos=True)])
    assert len(out[0].outputs[0].token_ids) == 20 and out[0].outputs[0].finish_reason == "length"


@pytest.mark.parametrize("name", ["batchllm", "partial-block-recompute", "no-memory-centric", "no-decode-ratio-order",
                                  "fcfs", "fcfs-lru", "lpm"])
def test_pool_for_a_few_members_finishes(llama_dir: Path, runs: Callable[[str], Run], name: str) -> None:
    """A pool holding the largest group's prefix and only a couple of its members: no deadlock,
    no leak, the reference outputs."""
    kwargs = VARIANTS[name]
    probe = LLM(str(llama_dir), dtype="float32", num_kv_blocks=POOL, **kwargs)
    seq_params = [p for p in PARAMS for _ in range(p.n)]
    seq_lens = [len(x) for x, p in zip(PROMPTS, PARAMS) for _ in range(p.n)]
    plan = probe.plan(PROMPTS, PARAMS)
    need = _group_need(plan.groups, seq_lens, [p.max_tokens for p in seq_params], BLOCK)
    biggest = max(-(-(n + p.max_tokens) // BLOCK) for n, p in zip(seq_lens, seq_params))
    pool = max(need, biggest) + 3
    assert pool < runs(name).stats.peak_kv_blocks  # really tighter than what the run used
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=pool, **kwargs)
    outs = generate_bounded(llm, PROMPTS, PARAMS)
    assert tokens(outs) == tokens(runs("fcfs").outs)
    stats = llm.last_run_stats
    assert stats.kv_blocks_in_use_at_end == 0
    assert stats.peak_kv_blocks <= pool
    assert len(stats.tokens_per_step) == stats.steps
    # A sequence preempted after sampling recomputes its last sampled token as part of its
    # prefill, so that token is counted as prefill instead of decode: one less per preemption.
    no_preemption = stats.computed_prefill_tokens + stats.output_tokens - NUM_SEQS
    assert no_preemption - stats.preemptions <= sum(stats.tokens_per_step) <= no_preemption
    if kwargs["policy"] == "batchllm" and stats.preemptions == 0:
        assert stats.computed_prefill_tokens == plan.stats.planned_prefill_tokens


# ---- planning alone --------------------------------------------------------------------------

def test_plan_without_running_the_model(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hand-computed example (block 16): three prompts share a 40-token prefix (own parts 5, 6, 7
    tokens); one 20-token prompt is sampled twice (n=2)."""
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64)

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("LLM.plan ran the model")

    monkeypatch.setattr(llm.engine.runner, "run", no_model)
    monkeypatch.setattr(llm.engine, "run", no_model)
    shared = list(range(100, 140))
    prompts = [shared + list(range(200, 205)), shared + list(range(300, 306)), shared + list(range(400, 407)),
               list(range(500, 520))]
    params = [SamplingParams(temperature=0, max_tokens=8)] * 3 + [SamplingParams(n=2, temperature=0.5, max_tokens=8)]

    plan = llm.plan(prompts, params)
    assert llm.last_run_stats is None
    # sequences: 0, 1, 2 (the shared prompts), 3 and 4 (the two samples of the 20-token prompt)
    a = Group(40, (0, 1, 2), (5, 6, 7))
    u = Group(19, (3, 4), (1, 1))  # every member keeps one token of its own to sample from
    # decode-ratio order: u 16 / 21 before a 24 / 58
    assert plan.groups == (u, a)
    s = plan.stats
    assert s.logical_prefill_tokens == 45 + 46 + 47 + 20 + 20 == 178
    assert s.planned_prefill_tokens == 40 + 18 + 19 + 2 == 79
    assert s.multilevel_optimum_tokens == 40 + 5 + 6 + 7 + 20 == 78
    assert s.saving == pytest.approx(1 - 79 / 178)
    assert s.num_groups == s.num_shared_groups == 2
    assert s.mean_share_degree == 2.5
    assert s.mean_prefix_len == (40 + 19) / 2
    assert s.mean_suffix_len == (18 + 2) / 5
    assert s.share_degree_histogram == {2: 1, 3: 1}
    assert plan.block_size == BLOCK and plan.num_sequences == 5 and plan.partial_block == "copy"

    # input order and recomputed partial blocks (prefixes rounded down to the block)
    llm2 = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, decode_ratio_order=False, partial_block="recompute")
    monkeypatch.setattr(llm2.engine, "run", no_model)
    plan2 = llm2.plan(prompts, params)
    assert plan2.groups == (Group(32, (0, 1, 2), (13, 14, 15)), Group(16, (3, 4), (4, 4)))
    assert plan2.stats.planned_prefill_tokens == 32 + 42 + 16 + 8
    # no global groups: every sequence alone
    llm3 = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, global_groups=False)
    plan3 = llm3.plan(prompts, params)
    assert plan3.stats.num_shared_groups == 0
    assert plan3.stats.planned_prefill_tokens == plan3.stats.logical_prefill_tokens == 178


# ---- random workloads under tight pools (no deadlock, no leak, same outputs) -----------------

@st.composite
def workloads(draw: st.DrawFn) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(draw(st.integers(0, 2**16)))
    system = _toks(rng, draw(st.integers(0, 40)))
    prompts = []
    for _ in range(draw(st.integers(1, 3))):
        doc = system + _toks(rng, draw(st.integers(1, 40)))
        prompts += [doc + _toks(rng, draw(st.integers(1, 12))) for _ in range(draw(st.integers(1, 4)))]
    prompts += [list(rng.choice(prompts)) for _ in range(draw(st.integers(0, 2)))]  # duplicates
    prompts += [_toks(rng, draw(st.integers(1, 30))) for _ in range(draw(st.integers(0, 2)))]
    rng.shuffle(prompts)
    params = [SamplingParams(temperature=0, max_tokens=draw(st.integers(1, 12)), ignore_eos=True) for _ in prompts]
    k = draw(st.integers(0, len(prompts) - 1))
    params[k] = SamplingParams(n=draw(st.integers(1, 3)), temperature=0, max_tokens=params[k].max_tokens,
                               ignore_eos=True)
    return prompts, params


CONFIGS = [dict(policy="batchllm"), dict(policy="batchllm", memory_centric=False),
           dict(policy="batchllm", partial_block="recompute"), dict(policy="batchllm", decode_ratio_order=False),
           dict(policy="batchllm", attention="prefix-shared"), dict(policy="batchllm", attention="reference"),
           dict(policy="batchllm", cpu_kernels=False), dict(policy="fcfs"), dict(policy="fcfs-lru"), dict(policy="lpm")]


@pytest.fixture(scope="module")
def reference_llm(llama_dir: Path) -> LLM:
    return LLM(str(llama_dir), dtype="float32", num_kv_blocks=POOL, policy="fcfs")


# A prefix still prefilling that preempts itself (nothing else can make room) and comes back.
_P, _Q = [817, 592, 846, 87, 501, 785, 272, 42, 5, 154, 683, 605, 486], [993, 782, 757, 387, 332, 793, 27]
_SELF_PREEMPTING_PREFIX = (
    [_P + [751, 276], _P + [721, 829], [827], _P + _Q + [284], _P + _Q + [826],
     _P + _Q + [207, 752, 898, 428, 937, 556, 557, 703, 101, 202, 581, 571], _P + [751, 276], _P + _Q + [505]],
    [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 5, 2, 1, 1, 1, 1, 1)])


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(work=_SELF_PREEMPTING_PREFIX, config=dict(policy="batchllm", memory_centric=False), block_size=16, budget=8,
         extra=2)
@given(work=workloads(), config=st.sampled_from(CONFIGS), block_size=st.sampled_from([4, 8, 16]),
       budget=st.sampled_from([8, 32, 2048]), extra=st.integers(0, 6))
def test_random_workloads_in_tight_pools(llama_dir: Path, reference_llm: LLM, work: tuple, config: dict,
                                         block_size: int, budget: int, extra: int) -> None:
    check_tight_pool_run(llama_dir, reference_llm, work, config, block_size, budget, extra)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(work=workloads(), block_size=st.sampled_from([4, 8, 16]), budget=st.sampled_from([8, 32, 2048]),
       extra=st.integers(0, 3))
def test_random_workloads_in_tight_pools_without_memory_centric(llama_dir: Path, reference_llm: LLM, work: tuple,
                                                                block_size: int, budget: int, extra: int) -> None:
    """The same property on `memory_centric=False` alone (admission bounded by the request cap and
    the allocation only), in the tightest pools."""
    check_tight_pool_run(llama_dir, reference_llm, work, dict(policy="batchllm", memory_centric=False), block_size,
                         budget, extra)


def check_tight_pool_run(llama_dir: Path, reference_llm: LLM, work: tuple, config: dict, block_size: int,
                         budget: int, extra: int) -> None:
    prompts, params = work
    reference = tokens(reference_llm.generate(prompts, params, use_tqdm=False))
    seq_params = [p for p in params for _ in range(p.n)]
    seq_lens = [len(x) for x, p in zip(prompts, params) for _ in range(p.n)]
    biggest = max(-(-(n + p.max_tokens) // block_size) for n, p in zip(seq_lens, seq_params))
    pool = biggest + extra
    llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=pool, block_size=block_size,
              max_num_batched_tokens=budget, **config)
    if config["policy"] == "batchllm":
        plan = llm.plan(prompts, params)
        need = _group_need(plan.groups, seq_lens, [p.max_tokens for p in seq_params], block_size)
        if need > pool:
            event("pool too small for a group: it runs unshared")
    outs = generate_bounded(llm, prompts, params)
    assert tokens(outs) == reference
    stats = llm.last_run_stats
    assert stats.kv_blocks_in_use_at_end == 0
    assert stats.peak_kv_blocks <= pool
    assert max(stats.tokens_per_step) <= budget
    no_preemption = stats.computed_prefill_tokens + stats.output_tokens - len(seq_params)
    assert no_preemption - stats.preemptions <= sum(stats.tokens_per_step) <= no_preemption
    event("preempted" if stats.preemptions else "no preemption")
    if config["policy"] == "batchllm" and stats.preemptions == 0 and need <= pool:
        assert stats.computed_prefill_tokens == plan.stats.planned_prefill_tokens
