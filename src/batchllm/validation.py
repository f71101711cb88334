"""Per-prompt validation shared by `LLM.validate` and the batch CLI's `plan` (no model needed)."""

from __future__ import annotations

from batchllm.sampling_params import SamplingParams


def prompt_errors(prompt_ids: list[list[int]], params: list[SamplingParams], *, vocab_size: int,
                  max_model_len: int, kv_pool_tokens: int) -> dict[int, str]:
    """{prompt index: why} for each invalid prompt; empty when all are valid.

    A `max_tokens` beyond what the context or the pool holds is not an error: the sequence ends
    with "length" when it fills them (`capacity.py`). A prompt that leaves no room for one output
    token is."""
    errors: dict[int, str] = {}
    for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
        why = None
        if not ids:
            why = "the prompt is empty"
        elif not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
            why = f"token ids must be integers in [0, {vocab_size})"
        elif len(ids) >= max_model_len:
            why = f"the prompt has {len(ids)} tokens; max_model_len is {max_model_len} (room for one output token needed)"
        elif len(ids) >= kv_pool_tokens:
            why = (f"the prompt has {len(ids)} tokens; the KV pool holds {kv_pool_tokens} "
                   "(room for one output token needed)")
        elif p.problems():
            why = "; ".join(p.problems())
        elif any(t >= vocab_size for t in [*(p.logit_bias or {}), *(p.allowed_token_ids or [])]):
            why = f"logit_bias and allowed_token_ids must be token ids below {vocab_size}"
        if why is not None:
            errors[i] = why
    return errors
