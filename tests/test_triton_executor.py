"""The Triton executor under triton's interpreter on CPU tensors, against the PyTorch executor; its
work list (built without triton); and that the CPU path never imports triton."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchllm.attention.plan import Share, build_plan  # noqa: E402
from batchllm.attention.torch_executor import TorchExecutor  # noqa: E402
from batchllm.attention.triton_work import WorkShape, build_work  # noqa: E402

from attention_steps import CPU, make_step, random_pool  # noqa: E402  (tests/)
from triton_interp import interpreted_executor_class  # noqa: E402  (tests/)

TritonExecutor = interpreted_executor_class()
needs_triton = pytest.mark.skipif(TritonExecutor is None, reason="triton not installed (the test extra has it)")


def check(meta, heads: int, kvh: int, d: int, dtype: torch.dtype, seed: int, num_sms: int = 4,
          shares=tuple(Share)) -> list:
    """The Triton executor (interpreted) on the step's plans against the PyTorch executor's unshared
    plan; returns the work lists it ran."""
    gen = torch.Generator().manual_seed(seed)
    k, v = random_pool(meta, kvh, d, dtype, gen)
    q = torch.randn(meta.num_tokens, heads, d, generator=gen).to(dtype)
    scale = d ** -0.5
    ref = TorchExecutor(CPU)
    want = ref.run(q, k, v, ref.prepare(build_plan(meta, Share.NONE)), scale)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    ex = TritonExecutor(CPU, heads, kvh, num_sms=num_sms)
    works = []
    for share in shares:
        prepared = ex.prepare(build_plan(meta, share))
        got = ex.run(q, k, v, prepared, scale)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), want.float(), **tol, msg=lambda m: f"{share}: {m}")
        works.append(prepared.work)
    return works


@needs_triton
@pytest.mark.parametrize("dtype,heads,kvh,d", [(torch.float32, 4, 4, 16), (torch.bfloat16, 8, 2, 64),
                                               (torch.float32, 8, 1, 8)])
def test_mixed_step(dtype: torch.dtype, heads: int, kvh: int, d: int) -> None:
    """Decodes, continuing and fresh prefill chunks, groups with decode and prefill members, a
    group of one; head size 8 is padded to tl.dot's 16."""
    rng = random.Random(0)
    groups = [(5, [(3, 1), (9, 1), (17, 1), (6, 4), (12, 12)]), (1, [(7, 3)]), (8, [(2, 1)] * 3 + [(40, 20)])]
    works = check(make_step(rng, groups, [(13, 1), (9, 9), (21, 5)], bs=4), heads, kvh, d, dtype, seed=1)
    assert works[0].direct and not works[1].direct and not works[2].direct


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_split_over_kv_segments(dtype: torch.dtype) -> None:
    """Two long decode queries on a (pretend) 8-SM GPU: their KV is cut into segments (with a
    ragged last one) merged by lse; the group's prefix too."""
    rng = random.Random(2)
    meta = make_step(rng, [(40, [(70, 1), (5, 1)])], [(600, 1)], bs=16)
    works = check(meta, 4, 2, 16, dtype, seed=2, num_sms=8, shares=(Share.NONE, Share.DECODES))
    for w in works:
        assert not w.direct and w.num_items > 3
        spans = (w.hi - w.lo).tolist()
        assert spans == sorted(spans, reverse=True)  # longest first


@needs_triton
def test_many_members_fill_prefix_tiles() -> None:
    """20 decode members of one group at G = 4: the prefix is read by two tiles (16 + 4 queries)."""
    rng = random.Random(4)
    meta = make_step(rng, [(3, [(rng.randint(1, 9), 1) for _ in range(20)])], [], bs=8)
    (w,) = check(meta, 8, 2, 16, torch.float32, seed=4, num_sms=1000, shares=(Share.DECODES,))
    prefix_items = [n for n, hi in zip(w.n.tolist(), w.hi.tolist()) if hi == 24]
    assert sorted(prefix_items) == [4, 16] and w.block_m == 64


@needs_triton
@pytest.mark.parametrize("seed", range(4))
def test_random_configurations(seed: int) -> None:
    rng = random.Random(100 + seed)
    bs = rng.choice([2, 4, 8, 16])
    groups = [(rng.randint(1, 48 // bs + 1), [(o, 1 if rng.random() < 0.6 else rng.randint(1, o))
                                              for o in (rng.randint(1, 30) for _ in range(rng.randint(1, 5)))])
              for _ in range(rng.randint(0, 3))]
    singles = [(c, 1 if rng.random() < 0.5 else rng.randint(1, c)) for c in (rng.randint(1, 50) for _ in range(2))]
    kvh, g = rng.choice([1, 2]), rng.choice([1, 4, 8])
    check(make_step(rng, groups, singles, bs), kvh * g, kvh, 16, torch.bfloat16 if seed % 2 else torch.float32, seed)


