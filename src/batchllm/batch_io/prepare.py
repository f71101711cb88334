"""Tokenize and validate parsed requests; expand them into engine prompts ("units").

Shared by `run-batch` (validated by `LLM.validate`) and `plan` (validated against `Limits`
computed from the model folder and the engine settings, without loading weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig
from batchllm.executor.sampler import derive_seed
from batchllm.sampling_params import SamplingParams
from batchllm.validation import prompt_errors
from batchllm.tokenizer import Tokenizer

from .requests import BatchRequest, ErrorRecord

_ENCODE_CHUNK = 2048
Validator = Callable[[list[list[int]], list[SamplingParams]], list[str]]


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


@dataclass(frozen=True)
class Limits:
    """What the engine can hold: vocabulary, context length, KV pool size (tokens)."""

    vocab_size: int
    max_model_len: int
    kv_pool_tokens: int
    kv_bytes_per_token: int

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + output) that fits: the cap for chat without max_tokens."""
        return min(self.max_model_len, self.kv_pool_tokens)


def limits_of_llm(llm: Any) -> Limits:
    """Limits of a loaded `LLM`."""
    e = llm.engine
    return Limits(e.model_config.vocab_size, e.max_model_len, e.num_blocks * llm.config.block_size,
                  e.kv_bytes_per_token)


def limits_of_config(cfg: EngineConfig) -> Limits:
    """Limits the engine would have for `cfg`, from config.json only (mirrors `Engine.__init__`)."""
    from batchllm.models.loader import DTYPES, read_config

    mc = read_config(Path(cfg.model))
    limit = mc.max_position_embeddings
    if mc.sliding_window:
        limit = min(limit, mc.sliding_window)
    if cfg.max_model_len is not None and cfg.max_model_len > limit:
        raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's limit {limit}")
    per_token = mc.kv_bytes_per_token(DTYPES[mc.dtype if cfg.dtype == "auto" else cfg.dtype])
    blocks = cfg.num_kv_blocks
    if blocks is None:
        memory = cfg.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
        blocks = memory // (per_token * cfg.block_size)
        if blocks < 1:
            raise ValueError(f"kv_cache_memory {memory} bytes holds no block of {cfg.block_size} tokens "
                             f"({per_token} bytes per token)")
    return Limits(mc.vocab_size, cfg.max_model_len or limit, blocks * cfg.block_size, per_token)


def effective_dtype(cfg: EngineConfig) -> str:
    """The dtype the engine runs in ("auto" = the checkpoint's)."""
    from batchllm.models.loader import read_config

    return read_config(Path(cfg.model)).dtype if cfg.dtype == "auto" else cfg.dtype


def static_validator(limits: Limits) -> Validator:
    """The checks of `LLM.validate`, from `limits` alone (for `plan`, which loads no weights)."""

    def validate(prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[str]:
        return prompt_errors(prompt_ids, params, vocab_size=limits.vocab_size, max_model_len=limits.max_model_len,
                             kv_pool_tokens=limits.kv_pool_tokens)

    return validate


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


_PROMPT_PREFIX = re.compile(r"^prompt (\d+): ")


def prepare(requests: Sequence[BatchRequest], tokenizer: Tokenizer, limits: Limits, validate: Validator,
            engine_seed: int | None, max_context: int | None = None) -> tuple[list[Prepared], list[ErrorRecord]]:
    """Tokenize (chat via the model's template), cap chat output, validate, fix sampling seeds.

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
                text = tokenizer.apply_chat_template(list(r.messages))
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
        problems = validate(ids, [params] * len(ids))
        if problems:
            if len(ids) == 1:
                problems = [_PROMPT_PREFIX.sub("", m) for m in problems]
            errors.append(ErrorRecord(r.line, r.custom_id, f"line {r.line}: " + "; ".join(problems),
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
    """Give unseeded sampled prompts the seed `LLM._make_seqs` derives (engine seed, prompt,
    occurrence of the same prompt so far), computed over the whole file rather than the rest."""
    if not any(sp.seed is None and not sp.greedy for p in prepared for sp in p.params):
        return
    seen: Counter[tuple[int, ...]] = Counter()
    for p in prepared:
        for k, ids in enumerate(p.prompt_ids):
            key = tuple(ids)
            occurrence = seen[key]
            seen[key] += 1
            sp = p.params[k]
            if sp.seed is None and not sp.greedy:
                p.params[k] = dataclasses.replace(sp, seed=derive_seed(engine_seed, hash(key), occurrence))


def units_of(prepared: Sequence[Prepared]) -> list[Unit]:
    """Every engine prompt of `prepared`, in order."""
    return [Unit(i, k) for i, p in enumerate(prepared) for k in range(len(p.prompt_ids))]
