"""The C kernels (kernels/*.c) against PyTorch, and their build and fallback."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchllm.attention.torch_ops import attend, gather_kv  # noqa: E402
from batchllm.kernels.cpu import load_cpu_kernels  # noqa: E402

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
KERNELS = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="no C compiler")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def test_kernels_build_where_a_compiler_is() -> None:
    assert (KERNELS is not None) == HAS_CC
    if KERNELS is not None:
        assert KERNELS.path.exists() and KERNELS.path.suffix == ".so"


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_no_or_broken_compiler_falls_back_with_a_warning(cc: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", cc)
    with pytest.warns(UserWarning, match="PyTorch path"):
        assert load_cpu_kernels.__wrapped__(tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def paged_case(dtype: torch.dtype, heads: int, kvh: int, d: int, bs: int) -> tuple[torch.Tensor, ...]:
    """Scattered blocks; sequences with full, one-key, empty and partial last blocks."""
    gen = torch.Generator().manual_seed(heads + d + bs)
    nblocks, b = 40, 6
    k_cache, v_cache = (torch.randn(kvh, nblocks * bs, d, generator=gen).to(dtype) for _ in range(2))
    tables = torch.stack([torch.randperm(nblocks - 1, generator=gen)[:7] + 1 for _ in range(b)])
    lens = torch.tensor([7 * bs, 1, 0, 3 * bs + 1, 5, 7 * bs - 1])
    q = torch.randn(b, heads, d, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, lens


# head shapes: MHA, GQA 4 and 8, an odd group (3 = a tile of 2 + 1), and 24, the generic head size
SHAPES = [(4, 4, 64), (8, 2, 128), (8, 1, 64), (6, 2, 64), (8, 1, 24)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kvh,d", SHAPES)
@pytest.mark.parametrize("bs", [4, 32])  # 32: two 16-key chunks per block in the AVX-512 path
def test_paged_decode_matches_attention_over_the_gathered_kv(dtype: torch.dtype, heads: int, kvh: int,
                                                             d: int, bs: int) -> None:
    q, k_cache, v_cache, tables, lens = paged_case(dtype, heads, kvh, d, bs)
    b = q.shape[0]
    out, lse = KERNELS.paged_decode(q, k_cache, v_cache, tables, lens, bs, d ** -0.5)
    k, v = gather_kv(k_cache, tables, bs), gather_kv(v_cache, tables, bs)  # [kvh, B, T, d]
    want, want_lse = attend(q.view(b, kvh, heads // kvh, d).transpose(0, 1), k, v, lens[None, :, None], d ** -0.5)
    assert out.dtype == dtype and lse is not None
    torch.testing.assert_close(out.float(), want.transpose(0, 1).reshape(b, heads, d).float(), **TOL[dtype])
    torch.testing.assert_close(lse, want_lse.transpose(0, 1).reshape(b, heads), **TOL[dtype])
    assert out[2].eq(0).all() and lse[2].eq(float("-inf")).all()
    assert KERNELS.paged_decode(q, k_cache, v_cache, tables, lens, bs, d ** -0.5, need_lse=False)[1] is None


def cpu_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except OSError:
        return False


@needs_kernels
def test_avx512_decode_is_built_where_the_cpu_has_it(tmp_path: Path) -> None:
    assert KERNELS.avx512_decode == (cpu_has("avx512f") and cpu_has("avx512_bf16"))
    portable = load_cpu_kernels(tmp_path, portable=True)
    assert portable is not None and not portable.avx512_decode


@needs_kernels
@pytest.mark.skipif(KERNELS is None or not KERNELS.avx512_decode, reason="no AVX-512 decode path on this CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kvh,d", SHAPES[:4])
def test_avx512_decode_matches_the_portable_loop(dtype: torch.dtype, heads: int, kvh: int, d: int,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    portable = load_cpu_kernels(tmp_path_factory.getbasetemp() / "portable", portable=True)
    for bs in (4, 16, 32):
        args = (*paged_case(dtype, heads, kvh, d, bs), bs, d ** -0.5)
        (out, lse), (want, want_lse) = KERNELS.paged_decode(*args), portable.paged_decode(*args)
        torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
        torch.testing.assert_close(lse, want_lse, **TOL[dtype])


@needs_kernels
def test_paged_decode_rejects_mixed_dtypes() -> None:
    k = torch.zeros(1, 8, 4)
    with pytest.raises(ValueError, match="one dtype"):
        KERNELS.paged_decode(torch.zeros(1, 1, 4, dtype=torch.bfloat16), k, k, torch.zeros(1, 2, dtype=torch.long),
                             torch.ones(1, dtype=torch.long), 4, 1.0)


def shared_case(dtype: torch.dtype, heads: int, kvh: int, d: int, bs: int, seed: int = 0):
    """Three groups (3, 1 and 7 members) with prefixes of partial blocks, members' own parts of
    different lengths, in scattered pool blocks; plus the expected output, attention over the
    gathered prefix + own keys of each member."""
    gen = torch.Generator().manual_seed(seed)
    members, plens = [3, 1, 7], [3 * bs + 5, bs, 11 * bs - 3]
    nblocks = 200
    k_cache, v_cache = (torch.randn(kvh, nblocks * bs, d, generator=gen).to(dtype) for _ in range(2))
    free = (torch.randperm(nblocks - 1, generator=gen) + 1).tolist()
    take = lambda n: [free.pop() for _ in range(-(-n // bs))]  # noqa: E731
    pt = [take(n) for n in plens]
    olens = [int(torch.randint(1, 3 * bs, (1,), generator=gen)) for _ in range(sum(members))]
    ot = [take(n) for n in olens]
    pad = lambda rows: torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])  # noqa: E731
    q = torch.randn(sum(members), heads, d, generator=gen).to(dtype)
    group_of = [j for j, m in enumerate(members) for _ in range(m)]
    want = torch.empty_like(q)
    for i, j in enumerate(group_of):
        blocks = torch.tensor(pt[j] + ot[i])
        # the prefix's last block may be partial: keep its real keys, then the own keys
        keys = torch.cat([torch.arange(plens[j]), len(pt[j]) * bs + torch.arange(olens[i])])
        k, v = (gather_kv(c, blocks[None], bs)[:, 0, keys] for c in (k_cache, v_cache))  # [kvh, T, d]
        o, _ = attend(q[i].view(kvh, heads // kvh, d)[:, None], k[:, None], v[:, None], None, d ** -0.5)
        want[i] = o[:, 0].reshape(heads, d)
    offsets = torch.tensor([0, *torch.tensor(members).cumsum(0).tolist()])
    args = (q, k_cache, v_cache, offsets, pad(pt), torch.tensor(plens), pad(ot), torch.tensor(olens), bs, d ** -0.5)
    return args, want


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kvh,d", SHAPES)
def test_shared_decode_matches_attention_over_prefix_and_own_keys(dtype: torch.dtype, heads: int, kvh: int, d: int,
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    portable = load_cpu_kernels(tmp_path_factory.getbasetemp() / "portable", portable=True)
    for bs in (4, 16):
        args, want = shared_case(dtype, heads, kvh, d, bs)
        for kernels in (KERNELS, portable):
            for mt in (1, 3, 16):  # members per task: one, a partial tile, the whole group
                got = kernels.shared_decode(*args, members_per_task=mt)
                torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def prefill_case(dtype: torch.dtype, heads: int, kvh: int, d: int, bs: int, seed: int = 0):
    """Key sets in scattered blocks with chunks of every kind: a group prefix seen whole by three
    members' chunks (one longer than a tile of query rows), a fresh causal chunk, a continuing
    causal chunk, one whose first queries see no key, one-query chunks; plus the expected output
    and lse, attention over each query's visible keys gathered from the pool."""
    gen = torch.Generator().manual_seed(seed)
    sets = [(5 * bs + 3, [(7, 5 * bs + 3), (0, 1), (70, 5 * bs + 3), (1, 5 * bs + 3), (0, 1)]),  # (keys, [(queries,
            # first limit)]); empty chunks inside and at the end of a key set
            (2 * bs + 1, [(2 * bs + 1, 1)]), (3 * bs, [(bs + 2, 2 * bs - 1)]), (9, [(4, -2)]), (1, [(1, 1)])]
    nblocks = 120
    k_cache, v_cache = (torch.randn(kvh, nblocks * bs, d, generator=gen).to(dtype) for _ in range(2))
    free = (torch.randperm(nblocks - 1, generator=gen) + 1).tolist()
    tables = [[free.pop() for _ in range(-(-n // bs))] for n, _ in sets]
    chunks = [(s, ql, l0) for s, (_, cs) in enumerate(sets) for ql, l0 in cs]
    rows = torch.tensor([0, *torch.tensor([c[1] for c in chunks]).cumsum(0).tolist()]) + 2  # rows 0, 1: not chunks
    q = torch.randn(int(rows[-1]) + 1, heads, d, generator=gen).to(dtype)
    g = heads // kvh
    want, want_lse = torch.zeros(q.shape), torch.zeros(q.shape[:2])
    for c, (s, ql, l0) in enumerate(chunks):
        if ql == 0:
            continue
        n = sets[s][0]
        k, v = (gather_kv(x, torch.tensor(tables[s])[None], bs)[:, :, :n].transpose(0, 1) for x in (k_cache, v_cache))
        qc = q[rows[c]:rows[c] + ql].view(ql, kvh, g, d).permute(1, 0, 2, 3).reshape(1, kvh, ql * g, d)
        lim = (l0 + torch.arange(ql)).clamp(0, n).repeat_interleave(g)[None, None]
        o, lse = attend(qc, k, v, lim, d ** -0.5)
        want[rows[c]:rows[c] + ql] = o.view(kvh, ql, g, d).permute(1, 0, 2, 3).reshape(ql, heads, d).float()
        want_lse[rows[c]:rows[c] + ql] = lse.view(kvh, ql, g).permute(1, 0, 2).reshape(ql, heads)
    pad = max(map(len, tables))
    offsets = [0]
    for _, cs in sets:
        offsets.append(offsets[-1] + len(cs))
    args = (q, k_cache, v_cache, torch.tensor([t + [0] * (pad - len(t)) for t in tables]),
            torch.tensor([n for n, _ in sets]), torch.tensor(offsets), rows[:-1], torch.tensor([c[1] for c in chunks]),
            torch.tensor([c[2] for c in chunks]), bs, d ** -0.5)
    return args, want, want_lse, slice(2, int(rows[-1]))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kvh,d", SHAPES)
def test_paged_prefill_matches_attention_over_the_visible_keys(dtype: torch.dtype, heads: int, kvh: int, d: int,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    portable = load_cpu_kernels(tmp_path_factory.getbasetemp() / "portable", portable=True)
    for bs in (4, 16):
        args, want, want_lse, real = prefill_case(dtype, heads, kvh, d, bs)
        q = args[0]
        for kernels in (KERNELS, portable):
            out, lse = torch.full_like(q, 7.0), torch.full(q.shape[:2], 7.0)
            kernels.paged_prefill(*args, out=out, lse=lse)
            torch.testing.assert_close(out[real].float(), want[real], **TOL[dtype])
            torch.testing.assert_close(lse[real], want_lse[real], **TOL[dtype])
            assert out[:2].eq(7).all() and out[real.stop:].eq(7).all()  # rows outside the chunks untouched
            empty = want_lse[real].isinf()
            assert empty.any() and out[real][empty].eq(0).all()  # queries that see no key: 0, lse -inf
            out2 = torch.zeros_like(q)
            kernels.paged_prefill(*args, out=out2)  # without lse
            assert torch.equal(out2[real], out[real])


@needs_kernels
def test_paged_prefill_rejects_what_it_cannot_read() -> None:
    args, *_ = prefill_case(torch.float32, 4, 2, 16, 4)
    q, kc, vc, tables, klen, offsets, rows, qlen, lim, bs, scale = args
    out = torch.full_like(q, 7.0)
    with pytest.raises(ValueError, match="contiguous out"):
        KERNELS.paged_prefill(*args, out=out.bfloat16())
    with pytest.raises(ValueError, match="float32"):
        KERNELS.paged_prefill(*args, out=out, lse=torch.zeros(q.shape[:2]).double())
    bad = {"key count": (tables, klen + tables.shape[1] * bs, offsets, rows, qlen),  # beyond the block table
           "rows outside q": (tables, klen, offsets, rows + 2, qlen),
           "in order": (tables, klen, offsets.flip(0), rows, qlen),
           "disagree in size": (tables, klen, offsets[:-1], rows, qlen)}
    for match, (t, kl, off, r, ql) in bad.items():
        with pytest.raises(ValueError, match=match):
            KERNELS.paged_prefill(q, kc, vc, t, kl, off, r, ql, lim, bs, scale, out=out)
    assert out.eq(7).all()  # nothing written


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul_match_the_pytorch_layer(dtype: torch.dtype) -> None:
    """The fused passes against the model's PyTorch ops (rounded after every op like them): bf16
    equal but for rare one-ulp flips of the variance, fp32 within float tolerance."""
    from batchllm.models.llama import rms_norm
    gen = torch.Generator().manual_seed(6)
    x, res = (torch.randn(37, 96, generator=gen).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
    gate_up = (4 * torch.randn(37, 2 * 80, generator=gen)).to(dtype)
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # far tails and 0 of SiLU
    # atol 1e-30: SiLU far below 0 is ~1e-36 here against ~1e-42 (exp_nonpos stops at exp(-87))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-30, rtol=2 ** -7)
    h = x.clone()
    gate, up = gate_up.chunk(2, dim=-1)
    pairs = [(KERNELS.rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6)),
             (KERNELS.rms_norm(h, w, 1e-6, residual=res), rms_norm(x + res, w, 1e-6)),
             (KERNELS.silu_mul(gate_up), F.silu(gate) * up)]
    assert torch.equal(h, x + res)  # the residual stream, updated in place
    for got, want in pairs:
        torch.testing.assert_close(got, want, **tol)
        if dtype == torch.bfloat16:  # same roundings: bit-equal but for rare flips
            assert (got != want).float().mean() < 0.01
    with pytest.raises(ValueError, match="one dtype"):
        KERNELS.rms_norm(x, w.double(), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        KERNELS.rms_norm(x.t(), w[:37], 1e-6, residual=res.t())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 1000, generator=gen) * 3).to(dtype)
    x[1, 10] = x[1, 700] = x[1].max() + 1  # a tie: the first index wins
    x[2] = float("-inf")  # nothing but -inf: index 0
    x[3, 5], x[3, 900] = float("nan"), float("inf")  # a NaN wins, as in torch
    x[4, -1] = float("inf")
    assert torch.equal(KERNELS.argmax(x), x.float().argmax(-1))
    assert KERNELS.argmax(x[:0]).shape == (0,)
    with pytest.raises(ValueError, match="rows, vocab"):
        KERNELS.argmax(x[0])


@needs_kernels
def test_sampler_greedy_rows_agree_with_and_without_kernels() -> None:
    from batchllm.executor.sampler import Sampler
    from batchllm.sampling_params import SamplingParams
    from batchllm.sequence import Sequence

    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 300, generator=gen).to(torch.bfloat16)
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0.8, seed=1)] * 3
    seqs = [Sequence(i, i, 0, [1, 2, 3], 3, p, torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    a, b = Sampler(KERNELS)(logits, seqs), Sampler()(logits, seqs)
    assert a.token_ids[::2] == logits[::2].float().argmax(-1).tolist() == b.token_ids[::2]
    assert a.logprobs[::2] == b.logprobs[::2] and all(lp is not None for lp in a.logprobs[::2])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 1024, 77])
def test_apply_token_bitmask_matches_the_unpacked_mask(dtype: torch.dtype, vocab: int) -> None:
    """The kernel (structured outputs' masks) against masks.apply_token_bitmask (bits unpacked by
    NumPy): sparse, dense, empty and full rows, a partial last word, a subset of the rows."""
    import numpy as np

    from batchllm.structured.masks import apply_token_bitmask

    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(7, vocab, generator=gen).to(dtype)
    words = (vocab + 31) // 32
    bits = torch.rand(4, words * 32, generator=gen)
    bits[0] = bits[0] < 0.002  # a forced token or two
    bits[1] = bits[1] < 0.9
    bits[2] = 0  # nothing allowed
    bits[3] = 1  # everything allowed
    bits[0, 5] = 1
    bitmask = np.packbits(bits.bool().numpy(), axis=1, bitorder="little").view(np.int32)  # llguidance's layout
    rows = [5, 0, 2, 6]
    want = logits.clone()
    apply_token_bitmask(want, rows, bitmask)
    got = logits.clone()
    KERNELS.apply_token_bitmask(got, torch.tensor(rows), torch.from_numpy(bitmask))
    assert torch.equal(got, want)
    allowed = ~torch.isinf(got[rows])
    assert torch.equal(allowed, bits[:, :vocab].bool())
    assert torch.equal(got[[1, 3, 4]], logits[[1, 3, 4]])  # other rows untouched
    with pytest.raises(ValueError, match="int32 bitmask"):
        KERNELS.apply_token_bitmask(got, torch.tensor(rows[:3]), torch.from_numpy(bitmask))
    with pytest.raises(ValueError, match="outside"):
        KERNELS.apply_token_bitmask(got, torch.tensor([0, 1, 2, 7]), torch.from_numpy(bitmask))
