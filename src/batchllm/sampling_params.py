"""SamplingParams with vLLM's names, validated on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's names); exactly one of the fields is set.

    `json`: a JSON schema (a dict or its JSON text); `regex`: the whole output matches it;
    `choice`: the output is one of these strings; `grammar`: a Lark (or llguidance) grammar;
    `json_object=True`: any JSON object. Only tokens the grammar allows are sampled, and EOS only
    where the grammar can end.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid structured outputs: " + "; ".join(problems))

    def problems(self) -> list[str]:
        p: list[str] = []
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            p.append(f"give exactly one of json, regex, choice, grammar, json_object (got {given or 'none'})")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            p.append("json must be a JSON schema (a dict or its JSON text)")
        if self.regex is not None and not isinstance(self.regex, str):
            p.append("regex must be a string")
        if self.choice is not None and not (isinstance(self.choice, list) and self.choice
                                            and all(isinstance(c, str) for c in self.choice)):
            p.append("choice must be a non-empty list of strings")
        if self.grammar is not None and not isinstance(self.grammar, str):
            p.append("grammar must be a string")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            p.append("json_object must be true or false")
        return p

    def key(self) -> str:
        """The constraint's content as one string: equal constraints share one compiled grammar."""
        kind = next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # kept as text: compiling it reports the error
        return kind + ":" + json.dumps(value, sort_keys=True)


@dataclass
class SamplingParams:
    """How to sample one request. `temperature=0` is greedy.

    `top_k` of 0 or -1 disables top-k; `logprobs=k` returns the k most likely tokens (plus the
    sampled one) at every step; `stop` strings are matched on the decoded text and cut from it
    (only where they end in text generated after the first `min_tokens` tokens).

    Penalties follow vLLM: `presence_penalty` and `frequency_penalty` (in [-2, 2]) subtract from
    the logits of tokens already generated (once, and once per occurrence); `repetition_penalty`
    (> 0) divides positive and multiplies negative logits of tokens in the prompt or the output,
    as transformers' `RepetitionPenaltyLogitsProcessor`. `logit_bias` adds to token ids' logits,
    `allowed_token_ids` keeps only those ids, `bad_words` never completes one of those words.
    `structured_outputs` constrains the output (see `StructuredOutputsParams`).
    `truncate_prompt_tokens=k` keeps the last k prompt tokens.

    `prompt_logprobs=k` returns each prompt position's log-prob and the top k (vLLM's shape).

    `detokenize`, which batchllm does not implement, is accepted at its neutral value (True) only,
    so a ported script fails loudly instead of sampling differently.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        problems = self.problems()
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every reason these parameters are invalid (empty when valid)."""
        p: list[str] = []

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not is_int(self.n) or self.n < 1:
            p.append(f"n must be an integer >= 1, got {self.n!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            p.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            p.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            p.append(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            p.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not is_int(self.seed):
            p.append(f"seed must be an integer, got {self.seed!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            p.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            p.append(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        elif is_int(self.max_tokens) and self.min_tokens > self.max_tokens:
            p.append(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not all(isinstance(s, str) and s for s in self.stop_list):
            p.append("stop must be a non-empty string or a list of non-empty strings")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids or []):
            p.append("stop_token_ids must be non-negative integers")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            p.append(f"logprobs must be an integer >= 0, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_num(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                p.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            p.append(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.include_stop_str_in_output, bool):
            p.append("include_stop_str_in_output must be true or false")
        if self.logit_bias is not None and not (isinstance(self.logit_bias, dict) and all(
                is_int(k) and k >= 0 and is_num(v) for k, v in self.logit_bias.items())):
            p.append("logit_bias must map token ids (integers >= 0) to numbers")
        if self.allowed_token_ids is not None and not (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                                                       and all(is_int(t) and t >= 0 for t in self.allowed_token_ids)):
            p.append("allowed_token_ids must be a non-empty list of token ids")
        if self.bad_words is not None and not (isinstance(self.bad_words, list)
                                               and all(isinstance(w, str) and w for w in self.bad_words)):
            p.append("bad_words must be a list of non-empty strings")
        if self.truncate_prompt_tokens is not None and (not is_int(self.truncate_prompt_tokens)
                                                        or self.truncate_prompt_tokens < 1):
            p.append(f"truncate_prompt_tokens must be an integer >= 1, got {self.truncate_prompt_tokens!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            p.append("structured_outputs must be a StructuredOutputsParams")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            p.append(f"prompt_logprobs must be an integer >= 0, got {self.prompt_logprobs!r}")
        if self.detokenize is not True:
            p.append(f"detokenize={self.detokenize!r} is not supported by batchllm (only True)")
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processes_logits(self) -> bool:
        """True when penalties, biases, allowed ids or bad words change this request's logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.allowed_token_ids or self.bad_words)
