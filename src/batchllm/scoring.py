"""Scoring (context, continuation) pairs: `LLM.loglikelihood`, on top of prompt log-probs.

Each pair is one prompt, context + continuation, asking for the log-probs of the continuation's
positions only; the planner groups pairs by their common prefixes as it groups any prompts, so a
context scored with several continuations (and few-shot examples repeated across contexts) is
computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from batchllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from batchllm.llm import LLM

Pair = tuple[str | Sequence[int], str | Sequence[int]]


def encode_pair(llm: LLM, context: str | Sequence[int], continuation: str | Sequence[int]) -> tuple[list[int], list[int]]:
    """Token ids of a pair. Text: the context as a prompt is encoded, the continuation as the
    tokens the whole text has after the context's (so a word split differently at the seam is
    scored as the tokens the model would read), or encoded alone where the whole text does not
    start with the context's tokens."""
    if isinstance(context, str) != isinstance(continuation, str):
        raise TypeError("a pair is two strings or two lists of token ids")
    if not isinstance(context, str):
        return list(context), list(continuation)  # type: ignore[arg-type]
    tok = llm.tokenizer
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tok.encode(continuation, add_special_tokens=False)


def loglikelihood(llm: LLM, pairs: Sequence[Pair], use_tqdm: bool = True) -> list[tuple[float, bool]]:
    """Per pair: the continuation's summed log-prob given the context, and whether greedy
    decoding from the context would produce the continuation (every token ranked first)."""
    encoded = [encode_pair(llm, c, x) for c, x in pairs]
    for i, (c, x) in enumerate(encoded):
        if not c or not x:
            raise ValueError(f"pair {i}: the context and the continuation must each have at least one token")
    prompts = [c + x for c, x in encoded]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    first = [len(c) for c, _ in encoded]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(prompts)
    for out in llm.iter_generate(prompts, params, use_tqdm=use_tqdm, prompt_logprobs_from=first):
        i = int(out.request_id)
        ids, steps = prompts[i], out.prompt_logprobs
        assert steps is not None
        lps = [steps[t][ids[t]] for t in range(first[i], len(ids))]  # type: ignore[index]
        results[i] = (sum(lp.logprob for lp in lps), all(lp.rank == 1 for lp in lps))
    return results
