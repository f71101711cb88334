"""One step's token masks for every constrained row, filled in one call and applied in place."""

from __future__ import annotations

import time
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_np
import torch

from batchllm.sequence import Sequence
from batchllm.structured.grammars import GrammarCache

_BITS = torch.arange(32, dtype=torch.int32)


class StepMasks:
    """The grammar state of every constrained sequence of a run.

    `apply` fills the masks of a step's constrained rows together (llguidance's executor, in
    parallel, outside the GIL) and sets the logits of disallowed tokens to -inf on those rows
    only; `advance` feeds each sampled token to its sequence's matcher. A matcher lives as long
    as its sequence: preemption recomputes KV but keeps the tokens, so the state stays valid.
    """

    def __init__(self, cache: GrammarCache, seqs: list[Sequence], eos_token_ids: list[int],
                 threads: int | None = None) -> None:
        self.cache = cache
        self.eos_token_ids = eos_token_ids
        self.matchers: dict[int, Any] = {s.seq_id: cache.new_matcher(s.params.structured_outputs)
                                         for s in seqs if s.params.structured_outputs is not None}
        self.executor = llg.LLExecutor(threads) if self.matchers else None
        self.mask_time_s = 0.0
        self.mask_steps = 0

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` with each constrained row limited to what its grammar allows (copied only
        when a row is constrained; the model's output is an inference tensor)."""
        rows = [(i, self.matchers[s.seq_id]) for i, s in enumerate(seqs) if s.seq_id in self.matchers]
        if not rows:
            return logits
        start = time.perf_counter()
        v = logits.shape[-1]
        bitmask = llg_np.allocate_token_bitmask(len(rows), self.cache.vocab_size)
        llg_np.fill_next_token_bitmask_par(self.executor, [(m, j) for j, (_, m) in enumerate(rows)], bitmask)
        bits = torch.from_numpy(bitmask)
        allowed = ((bits[:, :, None] >> _BITS) & 1).flatten(1)[:, :v].bool()
        # A matcher in an error state allows nothing; such a row may only end.
        for j in (~allowed.any(dim=1)).nonzero().flatten().tolist():
            allowed[j, [t for t in self.eos_token_ids if t < v]] = True
        idx = torch.tensor([i for i, _ in rows])
        out = logits.clone()
        out[idx] = out[idx].masked_fill(~allowed, float("-inf"))
        self.mask_time_s += time.perf_counter() - start
        self.mask_steps += 1
        return out

    def advance(self, seq: Sequence, token: int) -> None:
        m = self.matchers.get(seq.seq_id)
        if m is not None:
            m.consume_token(token)

    def drop(self, seq: Sequence) -> None:
        self.matchers.pop(seq.seq_id, None)
