"""Each step's grammar masks for the constrained rows: filled by llguidance, applied in place."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance as llg
import llguidance.numpy as llg_np
import numpy as np
import torch

from batchllm.kernels.cpu import CpuKernels
from batchllm.sequence import Sequence
from batchllm.structured.grammars import GrammarCache


class StepMasks:
    """The grammar state of every constrained sequence of a run, and each step's masks.

    Per step: `begin(seqs)` before the forward pass, with the sequences that will get logits (in
    row order); the sampler's `apply(logits, seqs)` with the same sequences, which sets the
    logits of disallowed tokens to -inf on the constrained rows only; `advance(seqs, tokens)`
    with the sampled tokens. `close()` when the run ends (also after an error).

    overlap=False, the reference: `apply` fills the masks and `advance` feeds the tokens, in the
    caller's thread. overlap=True: one worker thread feeds the tokens while the caller schedules
    the next step, and fills that step's masks (submitted by `begin`, after scheduling) while the
    forward pass runs (a step's masks depend only on the tokens before it); `apply` waits for
    that fill. The masks, hence the outputs, are the
    same. llguidance's calls drop the GIL, so the worker runs beside PyTorch's threads.

    A matcher lives as long as its sequence: preemption recomputes KV but keeps the tokens, so
    its state stays valid.
    """

    def __init__(self, cache: GrammarCache, seqs: list[Sequence], eos_token_ids: list[int],
                 kernels: CpuKernels | None = None, overlap: bool = False, threads: int | None = None) -> None:
        self.matchers: dict[int, Any] = {s.seq_id: cache.new_matcher(s.params.structured_outputs)
                                         for s in seqs if s.params.structured_outputs is not None}
        self._seqs = {s.seq_id: s for s in seqs if s.seq_id in self.matchers}
        self.vocab_size = cache.vocab_size
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < cache.vocab_size]
        self.kernels = kernels
        # One row per constrained sequence, reused every step (a step's rows are its first rows).
        self._bitmask = np.empty(llg_np.get_bitmask_shape(len(self.matchers), cache.vocab_size), dtype=np.int32)
        self.executor = llg.LLExecutor(threads) if self.matchers else None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="batchllm-masks") if overlap and self.matchers else None
        # With the worker: the fill begun for the coming `apply` (its sequences' ids and the
        # future bitmask), and the last feeding of tokens (checked for errors).
        self._pending: tuple[list[int], Future[np.ndarray]] | None = None
        self._fed: Future[None] | None = None
        self.mask_time_s = 0.0  # the caller's time in `apply` and `advance` (waiting included)
        self.fill_time_s = 0.0  # llguidance's time filling masks and feeding tokens, in any thread
        self.mask_steps = 0

    def __bool__(self) -> bool:
        return bool(self.matchers)

    def begin(self, seqs: list[Sequence]) -> None:
        """Start filling the masks of the coming step's constrained rows (`seqs`: the sequences
        that get logits, in row order); only with overlap, otherwise `apply` fills them."""
        if self._worker is None:
            return
        if self._pending is not None:
            raise RuntimeError("StepMasks.begin: the previous step's masks were never applied")
        ids = [s.seq_id for s in seqs if s.seq_id in self.matchers]
        if ids:
            self._pending = (ids, self._worker.submit(self._fill, [self.matchers[i] for i in ids]))

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` with each constrained row limited to what its grammar allows (EOS only where
        the grammar can end; a matcher in an error state allows nothing, so its row may only end).

        The model's logits are a fresh inference tensor each step, so the rows are masked in
        place (under inference mode) rather than copied; any other tensor is copied first."""
        idx = [i for i, s in enumerate(seqs) if s.seq_id in self.matchers]
        if not idx:
            return logits
        start = time.perf_counter()
        ids = [seqs[i].seq_id for i in idx]
        if self._pending is not None:
            begun, future = self._pending
            self._pending = None
            if begun != ids:
                raise RuntimeError("StepMasks.apply: not the constrained rows `begin` was given")
            bitmask = future.result()
        elif self._worker is not None:  # not begun: fill now, after any feeding still queued
            bitmask = self._worker.submit(self._fill, [self.matchers[i] for i in ids]).result()
        else:
            bitmask = self._fill([self.matchers[i] for i in ids])
        if self._fed is not None:
            self._fed.result()  # done (the worker ran it before the fill); raises its error
            self._fed = None
        self._allow_eos_where_nothing_is(bitmask)
        if not logits.is_inference():
            logits = logits.clone()
        with torch.inference_mode():
            if self.kernels is not None and self.kernels.handles(logits) and logits.is_contiguous():
                self.kernels.apply_token_bitmask(logits, torch.tensor(idx, dtype=torch.int64), torch.from_numpy(bitmask))
            else:
                apply_token_bitmask(logits, idx, bitmask)
        self.mask_time_s += time.perf_counter() - start
        self.mask_steps += 1
        return logits

    def advance(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Feed each constrained sequence of a step its sampled token (all rows in one call);
        matchers of sequences finished since the last step are dropped first."""
        for sid in [sid for sid, s in self._seqs.items() if s.is_finished]:
            del self.matchers[sid], self._seqs[sid]
        pairs = [(self.matchers[s.seq_id], t) for s, t in zip(seqs, tokens) if s.seq_id in self.matchers]
        if not pairs:
            return
        start = time.perf_counter()
        if self._worker is not None:
            if self._fed is not None:
                self._fed.result()
            self._fed = self._worker.submit(self._feed, pairs)
        else:
            self._feed(pairs)
        self.mask_time_s += time.perf_counter() - start

    def close(self, raise_error: bool = True) -> None:
        """Wait for the worker's queued calls and stop it (idempotent). A failure of the last
        feeding is raised, unless `raise_error` is False (the run is already ending on another
        exception, which it must not replace)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
            self._pending = None
            fed, self._fed = self._fed, None
            if fed is not None and (raise_error or fed.exception() is None):
                fed.result()

    def _fill(self, matchers: list[Any]) -> np.ndarray:
        """The bitmask rows of `matchers`, in order: the first len(matchers) rows of the buffer."""
        start = time.perf_counter()
        bitmask = self._bitmask[:len(matchers)]
        llg_np.fill_next_token_bitmask_par(self.executor, [(m, j) for j, m in enumerate(matchers)], bitmask)
        self.fill_time_s += time.perf_counter() - start
        return bitmask

    def _feed(self, pairs: list[tuple[Any, int]]) -> None:
        start = time.perf_counter()
        llg_np.consume_token_par(self.executor, pairs)
        self.fill_time_s += time.perf_counter() - start

    def _allow_eos_where_nothing_is(self, bitmask: np.ndarray) -> None:
        """Set the EOS bits of the rows that allow no token at all (a matcher in an error state)."""
        dead = (~bitmask.any(axis=1)).nonzero()[0]
        if len(dead) and self.eos_token_ids:
            words = bitmask.view(np.uint32)
            for t in self.eos_token_ids:
                words[dead, t >> 5] |= np.uint32(1 << (t & 31))


def apply_token_bitmask(logits: torch.Tensor, rows: list[int], bitmask: np.ndarray) -> None:
    """logits[rows[j], t] = -inf wherever bit t of bitmask row j is clear, in place, on any device
    and dtype: the bits unpacked by NumPy, then one masked fill over the rows (in place where they
    are all the rows, in order). The C kernel (`CpuKernels.apply_token_bitmask`) does the same on
    CPU float32/bfloat16 logits, 5-20 times faster."""
    v = logits.shape[-1]
    banned = np.unpackbits(np.invert(bitmask).view(np.uint8), axis=1, count=v, bitorder="little")
    banned_t = torch.from_numpy(banned).view(torch.bool).to(logits.device)
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(banned_t, float("-inf"))
    else:
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        logits[index] = logits[index].masked_fill(banned_t, float("-inf"))
