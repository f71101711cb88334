"""What `LLM.generate` returns, and the statistics of a run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sampled completion of a request (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class RequestOutput:
    """All completions of one prompt. `num_cached_tokens` = prompt tokens served from a shared prefix."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0


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
        """A short human-readable report."""
        return (
            f"requests {self.num_requests} | prefill tokens logical {self.logical_prefill_tokens}, "
            f"computed {self.computed_prefill_tokens} (saving {self.saving:.1%}) | output tokens "
            f"{self.output_tokens} | steps {self.steps} | peak KV {self.peak_kv_tokens} tokens "
            f"({self.peak_kv_blocks}/{self.num_kv_blocks} blocks) | preemptions {self.preemptions} | "
            f"{self.wall_time_s:.2f} s, {self.tokens_per_second:.0f} tok/s "
            f"({self.output_tokens_per_second:.0f} output tok/s)"
        )
