"""Tokenize and validate parsed requests; expand them into engine prompts ("units").

Shared by `run-batch` and `plan`; both validate against `Limits` (batchllm/limits.py): run-batch
the loaded engine's, `plan` those computed from the model folder without loading weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from batchllm.limits import Limits
from batchllm.sampling_params import SamplingParams
from batchllm.seeding import with_seeds
from batchllm.tokenizer import Tokenizer

from .requests import BatchRequest, ErrorRecord

_ENCODE_CHUNK = 2048


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic GC while building millions of token lists (it would rescan them again and again)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Prepared:
    """A runnable request: one token list, text and SamplingParams per prompt (chat: one)."""

    request: BatchRequest
    prompt_ids: list[list[int]]
    prompt_texts: list[str | None]
    params: list[SamplingParams]


@dataclass(frozen=True)
class Unit:
    """One engine prompt: prompt `index` of prepared request `request`."""

    request: int
    index: int


def prepare(requests: Sequence[BatchRequest], tokenizer: Tokenizer, limits: Limits, engine_seed: int | None,
            max_context: int | None = None) -> tuple[list[Prepared], list[ErrorRecord]]:
    """Tokenize (chat via the model's template), cap chat output, validate against `limits`
    (`Limits.prompt_errors`, as `LLM.validate`), fix sampling seeds.

    Chat without max_tokens gets `max_context - prompt tokens` (default `limits.max_context`).
    Unseeded sampled prompts get the seed `LLM.generate` would give them over the whole file,
    so a resumed job samples exactly what an uninterrupted one does (`engine_seed=None`: skip).
    """
    cap = max_context if max_context is not None else limits.max_context
    errors: list[ErrorRecord] = []
    texts: list[list[str | None]] = []
    encode_plain: list[str] = []
    encode_chat: list[str] = []
    kept: list[BatchRequest] = []
    for r in requests:
        if r.endpoint == "chat":
            try:
                text = tokenizer.apply_chat_template(list(r.messages), **r.template_options)
            except Exception as e:  # template errors (raise_exception, bad roles) and no template
                errors.append(ErrorRecord(r.line, r.custom_id, f"line {r.line}: the chat template failed: {e}",
                                          "invalid_messages", "messages"))
                continue
            texts.append([text])
            encode_chat.append(text)
        else:
            texts.append([p if isinstance(p, str) else None for p in r.prompts])
            encode_plain.extend(p for p in r.prompts if isinstance(p, str))
        kept.append(r)
    plain_ids = iter(_encode_unique(tokenizer, encode_plain, True))
    chat_ids = iter(_encode_unique(tokenizer, encode_chat, False))

    prepared: list[Prepared] = []
    for r, txt in zip(kept, texts, strict=True):
        if r.endpoint == "chat":
            ids = [next(chat_ids)]
        else:
            ids = [next(plain_ids) if isinstance(p, str) else list(p) for p in r.prompts]
        params = r.params
        if not r.max_tokens_given:
            room = cap - len(ids[0])
            if room >= 1:
                try:
                    params = dataclasses.replace(params, max_tokens=room)
                except ValueError as e:
                    errors.append(ErrorRecord(r.line, r.custom_id, f"line {r.line}: {e} (the prompt leaves room for "
                                              f"{room} output tokens)", "invalid_value", "min_tokens"))
                    continue
        problems = limits.prompt_errors(ids, [params] * len(ids))
        if problems:
            why = [problems[0]] if len(ids) == 1 else [f"prompt {i}: {m}" for i, m in problems.items()]
            errors.append(ErrorRecord(r.line, r.custom_id, f"line {r.line}: " + "; ".join(why),
                                      "invalid_prompt", "messages" if r.endpoint == "chat" else "prompt"))
            continue
        prepared.append(Prepared(r, ids, txt, [params] * len(ids)))
    if engine_seed is not None:
        _fix_seeds(prepared, engine_seed)
    errors.sort(key=lambda e: e.line)
    return prepared, errors


def _encode_unique(tokenizer: Tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of each text; a text repeated in the file is encoded once (ids lists shared)."""
    if not texts:
        return []
    unique = list(dict.fromkeys(texts))
    done: dict[str, list[int]] = {}
    for k in range(0, len(unique), _ENCODE_CHUNK):  # chunks bound the tokenizer's Encoding objects
        chunk = unique[k:k + _ENCODE_CHUNK]
        done.update(zip(chunk, tokenizer.encode_batch(chunk, add_special_tokens=special), strict=True))
    return [done[t] for t in texts]


def _fix_seeds(prepared: list[Prepared], engine_seed: int) -> None:
    """Write into unseeded sampled prompts the seed `LLM` would give them (`prompt_seeds`),
    computed over the whole file rather than over what is left to run."""
    if not any(sp.seed is None and not sp.greedy for p in prepared for sp in p.params):
        return
    where = [(p, k) for p in prepared for k in range(len(p.prompt_ids))]
    seeded = with_seeds([p.prompt_ids[k] for p, k in where], [p.params[k] for p, k in where], engine_seed)
    for (p, k), sp in zip(where, seeded, strict=True):
        p.params[k] = sp


def units_of(prepared: Sequence[Prepared]) -> list[Unit]:
    """Every engine prompt of `prepared`, in order."""
    return [Unit(i, k) for i, p in enumerate(prepared) for k in range(len(p.prompt_ids))]
