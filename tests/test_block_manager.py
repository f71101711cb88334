"""The block manager's automatic prefix cache (fcfs-lru / lpm): a sequence's hash chain is kept
and extended as it grows, and must match the chain of any other sequence with the same tokens."""

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
    assert bm.allocate(s, s.num_uncomputed_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.commit_full_blocks(s)


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


def test_evicted_blocks_are_not_found() -> None:
    bm = BlockManager(2, BS, enable_caching=True)
    a = seq(0, list(range(8)))
    computed(bm, a)
    bm.free(a)  # both blocks evictable, still cached
    assert bm.cached_prefix_blocks(seq(1, list(range(9)))) != []
    b = seq(2, [50 + i for i in range(8)])
    assert bm.allocate(b, 8)  # takes both cached blocks
    assert bm.cached_prefix_blocks(seq(3, list(range(9)))) == []
