"""Prefix-shared attention (design §4): one dense pass per group prefix, one per own KV, lse merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from batchllm.attention.metadata import AttentionMetadata
from batchllm.attention.reference import ReferenceAttention, attend, gather_kv

Mode = Literal["auto", "prefix-shared", "reference"]

# NOTE: measured with bench/bench_attention.py (decode, 8 q heads / 2 KV heads / d 64, own part 100
# tokens, 2 threads, medians). Shared path vs reference, time ratio:
#   L=64: loses or ties at every m (prefix is smaller than the own part; extra ops dominate).
#   L=256: m=2 ~0.9x (loses), m=4 ~1.2-1.6x, m>=8 ~2-4x.   L=1000: m=2 ~1.3x, m=4 ~2.2x, m=16 ~6-9x.
# The win tracks the KV tokens saved, (m-1)*L per group, against a fixed extra cost of ~20 ops.
# Cut-off: share when a group in the step saves >= MIN_SAVED_TOKENS and has >= MIN_MEMBERS.
MIN_MEMBERS = 4
MIN_PREFIX_TOKENS = 128
MIN_SAVED_TOKENS = 1536

# NOTE: groups are padded together into buckets; a bucket is split when its padded
# rows x prefix area would exceed BUCKET_SLACK x the real area; at most MAX_BUCKETS buckets, so the
# op count per layer is bounded no matter how many groups the step has.
BUCKET_SLACK = 2.0
MAX_BUCKETS = 4
# NOTE: attend materialises fp32 scores [rows x heads x KV]; query rows are cut into pieces of at
# most MAX_ROWS (a group's stacked rows, a prefill chunk) to bound memory (512 x 8 heads x 4096 KV
# = 64 MiB). Decode groups (one row per member) never get cut.
MAX_ROWS = 512


@dataclass
class GroupBucket:
    """Groups padded to a common shape: `rows` [G, R] flat query rows (padding: 0), `blocks`
    [G, P] prefix blocks (padding: null block 0), `valid` [G, 1, 1, P*bs] (None: no padding),
    `src` the real entries of the flattened [G*R] rows (None: all), `dst` their flat rows (None:
    exactly 0..num_tokens-1, i.e. this bucket covers the whole step in order)."""

    rows: torch.Tensor
    blocks: torch.Tensor
    valid: torch.Tensor | None
    src: torch.Tensor | None
    dst: torch.Tensor | None


@dataclass
class PrefixSharedPrepared:
    """Index tensors of one step for `PrefixSharedAttention.forward`."""

    buckets: list[GroupBucket]
    decode_rows: torch.Tensor | None  # [Bd] flat rows of decode queries (None: all rows, in order)
    num_decodes: int
    decode_blocks: torch.Tensor  # [Bd, nb] own-part blocks (from shared_len on)
    decode_valid: torch.Tensor | None  # [Bd, 1, 1, nb*bs]
    prefills: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (row start, q len, own blocks, mask [n, T])
    block_size: int
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
    """Group prefixes attended once per group (all members' queries stacked), own KV per sequence."""

    name = "prefix-shared"

    def prepare(self, meta: AttentionMetadata) -> PrefixSharedPrepared:
        bs, dev = meta.block_size, meta.device
        shared = [0] * meta.num_seqs
        items = []
        for blocks, members in _groups(meta).items():
            rows = [r for i in members for r in range(meta.query_starts[i], meta.query_starts[i] + meta.query_lens[i])]
            for c in range(0, len(rows), MAX_ROWS):
                piece = rows[c:c + MAX_ROWS]
                items.append((len(piece), len(blocks), (blocks, piece)))
            for i in members:
                shared[i] = meta.shared_lens[i]
        buckets = []
        # NOTE: identity index maps are stored as None so forward skips the gather/scatter ops.
        everything = list(range(meta.num_tokens))
        for b in _bucketize(items):
            n_rows, n_blocks = max(t[0] for t in b), max(t[1] for t in b)
            rows = torch.zeros(len(b), n_rows, dtype=torch.long)
            blocks = torch.zeros(len(b), n_blocks, dtype=torch.long)
            src, dst = [], []
            for j, (nr, nb, (bl, rw)) in enumerate(b):
                rows[j, :nr] = torch.tensor(rw)
                blocks[j, :nb] = torch.tensor(bl)
                src.extend(range(j * n_rows, j * n_rows + nr))
                dst.extend(rw)
            plen = torch.tensor([t[1] * bs for t in b])
            valid = None
            if bool((plen < n_blocks * bs).any()):
                valid = (torch.arange(n_blocks * bs)[None, :] < plen[:, None])[:, None, None, :].to(dev)
            src_t = None if len(src) == rows.numel() else torch.tensor(src, dtype=torch.long, device=dev)
            dst_t = None if dst == everything else torch.tensor(dst, dtype=torch.long, device=dev)
            buckets.append(GroupBucket(rows.to(dev), blocks.to(dev), valid, src_t, dst_t))
        # Own parts: positions shared .. ctx, always non-empty (a query sits at >= shared).
        own_blocks = [meta.block_tables[i][shared[i] // bs: -(-meta.context_lens[i] // bs)] for i in range(meta.num_seqs)]
        own_lens = [meta.context_lens[i] - shared[i] for i in range(meta.num_seqs)]
        decode = [i for i, q in enumerate(meta.query_lens) if q == 1]
        nb = max((len(own_blocks[i]) for i in decode), default=0)
        dblocks = torch.zeros(len(decode), nb, dtype=torch.long)
        for j, i in enumerate(decode):
            dblocks[j, : len(own_blocks[i])] = torch.tensor(own_blocks[i], dtype=torch.long)
        dlens = torch.tensor([own_lens[i] for i in decode], dtype=torch.long)
        dvalid = None
        if bool((dlens < nb * bs).any()):
            dvalid = (torch.arange(nb * bs)[None, :] < dlens[:, None])[:, None, None, :].to(dev)
        prefills = []
        for i, n in enumerate(meta.query_lens):
            for c in range(0, n if n > 1 else 0, MAX_ROWS):
                # Piece c .. c+nc of the chunk: its queries sit at own positions t-nc .. t-1 and
                # query j sees own positions 0 .. t-nc+j, so it needs own KV 0 .. t-1 only.
                nc = min(MAX_ROWS, n - c)
                t = own_lens[i] - n + c + nc
                mask = torch.arange(t)[None, :] <= torch.arange(t - nc, t)[:, None]
                bt = torch.tensor(own_blocks[i][: -(-t // bs)], dtype=torch.long, device=dev)
                prefills.append((meta.query_starts[i] + c, nc, bt, mask.to(dev)))
        drows = [meta.query_starts[i] for i in decode]
        drows_t = None if drows == everything else torch.tensor(drows, dtype=torch.long, device=dev)
        return PrefixSharedPrepared(buckets, drows_t, len(decode), dblocks.to(dev), dvalid, prefills, bs)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: PrefixSharedPrepared, scale: float) -> torch.Tensor:
        """Same contract as `AttentionBackend.forward`."""
        n_tok, heads, d = q.shape
        kvh = k_cache.shape[1]
        g = heads // kvh
        p, bs = prepared, prepared.block_size
        # Own part first, into (o_own, lse_own).
        if p.decode_rows is None:  # decode-only step: no gather/scatter of rows
            o_own, lse_own = self._decode_own(q, k_cache, v_cache, p, scale)
        else:
            o_own = torch.empty_like(q)
            lse_own = torch.empty(n_tok, heads, dtype=torch.float32, device=q.device)
            if p.num_decodes:
                o_own[p.decode_rows], lse_own[p.decode_rows] = self._decode_own(q[p.decode_rows], k_cache, v_cache, p, scale)
        for start, n, bt, mask in p.prefills:
            t = mask.shape[1]
            # NOTE: q as [kvh, g, n, d] against k [kvh, 1, T, d]: the mask [n, T] broadcasts, no g fold needed.
            qp = q[start:start + n].view(n, kvh, g, d).permute(1, 2, 0, 3)
            k = gather_kv(k_cache, bt, bs)[:t].transpose(0, 1)[:, None]
            v = gather_kv(v_cache, bt, bs)[:t].transpose(0, 1)[:, None]
            o, lse = attend(qp, k, v, mask, scale)  # [kvh, g, n, d], [kvh, g, n]
            o_own[start:start + n] = o.permute(2, 0, 1, 3).reshape(n, heads, d)
            lse_own[start:start + n] = lse.permute(2, 0, 1).reshape(n, heads)
        # Prefix part: one batched pass per bucket, each group's prefix KV gathered once, then merged
        # into the own part's rows (ungrouped rows keep their own-part result untouched).
        out = o_own
        for bk in p.buckets:
            gn, r = bk.rows.shape
            qg = q[bk.rows].view(gn, r, kvh, g, d).permute(0, 2, 1, 3, 4).reshape(gn, kvh, r * g, d)
            k = gather_kv(k_cache, bk.blocks, bs).transpose(1, 2)  # [G, kvh, L, d]
            v = gather_kv(v_cache, bk.blocks, bs).transpose(1, 2)
            o, lse = attend(qg, k, v, bk.valid, scale)  # [G, kvh, R*g, d], [G, kvh, R*g]
            o = o.view(gn, kvh, r, g, d).permute(0, 2, 1, 3, 4).reshape(gn * r, heads, d)
            lse = lse.view(gn, kvh, r, g).permute(0, 2, 1, 3).reshape(gn * r, heads)
            if bk.src is not None:
                o, lse = o[bk.src], lse[bk.src]
            if bk.dst is None:
                return merge_attention(o, lse, o_own, lse_own).to(q.dtype)
            out[bk.dst] = merge_attention(o, lse, o_own[bk.dst], lse_own[bk.dst]).to(q.dtype)
        return out

    @staticmethod
    def _decode_own(qd: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: PrefixSharedPrepared,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Own-part attention of the decode queries `qd` [Bd, H, d] -> ([Bd, H, d], lse [Bd, H])."""
        b, heads, d = qd.shape
        kvh = k_cache.shape[1]
        k = gather_kv(k_cache, p.decode_blocks, p.block_size).transpose(1, 2)  # [B, kvh, T, d]
        v = gather_kv(v_cache, p.decode_blocks, p.block_size).transpose(1, 2)
        o, lse = attend(qd.view(b, kvh, heads // kvh, d), k, v, p.decode_valid, scale)
        return o.reshape(b, heads, d), lse.reshape(b, heads)


def should_share(meta: AttentionMetadata) -> bool:
    """True when some group in the step shares enough KV reads for the shared path to pay off."""
    for blocks, members in _groups(meta).items():
        m, plen = len(members), len(blocks) * meta.block_size
        if m >= MIN_MEMBERS and plen >= MIN_PREFIX_TOKENS and (m - 1) * plen >= MIN_SAVED_TOKENS:
            return True
    return False


def select_backend(meta: AttentionMetadata) -> str:
    """"prefix-shared" or "reference" for this step, by `should_share`."""
    return "prefix-shared" if should_share(meta) else "reference"


def kv_bytes_read(meta: AttentionMetadata, path: str, num_layers: int, bytes_per_token_per_layer: int) -> int:
    """KV bytes one step reads on `path` (real tokens only; padding to the null block not counted).

    reference: every sequence reads its whole context. prefix-shared: each group prefix once
    (once per MAX_ROWS stacked query rows, which only prefill-heavy groups exceed), plus every
    sequence's own part.
    """
    tokens = sum(meta.context_lens)
    if path == "prefix-shared":
        for blocks, members in _groups(meta).items():
            reads = -(-sum(meta.query_lens[i] for i in members) // MAX_ROWS)
            tokens -= (len(members) - reads) * len(blocks) * meta.block_size
    elif path != "reference":
        raise ValueError(f"unknown path {path!r}")
    return tokens * num_layers * bytes_per_token_per_layer


@dataclass
class AutoPrepared:
    """The chosen `path` for the step and that backend's prepared object."""

    path: str
    inner: Any


class AutoAttention:
    """Backend that picks the reference or prefix-shared path per step (`mode="auto"`) or forces one.

    The decision is made in `prepare`, returned as `AutoPrepared.path` and kept in `last_path`.
    """

    name = "auto"

    def __init__(self, mode: Mode = "auto") -> None:
        if mode not in ("auto", "prefix-shared", "reference"):
            raise ValueError(f"unknown attention mode {mode!r}")
        self.mode = mode
        self.backends: dict[str, Any] = {"reference": ReferenceAttention(), "prefix-shared": PrefixSharedAttention()}
        self.last_path: str | None = None

    def prepare(self, meta: AttentionMetadata) -> AutoPrepared:
        path = select_backend(meta) if self.mode == "auto" else self.mode
        self.last_path = path
        return AutoPrepared(path, self.backends[path].prepare(meta))

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                prepared: AutoPrepared, scale: float) -> torch.Tensor:
        return self.backends[prepared.path].forward(q, k_cache, v_cache, prepared.inner, scale)
