"""Per-prompt validation shared by `LLM.validate` and the batch CLI's `plan` (no model needed)."""

from __future__ import annotations

from batchllm.sampling_params import SamplingParams


def prompt_errors(prompt_ids: list[list[int]], params: list[SamplingParams], *, vocab_size: int,
                  max_model_len: int, kv_pool_tokens: int) -> list[str]:
    """One message per invalid prompt ("prompt i: reason"); empty when all are valid."""
    errors = []
    for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
        why = None
        need = min(len(ids) + p.max_tokens, max_model_len)
        if not ids:
            why = "the prompt is empty"
        elif not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
            why = f"token ids must be integers in [0, {vocab_size})"
        elif len(ids) >= max_model_len:
            why = f"the prompt has {len(ids)} tokens; max_model_len is {max_model_len} (room for one output token needed)"
        elif need > kv_pool_tokens:
            why = f"prompt + max_tokens needs {need} KV tokens; the KV pool holds {kv_pool_tokens}"
        elif p.problems():
            why = "; ".join(p.problems())
        if why is not None:
            errors.append(f"prompt {i}: {why}")
    return errors
