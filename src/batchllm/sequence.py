"""A sequence's state: its tokens, how many have KV in the cache, its block table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from batchllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """WAITING -> RUNNING (admitted) -> FINISHED, or back to WAITING when preempted. A prefix
    pseudo-sequence is never finished: it stays RUNNING once admitted, and the batchllm policy
    frees its blocks after its group's last member."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One completion being generated (a request with `n` samples has `n` sequences).

    A *prefix* sequence (`is_prefix=True`) is the prefill-only pseudo-request of a
    prefix-sharing group: it is never sampled and never returned.

    Each piece of state has one owner, the only code that changes it (tests/test_scheduler_parts.py
    checks this):
    - `status`, `finish_reason`: the `Scheduler` (admit, preempt, `finish(seq, reason)`); the
      engine decides the reason and asks the scheduler to finish.
    - `block_table`, `num_computed_tokens`, `num_shared_blocks`, `num_cached_tokens`: the
      `BlockManager` (`attach` existing KV at admission, `allocate`, `advance` after a step, `free`).
    - `token_ids` (appended), `logprobs`, `cumulative_logprob`, `stop_reason`, `stop_text`: the
      engine, as it samples and applies the stop rules.
    - `group_id`: `scheduler.groups.build_groups`.
    """

    seq_id: int
    request_index: int
    sample_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Leading blocks of `block_table` that are its group prefix's: referenced, never written (the
    # prefix-shared attention reads them once per group).
    num_shared_blocks: int = 0
    is_prefix: bool = False
    group_id: int = -1
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Text cut at a stop string (set when a stop string ends the sequence).
    stop_text: str | None = None
    # Prompt tokens whose KV the sequence reused (prefix-cache hits or its group's prefix) when it
    # was last admitted.
    num_cached_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV still has to be computed (the prompt, or the last sampled token)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """True while more than the last token lacks KV (prompt or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0