def test_work_list_without_triton() -> None:
    """The work list is plain index data: every row covered, limits within the keys, segments
    adjacent and of whole KV tiles, every (item, entry) result a distinct slot of its row."""
    rng = random.Random(6)
    meta = make_step(rng, [(10, [(50, 1), (30, 7), (3, 1)])], [(300, 1), (40, 40)], bs=8)
    shape = WorkShape(tile_rows=64, block_n=64, target_programs=64, min_segment=64)
    for share in Share:
        plan = build_plan(meta, share)
        w = build_work(plan, 4, 2, shape, CPU)
        rows, limits, dst = w.row.tolist(), w.limit.tolist(), w.dst.tolist()
        assert set(rows) == set(range(plan.num_tokens))
        results = [(rows[e], dst[e] + s) for o, n, s in zip(w.off.tolist(), w.n.tolist(), w.shift.tolist())
                   for e in range(o, o + n)]
        if w.direct:
            assert all(r == d for r, d in results) and len(results) == plan.num_tokens
        else:
            assert sorted(d for _, d in results) == list(range(w.num_partials)) and w.row_off is not None
            off = w.row_off.tolist()
            assert all(off[r] <= d < off[r + 1] for r, d in results)
        lo, hi = w.lo.tolist(), w.hi.tolist()
        assert all(b > a for a, b in zip(lo, hi)) and all(a % 64 == 0 for a in lo)
        spans = [b - a for a, b in zip(lo, hi)]
        assert spans == sorted(spans, reverse=True)  # longest first
        assert max(hi) <= max(meta.context_lens) and max(limits) <= max(meta.context_lens)
        assert all(n <= w.block_m // 4 for n in w.n.tolist())


def test_work_list_builds_fast() -> None:
    """The per-step Python work does not grow with prefill tokens: 8 chunks of 2,048 tokens and
    256 grouped decodes build in a few ms (numpy, not a loop per query)."""
    import time

    rng = random.Random(7)
    meta = make_step(rng, [(64, [(100, 1)] * 16) for _ in range(16)], [(2048, 2048)] * 8, bs=16)
    plan = build_plan(meta, Share.ALL)
    shape = WorkShape(tile_rows=64, block_n=64, target_programs=264, min_segment=256)
    build_work(plan, 4, 8, shape, CPU)
    t = time.perf_counter()
    w = build_work(plan, 4, 8, shape, CPU)
    assert w.row.numel() == plan.num_tokens + 256 and time.perf_counter() - t < 0.1  # ~5 ms unloaded


@needs_triton
def test_engine_runs_the_triton_executor(llama_dir: Path) -> None:
    """A whole engine (runner, KV pool views, q layout) with the Triton executor swapped in for
    the PyTorch one: the same greedy tokens on prompts sharing a prefix, steps with shared
    attention included."""
    from batchllm import LLM, SamplingParams

    rng = random.Random(8)
    prefix = [rng.randrange(5, 1000) for _ in range(40)]
    prompts = [{"prompt_token_ids": prefix + [rng.randrange(5, 1000) for _ in range(3 + i)]} for i in range(3)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    outs = []
    for triton in (False, True):
        llm = LLM(str(llama_dir), dtype="float32", num_kv_blocks=64, cpu_kernels=False, attention="prefix-shared")
        cfg = llm.engine.runner.model.cfg
        if triton:
            llm.engine.runner.backend.executor = TritonExecutor(CPU, cfg.num_heads, cfg.num_kv_heads)
        outs.append([list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.last_run_stats.prefix_shared_attention_steps > 0
    assert outs[0] == outs[1]


def test_cpu_engine_never_imports_triton(llama_dir: Path) -> None:
    """`sys.modules['triton'] = None` makes any import of triton fail: a CPU engine builds and
    generates without it, and make_executor falls back to PyTorch for CUDA without triton."""
    code = f"""
import sys, torch
sys.modules['triton'] = None
from batchllm import LLM, SamplingParams
from batchllm.attention.select import make_executor
llm = LLM({str(llama_dir)!r}, dtype="float32", num_kv_blocks=64)
out = llm.generate([[5, 6, 7, 8]] * 2, SamplingParams(max_tokens=3, temperature=0.0))
assert len(out) == 2
assert make_executor(torch.device("cuda"), torch.bfloat16, 64, None, heads=(8, 2)).kind.value == "torch"
assert not any(m.startswith("batchllm.kernels.triton") for m in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
