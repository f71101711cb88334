"""What one sequence and one prefix-sharing group can ever hold in a KV pool (no torch import:
`batchllm plan` uses it as the scheduler does).

A sequence ends with "length" at `max_context = min(max_model_len, pool tokens)` tokens, whatever
its `max_tokens` (`Engine._append`), so its KV never exceeds what the pool holds; a `max_tokens`
beyond that is capped there. A shared group runs only if its prefix's blocks plus its largest
member's own blocks fit in the pool; otherwise its members run unshared.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def final_tokens(prompt_len: int, max_tokens: int, max_context: int) -> int:
    """The most tokens (prompt + output) a sequence reaches."""
    return min(prompt_len + max_tokens, max_context)


def is_capped(prompt_len: int, max_tokens: int, max_context: int) -> bool:
    """Whether the context or the pool ends the sequence before `max_tokens`."""
    return prompt_len + max_tokens > max_context


def group_fits(prefix_len: int, member_final_tokens: list[int], block_size: int, num_blocks: int) -> bool:
    """Whether a shared group's prefix (its blocks, the partial last one included) plus the own
    blocks of its largest member (past the prefix's full blocks) fit in `num_blocks`."""
    full = prefix_len // block_size
    own = max(blocks_for(t, block_size) - full for t in member_final_tokens)
    return blocks_for(prefix_len, block_size) + own <= num_blocks
