"""Turns the logits of one step into next tokens: greedy, temperature, top-k/p, min-p, logprobs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from batchllm.executor.logits_processors import LogitsProcessors
from batchllm.kernels.cpu import CpuKernels
from batchllm.outputs import Logprob
from batchllm.sequence import Sequence

if TYPE_CHECKING:
    from batchllm.structured.masks import StepMasks


@dataclass
class SampleResult:
    """Per row: the chosen token, its logprob (None unless asked) and the step's Logprobs (the
    top-k tokens and the chosen one, with ranks; `decoded_token` is filled by `LLM`)."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, Logprob] | None]


class Sampler:
    """Samples one token per row. Each non-greedy row draws from its sequence's own generator,
    so a request's sample does not depend on which other requests share the step.

    Logits come in the model's dtype; probabilities and logprobs are computed in float32. With
    `kernels` the greedy argmax runs in C on the logits as they are (the same index as
    `logits.float().argmax(-1)`: bf16 to float32 is exact and keeps order and ties).
    """

    def __init__(self, kernels: CpuKernels | None = None, processors: LogitsProcessors | None = None) -> None:
        self.kernels = kernels
        self.processors = processors
        # seq_id -> time.time() when its first token was sampled (read and cleared by `LLM`).
        self.first_token_time: dict[int, float] = {}

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int] | None = None,
                 masks: StepMasks | None = None) -> SampleResult:
        """Each row's logits go through its logits processing (penalties, bias, allowed ids, bad
        words), its grammar mask (`masks`, structured outputs) and the min_tokens ban, in that
        order. Logprobs are those of the model's own distribution, before any of these (vLLM's
        default, raw logprobs), so a grammar never leaves -inf among the top tokens."""
        b = logits.shape[0]
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        # Before the grammar mask, which may change the model's logits in place.
        logp = torch.log_softmax(logits[want].float(), dim=-1) if want else None
        if self.processors is not None:
            logits = self.processors(logits, seqs)
        if masks:
            logits = masks.apply(logits, seqs)
        logits = self._ban_early_stops(logits, seqs, eos_token_ids or [])
        greedy = torch.tensor([s.params.greedy for s in seqs], dtype=torch.bool)
        if self.kernels is not None and self.kernels.handles(logits):
            tokens = self.kernels.argmax(logits)
        else:
            tokens = logits.float().argmax(dim=-1)
        sampled_rows = (~greedy).nonzero().flatten().tolist()
        if sampled_rows:
            rows = torch.tensor(sampled_rows)
            probs = self._filtered_probs(logits[rows].float(), [seqs[i] for i in sampled_rows])
            # NOTE: the exponential race (argmax p/E, E ~ Exp(1)) samples from p with one draw
            # per row from that row's own generator.
            race = torch.empty_like(probs)
            for j, i in enumerate(sampled_rows):
                race[j].exponential_(generator=seqs[i].generator)
            tokens[rows] = (probs / race).argmax(dim=-1)
        token_list = tokens.tolist()
        now = time.time()
        for s in seqs:
            if s.num_output_tokens == 0:
                self.first_token_time[s.seq_id] = now
        lps: list[float | None] = [None] * b
        tops: list[dict[int, Logprob] | None] = [None] * b
        if logp is not None:
            k = max(seqs[i].params.logprobs for i in want)
            top_v, top_i = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
            chosen = torch.tensor([token_list[i] for i in want])
            chosen_lp = logp.gather(1, chosen[:, None])
            # NOTE: rank 1 + the number of strictly more likely tokens (ties share a rank).
            chosen_rank = (logp > chosen_lp).sum(dim=-1) + 1
            for j, i in enumerate(want):
                t = token_list[i]
                kk = seqs[i].params.logprobs
                d = {tid: Logprob(lp, r + 1) for r, (tid, lp)
                     in enumerate(zip(top_i[j, :kk].tolist(), top_v[j, :kk].tolist()))}
                if t not in d:
                    d[t] = Logprob(float(chosen_lp[j, 0]), int(chosen_rank[j]))
                lps[i], tops[i] = d[t].logprob, d
        return SampleResult(token_list, lps, tops)

    @staticmethod
    def _ban_early_stops(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int]) -> torch.Tensor:
        """`min_tokens`: until a sequence has that many output tokens, its stop token ids (and EOS
        unless `ignore_eos`) cannot be sampled, as in vLLM and transformers. Returns the logits,
        copied only when a row is changed (the model's output is an inference tensor)."""
        banned = []
        for i, s in enumerate(seqs):
            p = s.params
            if s.num_output_tokens < p.min_tokens:
                ids = [*p.stop_token_ids, *([] if p.ignore_eos else eos_token_ids)]
                banned += [(i, t) for t in ids if 0 <= t < logits.shape[-1]]
        if not banned:
            return logits
        logits = logits.clone()
        rows, cols = zip(*banned)
        logits[list(rows), list(cols)] = float("-inf")
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Probabilities after temperature, top-k, top-p and min-p, vectorised over rows."""
        temp = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)[:, None]
        probs = torch.softmax(logits / temp, dim=-1)
        v = probs.shape[-1]
        sorted_p, order = probs.sort(dim=-1, descending=True)
        ks = torch.tensor([s.params.top_k if s.params.top_k > 0 else v for s in seqs])[:, None]
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=probs.dtype)[:, None]
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=probs.dtype)[:, None]
        rank = torch.arange(v)[None, :]
        drop = rank >= ks
        drop |= (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # keep the smallest set reaching top_p
        drop |= sorted_p < min_p * sorted_p[:, :1]
        drop[:, 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter_(-1, order, sorted_p)
