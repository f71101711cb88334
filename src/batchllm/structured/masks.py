"""One step's token masks for every constrained row, filled in one call and applied in place."""

from __future__ import annotations

import time
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np
import torch

from batchllm.sequence import Sequence
from batchllm.structured.grammars import GrammarCache


class StepMasks:
    """The grammar state of every constrained sequence of a run.

    `apply` fills the masks of a step's constrained rows together (llguidance's executor, in
    parallel, outside the GIL) and sets the logits of disallowed tokens to -inf on those rows
    only; `advance` feeds the sampled tokens to their matchers. A matcher lives as long
    as its sequence: preemption recomputes KV but keeps the tokens, so the state stays valid.
    """

    def __init__(self, cache: GrammarCache, seqs: list[Sequence], eos_token_ids: list[int],
                 threads: int | None = None) -> None:
        self.cache = cache
        self.eos_token_ids = eos_token_ids
        self.matchers: dict[int, Any] = {s.seq_id: cache.new_matcher(s.params.structured_outputs)
                                         for s in seqs if s.params.structured_outputs is not None}
        self._seqs = {s.seq_id: s for s in seqs if s.seq_id in self.matchers}
        self.executor = llg.LLExecutor(threads) if self.matchers else None
        self.mask_time_s = 0.0
        self.mask_steps = 0

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` with each constrained row limited to what its grammar allows.

        The model's logits are a fresh inference tensor each step, so the rows are masked in
        place (under inference mode) rather than copied; any other tensor is copied first."""
        rows = [(i, self.matchers[s.seq_id]) for i, s in enumerate(seqs) if s.seq_id in self.matchers]
        if not rows:
            return logits
        start = time.perf_counter()
        v = logits.shape[-1]
        bitmask = llg_np.allocate_token_bitmask(len(rows), self.cache.vocab_size)
        llg_np.fill_next_token_bitmask_par(self.executor, [(m, j) for j, (_, m) in enumerate(rows)], bitmask)
        # One byte per token, 1 = not allowed: the inverted bits unpacked, viewed as bool (no copy).
        banned_np = np.unpackbits(np.invert(bitmask).view(np.uint8), axis=1, count=v, bitorder="little")
        banned = torch.from_numpy(banned_np).view(torch.bool)
        # A matcher in an error state allows nothing; such a row may only end.
        for j in banned_np.all(axis=1).nonzero()[0].tolist():
            banned[j, [t for t in self.eos_token_ids if t < v]] = False
        if not logits.is_inference():
            logits = logits.clone()
        with torch.inference_mode():
            if logits.device.type == "cpu" and logits.is_contiguous():
                _fill_banned_cpu(logits, [i for i, _ in rows], banned_np)
            else:
                for j, (i, _) in enumerate(rows):
                    logits[i].masked_fill_(banned[j].to(logits.device), float("-inf"))
        self.mask_time_s += time.perf_counter() - start
        self.mask_steps += 1
        return logits

    def advance(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Feed each constrained sequence of a step its sampled token (all rows at once, in
        parallel); matchers of sequences finished since are dropped."""
        for sid in [sid for sid, s in self._seqs.items() if s.is_finished]:
            del self.matchers[sid], self._seqs[sid]
        pairs = [(self.matchers[s.seq_id], t) for s, t in zip(seqs, tokens) if s.seq_id in self.matchers]
        if pairs:
            start = time.perf_counter()
            llg_np.consume_token_par(self.executor, pairs)
            self.mask_time_s += time.perf_counter() - start


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _fill_banned_cpu(logits: torch.Tensor, rows: list[int], banned: np.ndarray) -> None:
    """logits[rows[j], t] = -inf where banned[j, t], in place. Through NumPy on a same-width
    integer view (the bit pattern of -inf in the logits' dtype): 2-4 times faster than torch's
    masked_fill_ on bf16 logits in measurements on the 2-core development machine."""
    int_dtype = _SAME_WIDTH_INT[logits.element_size()]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype).view(int_dtype).item()
    arr = logits.view(int_dtype).numpy()
    where = banned.view(bool)
    if len(rows) == arr.shape[0]:
        np.copyto(arr, neg_inf, where=where)
    else:
        for j, i in enumerate(rows):
            np.copyto(arr[i], neg_inf, where=where[j])
