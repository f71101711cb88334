"""What `LLM.generate` returns, and the statistics of a run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability at one step (vLLM's shape): `rank` is its place in that step's
    distribution (1 = most likely), `decoded_token` its text on its own."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One step's log-probabilities: token id -> Logprob (the top-k tokens and the sampled one).
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    """One sampled completion of a request (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request arrived, got its first token and finished (`time.time()` seconds).

    Every request of one `generate` call arrives when the call starts; `first_token_time` is the
    earliest first token of its samples, `finished_time` when its last sample finished.
    """

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    """All completions of one prompt. `num_cached_tokens` = prompt tokens whose KV was reused from
    earlier computation for another request (a shared prefix computed before), not computed for
    this one. `prompt_logprobs` (when `SamplingParams.prompt_logprobs` asked for them): None for
    the first prompt position, then one {token id: Logprob} per position (its token and the top k).
    `error`: why the prompt did not run (`generate(..., return_errors=True)`); `outputs` is then empty."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    error: str | None = None


@dataclass
class RunStats:
    """Statistics of the last `generate` call (see `LLM.last_run_stats`)."""

    num_requests: int = 0
    logical_prefill_tokens: int = 0
    computed_prefill_tokens: int = 0
    output_tokens: int = 0
    steps: int = 0
    tokens_per_step: list[int] = field(default_factory=list)
    peak_kv_blocks: int = 0
    num_kv_blocks: int = 0
    block_size: int = 0
    preemptions: int = 0
    prefix_shared_attention_steps: int = 0
    # Blocks still referenced when the run ended (0 after a complete run: nothing leaked).
    kv_blocks_in_use_at_end: int = 0
    wall_time_s: float = 0.0
    policy: str = ""
    # Structured outputs: compiling the run's distinct constraints (before the first step); the
    # time the step loop spent on grammar masks (waiting for the fill or filling, applying them,
    # feeding the matchers the sampled tokens), summed over the steps that had constrained rows;
    # and llguidance's own time filling masks and feeding tokens, most of it in a worker thread
    # during the forward passes with `EngineConfig.grammar_overlap`.
    grammar_compile_time_s: float = 0.0
    grammar_mask_time_s: float = 0.0
    grammar_mask_steps: int = 0
    grammar_fill_time_s: float = 0.0

    @property
    def saving(self) -> float:
        """Achieved prefix saving: 1 - computed/logical prefill tokens."""
        if self.logical_prefill_tokens == 0:
            return 0.0
        return 1.0 - self.computed_prefill_tokens / self.logical_prefill_tokens

    @property
    def tokens_per_second(self) -> float:
        """Prompt + output tokens per second of wall time."""
        total = self.logical_prefill_tokens + self.output_tokens
        return total / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    @property
    def peak_kv_tokens(self) -> int:
        return self.peak_kv_blocks * self.block_size

    def to_dict(self) -> dict:
        """A JSON-ready view, derived properties included."""
        d = dict(self.__dict__)
        d.update(saving=self.saving, tokens_per_second=self.tokens_per_second,
                 output_tokens_per_second=self.output_tokens_per_second,
                 peak_kv_tokens=self.peak_kv_tokens)
        return d

    def summary(self) -> str:
        """A short human-readable report ("n/a" for what no step measured)."""
        if self.steps == 0:
            return (f"requests {self.num_requests} | prefill tokens logical {self.logical_prefill_tokens}, "
                    f"computed 0 (saving n/a) | no engine step ran | peak KV n/a")
        return (
            f"requests {self.num_requests} | prefill tokens logical {self.logical_prefill_tokens}, "
            f"computed {self.computed_prefill_tokens} (saving {self.saving:.1%}) | output tokens "
            f"{self.output_tokens} | steps {self.steps} | peak KV {self.peak_kv_tokens} tokens "
            f"({self.peak_kv_blocks}/{self.num_kv_blocks} blocks) | preemptions {self.preemptions} | "
            f"{self.wall_time_s:.2f} s, {self.tokens_per_second:.0f} tok/s "
            f"({self.output_tokens_per_second:.0f} output tok/s)"
        )
