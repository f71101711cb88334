"""SamplingParams with vLLM's names, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request. `temperature=0` is greedy.

    `top_k` of 0 or -1 disables top-k; `logprobs=k` returns the k most likely tokens (plus the
    sampled one) at every step; `stop` strings are matched on the decoded text and cut from it
    (only where they end in text generated after the first `min_tokens` tokens).

    vLLM fields batchllm does not implement are accepted at their neutral value only
    (`presence_penalty=0`, `frequency_penalty=0`, `repetition_penalty=1`,
    `include_stop_str_in_output=False`, `detokenize=True`), so a ported
    script fails loudly instead of sampling differently.
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
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            p.append(f"prompt_logprobs must be an integer >= 0, got {self.prompt_logprobs!r}")
        for name, neutral in (("presence_penalty", 0), ("frequency_penalty", 0), ("repetition_penalty", 1),
                              ("include_stop_str_in_output", False), ("detokenize", True)):
            value = getattr(self, name)
            if (value is not None) if neutral is None else (value != neutral):
                p.append(f"{name}={value!r} is not supported by batchllm (only {neutral!r})")
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
