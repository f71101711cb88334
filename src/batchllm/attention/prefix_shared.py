"""Prefix-shared attention (docs/design.md §4): one dense pass per group prefix, one per own KV, lse merge."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import torch

from batchllm.attention.metadata import AttentionMetadata, pad_rows
from batchllm.attention.reference import (PrefillBucket, PrefillChunks, ReferenceAttention, attend, attend_bucket,
                                         attend_chunks, attend_decode, bucket_prefills, gather_kv, prefill_bucket,
                                         prefill_chunks)
from batchllm.kernels.cpu import CpuKernels

Mode = Literal["auto", "prefix-shared", "reference"]

# NOTE: thresholds measured with `bench/bench_attention.py --sweep --groups 1 --rounds 2` on the
# 2-core dev CPU (decode, 8 q / 2 KV heads, d 64, own part 100, block 16, 2 threads, the engine's
# allocator setting). Speedup of the shared path over the reference for m = 1, 2, 4, 8, 16, 32
# members and prefix L (saved = (m-1)*L tokens):
# - all PyTorch (cpu_kernels=False): the shared path pays a fixed ~0.2 ms per layer (a batched
#   prefix pass, the merge, a dozen small ops) and wins from about 8,000-12,000 saved tokens
#   (G=8 m=2 L=1000, 7,936 saved: bf16 1.08x, fp32 0.82x; G=4 m=4 L=1000, 11,904: 1.23x / 1.09x).
MIN_SAVED_TOKENS = 12288
# - with the C kernels, grouped decodes are one C call (shared_decode) against one C call per
#   sequence (paged_decode). Re-measured on the Zen 5 dev CPU after the kernels' one-pass softmax
#   (which sped up both paths); the shared path wins in every cell, so the threshold (set on Zen
#   4, where it lost 0.98x at m=1 L=1000) stays:
#   bf16 L=64: 1.19 1.27 1.32 1.48 1.47 1.36; L=1000: 1.18 1.34 1.57 1.76 1.80 1.85
#   fp32 L=64: 1.22 1.28 1.38 1.66 1.53 1.48; L=1000: 1.07 1.21 1.34 1.51 1.42 1.44
# The gain is bounded by the arithmetic: a group's prefix pass does the same multiply-adds as the
# members' per-sequence passes, and the per-sequence kernel finds a group's prefix in cache after
# its first member, so what sharing saves is mostly instructions. At G=4 m=16 L=1000 the bf16 peak
# allows at most ~3.6x over the per-sequence kernel (bench_attention's `ceiling`; ~4.6x with the
# KV cold, `--cold`), where GPUs, with far more FLOP per byte of memory, see 5-30x.
MIN_SAVED_TOKENS_KERNELS = 1024

# NOTE: on the PyTorch path (with kernels every prefill pass is one C call per step, `paged_prefill`)
# groups are padded together into buckets; a bucket is split when its padded
# rows x prefix area would exceed BUCKET_SLACK x the real area; at most MAX_BUCKETS buckets, so the
# op count per layer is bounded no matter how many groups the step has. Measured on the planning
# workload (16 groups x 16, bf16): slack 1.25 / 8 buckets computes 435 instead of 726 GFLOP of
# prefix passes (decode groups no longer pad to a prefill group's rows) and runs 7% faster end
# to end than slack 2.0 / 4 buckets.
BUCKET_SLACK = 1.25
MAX_BUCKETS = 8
# NOTE: query rows are cut into pieces of at most MAX_ROWS (a group's stacked rows, a continuing
# prefill chunk) to bound per-pass memory: the scores on attend's matmul paths (512 x 8 heads x
# 4096 KV) or the flash kernel's additive mask. Fresh chunks are not cut (under the flash kernel
# they run causal without a mask). The C path needs no cutting: it works in tiles of rows. Decode
# groups have one row per member, so only groups of > 512 get cut. Own prefill pieces are then
# padded into buckets (`bucket_prefills`), as the reference backend does with prefill chunks.
MAX_ROWS = 512
# NOTE: with kernels, `auto` shares the prefix only for decode queries; members' prefill chunks go
# per sequence (over prefix + own keys, no merge). Prefill attention is matrix-matrix either way
# and compute-bound, so the shared pass saves only the per-member K packing and pays a second, small
# own pass plus the merge. Measured (`paged_prefill`, bf16, 8 q / 2 KV heads, d 64, one layer,
# per-sequence vs shared + merge): m=16 L=1000 own 110: 13.3 vs 14.9 ms; m=32 L=1000: 26.3 vs
# 30.1; m=8 L=4000 own 100: 23.2 vs 23.3; m=16 own 20: 2.48 vs 2.54; m=4 L=2000 own 300: 17.6 vs
# 19.0. Forcing `attention="prefix-shared"` keeps the shared prefill pass.
SHARE_PREFILL_WITH_KERNELS = False
# NOTE: with kernels, decode queries of group members run in C (`CpuKernels.shared_decode`), this
# many members per pass over their group's prefix. Measured (bf16, 8 q / 2 KV heads, d 64, own
# part 100), ms per layer for 4, 8, 16, 32 members: G=4 m=16 L=1000 0.89 0.76 0.69 0.69 (per-
# sequence C decode: 1.00); G=1 m=32 L=1000 0.45 0.38 0.35 0.33 (0.48).
SHARED_DECODE_MEMBERS = 16


@dataclass
class GroupBucket:
    """Groups padded to a common shape: `rows` [G, R] flat query rows (padding: 0), `blocks`
    [G, P] prefix blocks (padding: null block 0), `limits` [1, G, 1] prefix tokens per group
    (None: no padding),
    `src` the real entries of the flattened [G*R] rows (None: all), `dst` their flat rows (None:
    exactly 0..num_tokens-1, i.e. this bucket covers the whole step in order)."""

    rows: torch.Tensor
    blocks: torch.Tensor
    limits: torch.Tensor | None
    src: torch.Tensor | None
    dst: torch.Tensor | None


@dataclass
class GroupDecodes:
    """Decode queries of group members for `CpuKernels.shared_decode` (prefix and own part in C):
    `rows` [N] flat rows, group by group (None: exactly 0..num_tokens-1), `offsets` [G+1],
    `prefix_blocks` [G, P] / `prefix_lens` [G], `own_blocks` [N, O] / `own_lens` [N]."""

    rows: torch.Tensor | None
    offsets: torch.Tensor
    prefix_blocks: torch.Tensor
    prefix_lens: torch.Tensor
    own_blocks: torch.Tensor
    own_lens: torch.Tensor


@dataclass
class PrefixSharedPrepared:
    """Index tensors of one step for `PrefixSharedAttention.forward`."""

    buckets: list[GroupBucket]
    decode_rows: torch.Tensor | None  # [Bd] flat rows of decode queries (None: all rows, in order)
    num_decodes: int
    decode_blocks: torch.Tensor  # [Bd, nb] own-part blocks (from shared_len on)
    decode_lens: torch.Tensor  # [Bd] own KV tokens of each decode query
    prefills: list[PrefillBucket]  # members' and ungrouped sequences' own prefill pieces, bucketed
    block_size: int
    group_decodes: GroupDecodes | None = None  # with kernels: grouped decode queries, all in C
    # with kernels, instead of `buckets` and `prefills`: group members' prefill queries over their
    # prefix (one key set per group) and every own prefill piece, each in one C call
    prefix_chunks: PrefillChunks | None = None
    own_chunks: PrefillChunks | None = None
    path: str = "prefix-shared"


def _groups(meta: AttentionMetadata) -> dict[tuple[int, ...], list[int]]:
    """Sequences keyed by their shared prefix blocks (only group members with shared_len > 0).

    NOTE: keyed by the physical blocks rather than group id, so a wrong group id can never mix KV.
    """
    out: dict[tuple[int, ...], list[int]] = {}
    for i, (gid, sl) in enumerate(zip(meta.group_ids, meta.shared_lens)):
        if gid >= 0 and sl > 0:
            out.setdefault(tuple(meta.block_tables[i][: sl // meta.block_size]), []).append(i)
    return out


def _bucketize(items: list[tuple[int, int, Any]]) -> list[list[tuple[int, int, Any]]]:
    """Split (rows, prefix blocks, payload) items into <= MAX_BUCKETS buckets of similar shape."""
    buckets: list[list[tuple[int, int, Any]]] = []
    for it in sorted(items, key=lambda t: (t[1], t[0]), reverse=True):
        b = buckets[-1] if buckets else None
        if b is not None:
            cand = b + [it]
            padded = len(cand) * max(t[0] for t in cand) * max(t[1] for t in cand)
            if padded <= BUCKET_SLACK * sum(t[0] * t[1] for t in cand) or len(buckets) == MAX_BUCKETS:
                b.append(it)
                continue
        buckets.append([it])
    return buckets


def _limits(lens: list[int], width: int, dev: torch.device) -> torch.Tensor | None:
    """[1, B, 1] key limits (`lens`) for [kvh, B, rows, width] scores; None when nothing is padded."""
    if all(n == width for n in lens):
        return None
    return torch.tensor(lens, dtype=torch.long, device=dev)[None, :, None]


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Merge two partial attentions (o [..., d], lse [...]) stably; an lse of -inf is an empty part.

    Returns float32; rows where both parts are empty get 0 (empty parts have o = 0).
    NOTE: with m = max(lse1, lse2), the weight of part 1, e^{lse1-m} / (e^{lse1-m} + e^{lse2-m}),
    is exactly sigmoid(lse1 - lse2): same stable formula in fewer ops. -inf - x gives weight 0,
    x - -inf weight 1 (exact no-op merges); -inf - -inf = NaN is mapped to 0.
    """
    w = torch.sigmoid((lse1 - lse2).nan_to_num(nan=0.0)).unsqueeze(-1)
    o2 = o2.float()
    return o2 + w * (o1.float() - o2)


