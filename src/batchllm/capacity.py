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


def capacity_warnings(groups: list[tuple[bool, int, tuple[int, ...]]], seq_prompt_lens: list[int],
                      seq_max_tokens: list[int], max_context: int, block_size: int, num_blocks: int) -> list[str]:
    """What `batchllm plan` warns about: sequences whose max_tokens the context or the pool caps,
    and shared groups (shared, prefix_len, member sequence indices) that will run unshared."""
    out = []
    capped = [i for i, (n, m) in enumerate(zip(seq_prompt_lens, seq_max_tokens)) if is_capped(n, m, max_context)]
    if capped:
        out.append(f"{len(capped)} sequence(s) ask for more output than fits: max_tokens capped so prompt + output "
                   f"<= {max_context:,} tokens (the context or the KV pool); they end with finish_reason 'length'")
    finals = [final_tokens(n, m, max_context) for n, m in zip(seq_prompt_lens, seq_max_tokens)]
    unshared = [(p, len(ms)) for shared, p, ms in groups
                if shared and not group_fits(p, [finals[i] for i in ms], block_size, num_blocks)]
    if unshared:
        out.append(f"{len(unshared)} prefix-sharing group(s) cannot hold their prefix beside their largest member in "
                   f"the {num_blocks:,}-block KV pool and run unshared (each member prefills its whole prompt): "
                   + ", ".join(f"{p}-token prefix x {k}" for p, k in unshared[:5]) + (" ..." if len(unshared) > 5 else ""))
    return out
