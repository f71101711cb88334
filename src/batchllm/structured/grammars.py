"""Compile every distinct constraint of a batch once, in parallel, with a time limit.

A constraint is keyed by its content (`StructuredOutputsParams.key`), so requests with the same
schema share one compiled matcher; each sequence later gets its own copy (`new_matcher`). A
constraint that does not compile, or not within the time limit, is an error of the requests
that carry it, never of the batch.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import llguidance as llg

from batchllm.sampling_params import SamplingParams, StructuredOutputsParams
from batchllm.tokenizer import Tokenizer

DEFAULT_TIMEOUT_S = 30.0


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar for a constraint (raises ValueError for a malformed one)."""
    if so.json is not None or so.json_object:
        schema = so.json if so.json is not None else {"type": "object"}
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"json is not valid JSON: {e}") from None
        # Compact JSON (no free whitespace between tokens) keeps outputs short and parseable.
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    if so.regex is not None:
        # `\d` means [0-9], as in Python's and JavaScript's ASCII reading, not every Unicode digit.
        return llg.LLMatcher.grammar_from_regex(llg.regex_to_lark(so.regex, "d"))
    if so.choice is not None:
        alternatives = " | ".join(json.dumps(c) for c in so.choice)
        return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}\n")
    assert so.grammar is not None
    return llg.LLMatcher.grammar_from_lark(so.grammar)


class GrammarCache:
    """Compiled matchers by constraint key, for one tokenizer and one logits width."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        # NOTE: the logits may be wider than the tokenizer's vocabulary (padded embedding);
        # `n_vocab` makes the masks that wide, the extra ids never allowed.
        self.tokenizer = llg.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size,
                                         eos_token=tokenizer.eos_token_ids or None)
        self.vocab_size = vocab_size
        self.compiled: dict[str, Any] = {}   # key -> LLMatcher in its start state
        self.failed: dict[str, str] = {}     # key -> why it did not compile
        self.compile_time_s = 0.0

    def _compile_one(self, so: StructuredOutputsParams) -> Any:
        text = grammar_text(so)
        m = llg.LLMatcher(self.tokenizer, text, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def compile(self, params: list[SamplingParams], timeout_s: float = DEFAULT_TIMEOUT_S,
                threads: int | None = None) -> dict[int, str]:
        """Compile the constraints of `params` not compiled yet; return {index: error} for the
        entries whose constraint failed (a failure is remembered, not retried)."""
        import os
        import time

        todo: dict[str, StructuredOutputsParams] = {}
        for p in params:
            so = p.structured_outputs
            if so is not None:
                k = so.key()
                if k not in self.compiled and k not in self.failed:
                    todo.setdefault(k, so)
        if todo:
            start = time.perf_counter()
            # llguidance drops the GIL while it builds a matcher, so threads compile in parallel.
            pool = ThreadPoolExecutor(max_workers=threads or min(len(todo), os.cpu_count() or 1))
            futures = {pool.submit(self._compile_one, so): k for k, so in todo.items()}
            done, late = wait(futures, timeout=timeout_s)
            for f in done:
                k = futures[f]
                try:
                    self.compiled[k] = f.result()
                except Exception as e:  # grammar errors and malformed schemas alike
                    self.failed[k] = f"the structured output constraint does not compile: {_short(e)}"
            for f in late:
                self.failed[futures[f]] = f"the structured output constraint did not compile within {timeout_s:g} s"
            pool.shutdown(wait=False, cancel_futures=True)
            self.compile_time_s += time.perf_counter() - start
        return {i: self.failed[p.structured_outputs.key()] for i, p in enumerate(params)
                if p.structured_outputs is not None and p.structured_outputs.key() in self.failed}

    def new_matcher(self, so: StructuredOutputsParams) -> Any:
        """A matcher in the start state for one sequence (its constraint must have compiled)."""
        return self.compiled[so.key()].deep_copy()


def _short(e: Exception) -> str:
    msg = re.sub(r"\s+", " ", str(e)).strip()
    return msg[:300] + ("..." if len(msg) > 300 else "")