class PrefixSharedAttention:
    """Group prefixes attended once per group (all members' queries stacked), own KV per sequence.

    With `kernels` (CPU) every pass reads the pool in C, with no gathered copy: grouped decodes
    (`shared_decode`, prefix and own part in one call), other decodes' own parts (`paged_decode`),
    members' prefill chunks over their prefix and all own prefill pieces (`paged_prefill`, one
    call each); the log-sum-exp merge of prefill rows stays in PyTorch. With `share_prefill`
    False, members' prefill chunks are attended per sequence instead, like every other prefill
    chunk (see SHARE_PREFILL_WITH_KERNELS). With `prefill_in_c` False (no fast C path for the
    head size) prefill goes the PyTorch way. Without kernels, the backend is PyTorch only.
    """

    name = "prefix-shared"

    def __init__(self, kernels: CpuKernels | None = None, share_prefill: bool = True, prefill_in_c: bool = True) -> None:
        self.kernels = kernels
        self.share_prefill = share_prefill
        self.prefill_in_c = prefill_in_c

    def prepare(self, meta: AttentionMetadata) -> PrefixSharedPrepared:
        bs, dev = meta.block_size, meta.device
        in_c = self.kernels is not None and dev.type == "cpu"
        shared = [0] * meta.num_seqs
        groups = _groups(meta)
        decodes_in_c: list[tuple[tuple[int, ...], list[int]]] = []  # with kernels, grouped decodes run in C
        if in_c:
            for blocks, members in groups.items():
                decodes_in_c.append((blocks, [i for i in members if meta.query_lens[i] == 1]))
                groups[blocks] = [i for i in members if meta.query_lens[i] > 1]
            decodes_in_c = [(b, m) for b, m in decodes_in_c if m]
        # With kernels and share_prefill off, members' prefill chunks attend their whole block
        # table in one pass, as the reference backend does (SHARE_PREFILL_WITH_KERNELS).
        prefill_c = in_c and self.prefill_in_c
        groups = {b: m for b, m in groups.items() if m and (self.share_prefill or not prefill_c)}
        for members in [m for _, m in decodes_in_c] + list(groups.values()):
            for i in members:
                shared[i] = meta.shared_lens[i]
        # Own parts: positions shared .. ctx, never empty (queries sit at >= shared).
        own_blocks = [meta.block_tables[i][shared[i] // bs: -(-meta.context_lens[i] // bs)]
                      for i in range(meta.num_seqs)]
        own_lens = [meta.context_lens[i] - shared[i] for i in range(meta.num_seqs)]
        c_seqs = {i for _, m in decodes_in_c for i in m}
        decode = [i for i, q in enumerate(meta.query_lens) if q == 1 and i not in c_seqs]
        everything = list(range(meta.num_tokens))
        drows = [meta.query_starts[i] for i in decode]
        prepared = PrefixSharedPrepared(
            [], None if drows == everything else torch.tensor(drows, dtype=torch.long, device=dev), len(decode),
            pad_rows([own_blocks[i] for i in decode], dev),
            torch.tensor([own_lens[i] for i in decode], dtype=torch.long, device=dev), [], bs)
        if decodes_in_c:
            seqs = [i for _, m in decodes_in_c for i in m]
            crows = [meta.query_starts[i] for i in seqs]
            prepared.group_decodes = GroupDecodes(
                None if crows == everything else torch.tensor(crows, device=dev),
                torch.tensor([0, *itertools.accumulate(len(m) for _, m in decodes_in_c)], device=dev),
                pad_rows([list(b) for b, _ in decodes_in_c], dev),
                torch.tensor([len(b) * bs for b, _ in decodes_in_c], device=dev),
                pad_rows([own_blocks[i] for i in seqs], dev), torch.tensor([own_lens[i] for i in seqs], device=dev))
        prefills = [i for i, n in enumerate(meta.query_lens) if n > 1]
        if prefill_c:  # one key set per group prefix (members' chunks see all of it), one per own piece (causal)
            if groups:
                prepared.prefix_chunks = prefill_chunks(
                    [(list(b), len(b) * bs, [(meta.query_starts[i], meta.query_lens[i], len(b) * bs) for i in m])
                     for b, m in groups.items()], dev)
            if prefills:
                prepared.own_chunks = prefill_chunks(
                    [(own_blocks[i], own_lens[i], [(meta.query_starts[i], meta.query_lens[i],
                                                    own_lens[i] - meta.query_lens[i] + 1)]) for i in prefills], dev)
            return prepared
        prepared.buckets = self._group_buckets(meta, groups)
        pieces = []  # (q_len, own ctx_len, first flat row, own blocks) of each own prefill piece
        for i in prefills:
            n = meta.query_lens[i]
            if own_lens[i] == n:  # fresh own part: one causal piece, not cut
                pieces.append((n, n, meta.query_starts[i], own_blocks[i]))
                continue
            for c in range(0, n, MAX_ROWS):
                # Piece c .. c+nc of the chunk: its queries sit at own positions t-nc .. t-1 and
                # query j sees own positions 0 .. t-nc+j, so it needs own KV 0 .. t-1 only.
                nc = min(MAX_ROWS, n - c)
                t = own_lens[i] - n + c + nc
                pieces.append((nc, t, meta.query_starts[i] + c, own_blocks[i]))
        prepared.prefills = [prefill_bucket([pieces[j] for j in b], bs, dev)
                             for b in bucket_prefills([p[:2] for p in pieces])]
        return prepared

    @staticmethod
    def _group_buckets(meta: AttentionMetadata, groups: dict[tuple[int, ...], list[int]]) -> list[GroupBucket]:
        """The PyTorch path's prefix passes: groups' query rows cut into MAX_ROWS pieces, bucketed."""
        bs, dev = meta.block_size, meta.device
        items = []
        for blocks, members in groups.items():
            rows = [r for i in members for r in range(meta.query_starts[i], meta.query_starts[i] + meta.query_lens[i])]
            items += [(len(rows[c:c + MAX_ROWS]), len(blocks), (blocks, rows[c:c + MAX_ROWS]))
                      for c in range(0, len(rows), MAX_ROWS)]
        # NOTE: identity index maps are stored as None so forward skips those gather/scatter ops.
        everything = list(range(meta.num_tokens))
        buckets = []
        for b in _bucketize(items):
            width = max(t[0] for t in b)
            src = [j * width + r for j, t in enumerate(b) for r in range(t[0])]
            dst = [r for t in b for r in t[2][1]]
            buckets.append(GroupBucket(
                pad_rows([t[2][1] for t in b], dev), pad_rows([list(t[2][0]) for t in b], dev),
                _limits([t[1] * bs for t in b], max(t[1] for t in b) * bs, dev),
                None if len(src) == len(b) * width else torch.tensor(src, device=dev),
                None if dst == everything else torch.tensor(dst, device=dev)))
        return buckets

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: PrefixSharedPrepared, scale: float) -> torch.Tensor:
        """Same contract as `AttentionBackend.forward`."""
        n_tok, heads, d = q.shape
        kvh = k_cache.shape[0]
        g = heads // kvh
        p, bs = prepared, prepared.block_size
        gd = p.group_decodes
        if gd is not None and gd.rows is None:  # every query is a group member's decode
            return self._group_decodes(q, k_cache, v_cache, gd, bs, scale)
        # Own part first, into (o_own, lse_own).
        if p.decode_rows is None:  # decode-only step: no gather/scatter of rows
            o_own, lse_own = self._decode_own(q, k_cache, v_cache, p, scale)
        else:
            o_own = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse_own = torch.empty(n_tok, heads, dtype=torch.float32, device=q.device)
            if p.num_decodes:
                o_own[p.decode_rows], lse_own[p.decode_rows] = self._decode_own(q[p.decode_rows], k_cache, v_cache,
                                                                                p, scale)
        for bucket in p.prefills:
            o_own[bucket.real_rows], lse_own[bucket.real_rows] = attend_bucket(q, k_cache, v_cache, bucket, bs, scale,
                                                                               need_lse=True)
        if p.own_chunks is not None:
            assert self.kernels is not None
            attend_chunks(q, k_cache, v_cache, p.own_chunks, bs, scale, self.kernels, o_own, lse_own)
        # Prefix part: one batched pass per bucket, each group's prefix KV gathered once, then merged
        # into the own part's rows (ungrouped rows keep their own-part result untouched).
        out = o_own
        for bk in p.buckets:
            gn, r = bk.rows.shape
            qg = q[bk.rows].view(gn, r, kvh, g, d).permute(2, 0, 1, 3, 4).reshape(kvh, gn, r * g, d)
            k = gather_kv(k_cache, bk.blocks, bs)  # [kvh, G, L, d]
            v = gather_kv(v_cache, bk.blocks, bs)
            o, lse = attend(qg, k, v, bk.limits, scale)  # [kvh, G, R*g, d], [kvh, G, R*g]
            o = o.view(kvh, gn, r, g, d).permute(1, 2, 0, 3, 4).reshape(gn * r, heads, d)
            lse = lse.view(kvh, gn, r, g).permute(1, 2, 0, 3).reshape(gn * r, heads)
            if bk.src is not None:
                o, lse = o[bk.src], lse[bk.src]
            if bk.dst is None:
                return merge_attention(o, lse, o_own, lse_own).to(q.dtype)
            out[bk.dst] = merge_attention(o, lse, o_own[bk.dst], lse_own[bk.dst]).to(q.dtype)
        if p.prefix_chunks is not None:
            assert self.kernels is not None
            o_pre = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse_pre = torch.empty(n_tok, heads, dtype=torch.float32, device=q.device)
            attend_chunks(q, k_cache, v_cache, p.prefix_chunks, bs, scale, self.kernels, o_pre, lse_pre)
            rows = p.prefix_chunks.real_rows
            out[rows] = merge_attention(o_pre[rows], lse_pre[rows], o_own[rows], lse_own[rows]).to(q.dtype)
        if gd is not None:
            out[gd.rows] = self._group_decodes(q[gd.rows], k_cache, v_cache, gd, bs, scale)
        return out

    def _group_decodes(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, gd: GroupDecodes,
                       bs: int, scale: float) -> torch.Tensor:
        assert self.kernels is not None
        return self.kernels.shared_decode(q, k_cache, v_cache, gd.offsets, gd.prefix_blocks, gd.prefix_lens,
                                          gd.own_blocks, gd.own_lens, bs, scale, SHARED_DECODE_MEMBERS)

    def _decode_own(self, qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: PrefixSharedPrepared,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Own-part attention of the decode queries `qd` [Bd, H, d] -> ([Bd, H, d], lse [Bd, H])."""
        o, lse = attend_decode(qd, k_cache, v_cache, p.decode_blocks, p.decode_lens, p.block_size, scale,
                               self.kernels, need_lse=True)
        assert lse is not None
        return o, lse


def saved_tokens(meta: AttentionMetadata, decode_only: bool = False) -> int:
    """KV tokens per layer the shared path does not read: about (members - 1) * prefix per group
    (`decode_only`: as the C kernels share, members' decode queries only, the prefix read once per
    SHARED_DECODE_MEMBERS of them)."""
    return _kv_tokens(meta, "reference") - _kv_tokens(meta, "prefix-shared", decode_only)


def should_share(meta: AttentionMetadata, kernels: bool = False, prefill: bool = True) -> bool:
    """True when the step's groups share enough KV reads for the shared path to pay off
    (`kernels`: the C kernels are in use, which moves the threshold; `prefill` False: the shared
    path shares decode queries only, so only those count)."""
    saved = saved_tokens(meta, decode_only=not prefill)
    return saved >= (MIN_SAVED_TOKENS_KERNELS if kernels else MIN_SAVED_TOKENS)


def select_backend(meta: AttentionMetadata, kernels: bool = False, prefill: bool = True) -> str:
    """"prefix-shared" or "reference" for this step, by `should_share`."""
    return "prefix-shared" if should_share(meta, kernels, prefill) else "reference"


def _kv_tokens(meta: AttentionMetadata, path: str, decode_only: bool = False) -> int:
    tokens = sum(meta.context_lens)
    if path == "prefix-shared":
        for blocks, members in _groups(meta).items():
            if decode_only:  # shared_decode: SHARED_DECODE_MEMBERS decode queries per prefix read
                members = [i for i in members if meta.query_lens[i] == 1]
                reads = -(-len(members) // SHARED_DECODE_MEMBERS)
            else:  # the PyTorch passes: MAX_ROWS stacked query rows per prefix read
                reads = -(-sum(meta.query_lens[i] for i in members) // MAX_ROWS)
            tokens -= (len(members) - reads) * len(blocks) * meta.block_size
    elif path != "reference":
        raise ValueError(f"unknown path {path!r}")
    return tokens


def kv_bytes_read(meta: AttentionMetadata, path: str, num_layers: int, bytes_per_token_per_layer: int,
                  decode_only: bool = False) -> int:
    """KV bytes one step reads on `path` (real tokens only; padding to the null block not counted).

    reference: every sequence reads its whole context. prefix-shared: each group prefix once
    (once per MAX_ROWS stacked query rows, which only prefill-heavy groups exceed), plus every
    sequence's own part; `decode_only` as in `saved_tokens`. `bytes_per_token_per_layer` = 2 *
    kv_heads * head_dim * element size.
    """
    return _kv_tokens(meta, path, decode_only) * num_layers * bytes_per_token_per_layer


@dataclass
class AutoPrepared:
    """The chosen `path` for the step and that backend's prepared object."""

    path: str
    inner: Any


class AutoAttention:
    """Backend that picks the reference or prefix-shared path per step (`mode="auto"`) or forces one.

    The decision is made in `prepare`, returned as `AutoPrepared.path` and kept in `last_path`.
    `kernels` (CPU) go to both backends, with prefill in C where `prefill_in_c` (the engine passes
    `CpuKernels.fast_prefill(head_dim)`); then, under `auto`, the prefix-shared one shares decode
    queries only (SHARE_PREFILL_WITH_KERNELS).
    """

    name = "auto"

    def __init__(self, mode: Mode = "auto", kernels: CpuKernels | None = None, prefill_in_c: bool = True) -> None:
        if mode not in ("auto", "prefix-shared", "reference"):
            raise ValueError(f"unknown attention mode {mode!r}")
        self.mode = mode
        prefill_in_c = prefill_in_c and kernels is not None
        share_prefill = mode == "prefix-shared" or not prefill_in_c or SHARE_PREFILL_WITH_KERNELS
        self.backends: dict[str, Any] = {
            "reference": ReferenceAttention(kernels, prefill_in_c),
            "prefix-shared": PrefixSharedAttention(kernels, share_prefill, prefill_in_c)}
        self.kernels = kernels
        self.last_path: str | None = None

    def prepare(self, meta: AttentionMetadata) -> AutoPrepared:
        share_prefill = self.backends["prefix-shared"].share_prefill
        path = select_backend(meta, self.kernels is not None, share_prefill) if self.mode == "auto" else self.mode
        self.last_path = path
        return AutoPrepared(path, self.backends[path].prepare(meta))

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: AutoPrepared, scale: float) -> torch.Tensor:
        return self.backends[prepared.path].forward(q, k_cache, v_cache, prepared.inner, scale)
