"""The step loop without a model, on random workloads in tight pools: every sequence finishes
(no deadlock, no endless preemption), no KV leaks, the pool is never overfilled. Fast enough for
hundreds of examples per variant, `memory_centric=False` included (the model-running property
test in test_scheduler.py checks outputs on fewer)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from batchllm.batch_plan import plan_batch
from batchllm.config import EngineConfig
from batchllm.sampling_params import SamplingParams
from batchllm.scheduler.policies import make_scheduler
from batchllm.sequence import Sequence

MAX_STEPS = 5000


def _toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 1000) for _ in range(n)]


@st.composite
def runs(draw: st.DrawFn) -> dict:
    rng = random.Random(draw(st.integers(0, 2**16)))
    system = _toks(rng, draw(st.integers(0, 40)))
    prompts = []
    for _ in range(draw(st.integers(1, 3))):
        doc = system + _toks(rng, draw(st.integers(1, 40)))
        prompts += [doc + _toks(rng, draw(st.integers(1, 12))) for _ in range(draw(st.integers(1, 5)))]
    prompts += [list(rng.choice(prompts)) for _ in range(draw(st.integers(0, 2)))]
    prompts += [_toks(rng, draw(st.integers(1, 30))) for _ in range(draw(st.integers(0, 2)))]
    rng.shuffle(prompts)
    top = draw(st.sampled_from([12, 40, 120]))
    params = [SamplingParams(n=draw(st.integers(1, 2)), temperature=0, max_tokens=draw(st.integers(1, top)),
                             ignore_eos=True) for _ in prompts]
    return dict(prompts=prompts, params=params, block_size=draw(st.sampled_from([4, 8, 16])),
                budget=draw(st.sampled_from([8, 32, 2048])), extra=draw(st.integers(0, 6)),
                max_num_seqs=draw(st.sampled_from([None, 1, 3])), stop_p=draw(st.sampled_from([0.0, 0.1, 0.4])),
                max_context=draw(st.sampled_from([None, 48])), seed=draw(st.integers(0, 2**16)))


def run_without_model(config: dict, r: dict) -> tuple[int, int]:
    """Steps and preemptions of a run; each computed sequence samples token 7 and stops with
    probability `stop_p` (as at an EOS) or at its max_tokens / the context."""
    prompts, params, bs = r["prompts"], r["params"], r["block_size"]
    max_context = r["max_context"] or 10**9
    lens = [min(len(p) + sp.max_tokens, max_context) for p, sp in zip(prompts, params)]
    pool = max(-(-n // bs) for n in lens) + r["extra"]
    cfg = EngineConfig(model="unused", block_size=bs, max_num_batched_tokens=r["budget"],
                       max_num_seqs=r["max_num_seqs"], **config)
    prompts = [p[:max_context - 1] for p in prompts]
    seqs = [Sequence(seq_id=0, request_index=i, sample_index=j, token_ids=list(p), num_prompt_tokens=len(p),
                     params=sp) for i, (p, sp) in enumerate(zip(prompts, params)) for j in range(sp.n)]
    for k, s in enumerate(seqs):
        s.seq_id = k
    plan = plan_batch(cfg, prompts, params) if cfg.policy == "batchllm" else None
    sched = make_scheduler(cfg, pool, seqs, plan, min(max_context, pool * bs))
    rng = random.Random(r["seed"])
    steps = 0
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.seqs, f"empty step {steps} with work left"
        assert sched.bm.num_used_blocks <= pool
        sched.after_step(out)
        for s in out.seqs:
            if not s.is_prefix and s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)
                if (s.num_output_tokens >= s.params.max_tokens or s.num_tokens >= min(max_context, pool * bs)
                        or rng.random() < r["stop_p"]):
                    sched.finish(s, "length")
        steps += 1
        assert steps < MAX_STEPS, f"no end after {steps} steps ({sched.num_preemptions} preemptions)"
    assert sched.bm.num_used_blocks == 0
    assert all(s.is_finished for s in seqs)
    return steps, sched.num_preemptions


VARIANTS = {"memory-centric": dict(policy="batchllm"),
            "no-memory-centric": dict(policy="batchllm", memory_centric=False),
            "no-memory-centric-recompute": dict(policy="batchllm", memory_centric=False, partial_block="recompute"),
            "fcfs": dict(policy="fcfs"), "lpm": dict(policy="lpm")}


@pytest.mark.parametrize("name", list(VARIANTS))
@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(r=runs())
def test_tight_pools_always_finish(name: str, r: dict) -> None:
    steps, preemptions = run_without_model(VARIANTS[name], r)
    event("preempted" if preemptions else "no preemption")


def _chat_run(max_tokens: int, produced: int, memory_centric: bool = True, pool: int = 2000, n: int = 64) -> dict:
    """`n` distinct 30-token prompts that each stop after `produced` tokens (an EOS), block 16, a
    `pool`-block pool, an 8,192-token context: steps, the most sequences running at once, peak KV,
    preemptions."""
    rng = random.Random(3)
    prompts = [_toks(rng, 30) for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=max_tokens)] * len(prompts)
    cfg = EngineConfig(model="unused", memory_centric=memory_centric)
    seqs = [Sequence(seq_id=i, request_index=i, sample_index=0, token_ids=list(p), num_prompt_tokens=30, params=sp)
            for i, (p, sp) in enumerate(zip(prompts, params))]
    context = min(8192, pool * 16)
    sched = make_scheduler(cfg, pool, seqs, plan_batch(cfg, prompts, params), context)
    steps = most = peak = 0
    while sched.has_unfinished():
        out = sched.schedule()
        most, peak = max(most, len(sched.running)), max(peak, sched.bm.num_used_blocks)
        sched.after_step(out)
        for s in out.seqs:
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)
                if s.num_output_tokens >= min(produced, s.params.max_tokens) or s.num_tokens >= context:
                    sched.finish(s, "stop")
        steps += 1
        assert steps < MAX_STEPS
    return dict(steps=steps, most=most, peak=peak, preemptions=sched.num_preemptions)


def test_admission_reserves_the_expected_output_not_max_tokens() -> None:
    """Chat without max_tokens (capped at the 8,192-token context) whose answers stop after 40
    tokens: reserving every sequence's maximum (512 blocks) ran 3 at a time (925 steps);
    reserving the expected output runs them as the same batch with max_tokens 40 does."""
    exact = _chat_run(max_tokens=40, produced=40)
    open_ended = _chat_run(max_tokens=8192 - 30, produced=40)
    assert exact["preemptions"] == 0 and exact["most"] == 64
    assert open_ended["most"] >= 48
    assert open_ended["steps"] <= 1.2 * exact["steps"], (open_ended, exact)


def test_outgrowing_the_estimate_grows_on_demand_and_preempts() -> None:
    """Every answer runs to 600 tokens, past the first estimate, in a 1,000-block pool: the
    pool fills, the youngest sequences are preempted and recomputed, and everything finishes."""
    r = _chat_run(max_tokens=8192 - 30, produced=600, pool=1000)
    assert r["peak"] <= 1000 and r["preemptions"] > 0


def test_output_estimate_is_a_quantile_of_the_last_outputs() -> None:
    from batchllm.scheduler.estimate import MIN_SEEN, PRIOR, WINDOW, OutputEstimate

    e = OutputEstimate()
    for n in range(MIN_SEEN - 1):
        e.observe(1000 + n)
    assert e.tokens == PRIOR  # too few seen
    e = OutputEstimate()
    for n in range(1, 101):
        e.observe(n)
    assert e.tokens == 91  # the 0.9 quantile of 1..100
    for _ in range(WINDOW):
        e.observe(7)
    assert e.tokens == 7  # the old outputs left the window
