"""The paged KV pool: fixed-size blocks with reference counts, and block tables per sequence."""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from batchllm.sequence import Sequence

NULL_BLOCK = 0
MAX_CLAIM = 64  # blocks a sequence claims ahead at most (1,024 tokens at block 16)


class BlockManager:
    """Owns which KV blocks are free, referenced or cached.

    NOTE: block 0 is a reserved all-zero "null" block. Padded gathers in attention point at it,
    so masked positions never read uninitialised memory. Usable blocks are 1..num_blocks.

    Blocks carry reference counts: a prefix-sharing group's prefix blocks are referenced by the
    prefix pseudo-sequence and by every member. With `enable_caching` (the `fcfs-lru` and `lpm`
    policies) a full block whose count drops to zero keeps its content, keyed by a hash chain
    over the tokens up to its end, and is evicted least-recently-used first when space is needed.

    NOTE: the chain is a 128-bit BLAKE2b digest of the previous block's digest and the block's
    token ids as fixed-width 64-bit integers, and a lookup trusts it without comparing tokens, so
    it has to be collision-free in practice: Python's 64-bit `hash` of a tuple is not (equal for
    ids that differ by 2**61 - 1, and forgeable), and a collision would silently reuse another
    prompt's KV. A digest costs under 1 us, once per block of a sequence (the chain is
    kept and extended, see `_seq_hashes`); lookups stay dictionary lookups.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * (num_blocks + 1)
        # Free blocks (holding nothing cached): `_is_free[b]` is 1, and `_open[b]` too unless a
        # running sequence has claimed b as one of its next blocks (`_claim[b]`, its seq_id).
        self._is_free = bytearray(b"\x00" + b"\x01" * num_blocks)
        self._open = bytearray(self._is_free)
        self._claim = [-1] * (num_blocks + 1)
        self._claims: dict[int, range] = {}  # seq_id -> the blocks it claimed
        self._num_free = num_blocks
        self._hash_to_block: dict[bytes, int] = {}
        self._block_to_hash: dict[int, bytes] = {}
        self._pack_block = struct.Struct(f"<{block_size}q").pack
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; LRU first
        # NOTE: per sequence, the hash chain of its leading full blocks, extended as it grows: a
        # sequence's tokens are only ever appended to, so a computed hash stays valid, and the lpm
        # queue's every look at 128 waiting prompts costs dictionary lookups, not rehashing.
        self._seq_hashes: dict[int, list[bytes]] = {}

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free plus evictable cached ones)."""
        return self._num_free + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must add so its table covers `num_computed_tokens + num_new_tokens`."""
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    # ---- allocation -------------------------------------------------------------------------
    def _take_block(self, seq: Sequence) -> int:
        """A block for `seq`'s next position.

        NOTE: a sequence's blocks are kept consecutive in the pool where possible (the one after its
        last, or the start of a run of free blocks it then claims for its growth up to
        `max_tokens`), because attention reads each sequence's KV block by block from memory:
        scattered 2 KB blocks were read at about half the rate of consecutive ones (bf16, 172
        sequences x 290 keys, 8 layers). In the engine (tiny model, bf16) attention took 9-12% less
        time on micro, no-sharing and decode-heavy; fcfs-lru, which mostly reuses evicted cached
        blocks, was unchanged. Claims never make an allocation fail: with no open block left, a
        claimed one is given away."""
        if self._num_free == 0:
            block, _ = self._evictable.popitem(last=False)
            del self._hash_to_block[self._block_to_hash.pop(block)]
        else:
            block = self._next_block(seq)
            self._is_free[block] = self._open[block] = 0
            self._claim[block] = -1
            self._num_free -= 1
        self.ref_counts[block] = 1
        return block

    def _next_block(self, seq: Sequence) -> int:
        """The free block to give `seq` next (there is one)."""
        table = seq.block_table
        nxt = table[-1] + 1 if table else 0
        if 0 < nxt <= self.num_blocks and self._is_free[nxt] and self._claim[nxt] in (-1, seq.seq_id):
            return nxt
        want = min(MAX_CLAIM, max(1, self.blocks_for(seq.num_prompt_tokens + seq.params.max_tokens) - len(table)))
        while want >= 1:  # the first run of `want` open blocks, shorter ones if there is none
            start = self._open.find(b"\x01" * want, 1)
            if start > 0:
                self._release_claims(seq.seq_id)
                self._claims[seq.seq_id] = range(start + 1, start + want)
                for b in self._claims[seq.seq_id]:
                    self._claim[b], self._open[b] = seq.seq_id, 0
                return start
            want //= 2
        return self._is_free.find(1, 1)  # every free block is claimed: take one of them

    def _release_claims(self, seq_id: int) -> None:
        for b in self._claims.pop(seq_id, ()):
            if self._claim[b] == seq_id:
                self._claim[b] = -1
                self._open[b] = self._is_free[b]

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow `seq`'s block table for `num_new_tokens` more tokens; False (nothing changed) if full."""
        need = self.num_new_blocks(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._take_block(seq))
        return True

    def _incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._evictable.pop(block, None)
        self.ref_counts[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (or evictable)."""
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} released more often than referenced"
            if self.ref_counts[b] == 0:
                if b in self._block_to_hash:
                    self._evictable[b] = None
                else:
                    self._is_free[b] = 1
                    self._open[b] = int(self._claim[b] == -1)
                    self._num_free += 1

    def attach(self, seq: Sequence, blocks: list[int], num_computed: int, shared: bool = False) -> None:
        """Start `seq`, which holds no blocks, on existing KV: reference `blocks` as the head of its
        table and count its first `num_computed` tokens as computed (and as cached, for its output).

        `blocks` hold at least the first `num_computed // block_size` full blocks' KV: prefix-cache
        hits (`cached_prefix_blocks`) or a group prefix's full blocks (`shared=True`: the
        attention may read them once for the whole group). A `num_computed` past the last of them
        ends inside the sequence's next block, whose KV the caller copies there from the prefix's
        partial block once `allocate` has given it one.
        """
        assert not seq.block_table, "attach starts a sequence that holds no blocks"
        for b in blocks:
            self._incref(b)
        seq.block_table = list(blocks)
        seq.num_shared_blocks = len(blocks) if shared else 0
        seq.num_computed_tokens = seq.num_cached_tokens = num_computed

    def advance(self, seq: Sequence, n: int) -> None:
        """The KV of `seq`'s next `n` tokens is now in its blocks (after a forward pass).

        NOTE: with caching, full blocks are published after prefill chunks only (a prompt, or a
        recompute after preemption), not after single decode tokens, so a decode step hashes
        nothing; blocks filled by generated tokens are published only when a preempted sequence
        recomputes them.
        """
        seq.num_computed_tokens += n
        if self.enable_caching and (n > 1 or seq.num_output_tokens == 0):
            self._publish_full_blocks(seq)

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` and forget its KV (finish, preemption, or a failed admission).
        `num_cached_tokens` stays: it is part of a finished sequence's output."""
        self._seq_hashes.pop(seq.seq_id, None)
        self._release_claims(seq.seq_id)
        self.release(seq.block_table)
        seq.block_table = []
        seq.num_shared_blocks = 0
        seq.num_computed_tokens = 0

    # ---- automatic prefix cache (fcfs-lru / lpm) ---------------------------------------------
    def _chain_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Digests of `seq`'s first `num_blocks` blocks, each over the previous digest and its tokens."""
        hashes, bs = self._seq_hashes.setdefault(seq.seq_id, []), self.block_size
        h = hashes[-1] if hashes else b""
        for i in range(len(hashes), num_blocks):
            h = hashlib.blake2b(h + self._pack_block(*seq.token_ids[i * bs:(i + 1) * bs]), digest_size=16).digest()
            hashes.append(h)
        return hashes[:num_blocks]

    def cached_prefix_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the longest block-aligned prefix of `seq`'s tokens.

        NOTE: at most (len - 1) // block_size blocks: the last token is always computed, so the
        sequence has a query to sample from.
        """
        if not self.enable_caching:
            return []
        blocks = []
        for h in self._chain_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._hash_to_block.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _publish_full_blocks(self, seq: Sequence) -> None:
        """Register `seq`'s completely computed blocks in the prefix cache."""
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for block, h in zip(seq.block_table[:full], self._chain_hashes(seq, full)):
            if block not in self._block_to_hash and h not in self._hash_to_block:
                self._block_to_hash[block] = h
                self._hash_to_block[h] = block
