"""The block manager's automatic prefix cache (fcfs-lru / lpm): a sequence's hash chain is kept
and extended as it grows, must match the chain of any other sequence with the same tokens, and
must not match a different one even where Python's own hash collides."""

from __future__ import annotations

from batchllm import SamplingParams
from batchllm.scheduler.block_manager import BlockManager
from batchllm.sequence import Sequence

BS = 4


def seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id=seq_id, request_index=seq_id, sample_index=0, token_ids=list(tokens),
                    num_prompt_tokens=len(tokens), params=SamplingParams(max_tokens=8))


def computed(bm: BlockManager, s: Sequence) -> None:
    """Give `s` blocks for all its tokens, mark them computed and publish its full blocks."""
    n = s.num_uncomputed_tokens
    assert bm.allocate(s, n)
    bm.advance(s, n)


def test_grown_sequence_hashes_match_a_fresh_one() -> None:
    bm = BlockManager(16, BS, enable_caching=True)
    a = seq(0, list(range(9)))  # 2 full blocks + 1 token
    assert bm.cached_prefix_blocks(a) == []  # hashes its 2 blocks while nothing is cached
    a.token_ids += [100, 101, 102, 103, 104, 105, 106]  # grows (generated tokens) to 4 full blocks
    computed(bm, a)
    same = seq(1, a.token_ids + [7])
    assert bm.cached_prefix_blocks(same) == a.block_table[:4]
    differs = seq(2, a.token_ids[:9] + [0] + a.token_ids[10:] + [7])  # block 2 differs
    assert bm.cached_prefix_blocks(differs) == a.block_table[:2]


def test_cached_blocks_leave_the_last_token_to_compute() -> None:
    bm = BlockManager(16, BS, enable_caching=True)
    a = seq(0, list(range(8)))
    computed(bm, a)
    assert bm.cached_prefix_blocks(seq(1, list(range(8)))) == a.block_table[:1]
    assert bm.cached_prefix_blocks(seq(2, list(range(9)))) == a.block_table[:2]


# Python hashes an int modulo the prime 2**61 - 1, so ids this far apart hash equal (as would a
# tuple of them): the collision a `hash((parent, tuple(tokens)))` chain cannot tell apart.
PRIME = 2**61 - 1


def test_blocks_colliding_under_pythons_hash_are_not_reused() -> None:
    assert hash((0, (5, 6, 7, 8))) == hash((0, (5 + PRIME, 6, 7, 8)))
    bm = BlockManager(16, BS, enable_caching=True)
    a = seq(0, [5, 6, 7, 8, 9, 10, 11, 12, 13])
    computed(bm, a)
    assert bm.cached_prefix_blocks(seq(1, [5 + PRIME, 6, 7, 8, 9])) == []  # first block collides
    assert bm.cached_prefix_blocks(seq(2, [5, 6, 7, 8, 9 + PRIME, 10, 11, 12, 13])) == a.block_table[:1]  # second
    assert bm.cached_prefix_blocks(seq(3, a.token_ids)) == a.block_table[:2]


def test_a_block_is_keyed_by_everything_before_it() -> None:
    """The same four tokens after different first blocks are different cache entries."""
    bm = BlockManager(16, BS, enable_caching=True)
    a = seq(0, [1, 2, 3, 4, 50, 51, 52, 53, 9])
    computed(bm, a)
    assert bm.cached_prefix_blocks(seq(1, [1, 2, 3, 5, 50, 51, 52, 53, 9])) == []
    assert bm.cached_prefix_blocks(seq(2, [50, 51, 52, 53, 9])) == []


def test_evicted_blocks_are_not_found() -> None:
    bm = BlockManager(2, BS, enable_caching=True)
    a = seq(0, list(range(8)))
    computed(bm, a)
    bm.free(a)  # both blocks evictable, still cached
    assert bm.cached_prefix_blocks(seq(1, list(range(9)))) != []
    b = seq(2, [50 + i for i in range(8)])
    assert bm.allocate(b, 8)  # takes both cached blocks
    assert bm.cached_prefix_blocks(seq(3, list(range(9)))) == []


def grow(bm: BlockManager, s: Sequence, tokens: int) -> None:
    """Append `tokens` generated tokens to `s` one at a time, allocating as a decode step would."""
    for _ in range(tokens):
        n = s.num_uncomputed_tokens
        assert bm.allocate(s, n)
        bm.advance(s, n)
        s.token_ids.append(0)


def consecutive(table: list[int]) -> bool:
    return all(b - a == 1 for a, b in zip(table, table[1:]))


def test_sequences_growing_together_keep_their_blocks_consecutive() -> None:
    bm = BlockManager(64, BS)
    a, b = seq(0, list(range(5))), seq(1, list(range(5)))  # 13 tokens at max_tokens = 8: 4 blocks
    for _ in range(8):  # interleaved growth, as in decode steps: 12 tokens computed, 3 blocks
        grow(bm, a, 1)
        grow(bm, b, 1)
    assert a.block_table == [1, 2, 3] and b.block_table == [5, 6, 7]


def test_claimed_blocks_still_serve_others_when_nothing_else_is_free() -> None:
    bm = BlockManager(4, BS)
    a = seq(0, list(range(3)))  # claims blocks for 11 tokens = 3 blocks
    assert bm.allocate(a, 3) and a.block_table == [1]
    b = seq(1, list(range(3)))
    assert bm.allocate(b, 3) and b.block_table == [4]  # the one unclaimed block
    c = seq(2, list(range(8)))
    assert bm.allocate(c, 8) and sorted(c.block_table) == [2, 3]  # a's claimed blocks, as nothing else is free
    assert bm.num_free_blocks == 0 and not bm.allocate(seq(3, [1]), 1)


def test_freeing_a_sequence_releases_its_claims() -> None:
    bm = BlockManager(8, BS)
    a = seq(0, list(range(3)))
    assert bm.allocate(a, 3) and a.block_table == [1]  # claims 2 and 3
    b = seq(1, list(range(3)))
    assert bm.allocate(b, 3) and b.block_table == [4]
    bm.free(a)
    c = seq(2, list(range(3)))
    assert bm.allocate(c, 3) and c.block_table == [1]
    d = seq(3, [1])
    assert bm.allocate(d, 1) and d.block_table == [7]  # 2 and 3 are c's now, 5 and 6 b's: 7 is open
