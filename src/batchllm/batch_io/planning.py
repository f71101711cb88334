"""`batchllm plan`: tokenize and plan a batch file without loading the model's weights."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from batchllm.batch_plan import plan_batch
from batchllm.capacity import capacity_warnings, final_tokens
from batchllm.config import EngineConfig
from batchllm.limits import Limits, limits_of_config
from batchllm.planner import Plan
from batchllm.tokenizer import Tokenizer

from .prepare import Prepared, paused_gc, prepare
from .requests import ErrorRecord, ParsedFile, parse_file


@dataclass
class PlanReport:
    """What `plan` prints: request counts, the plan's statistics and the expected KV need."""

    lines: int
    requests: int
    invalid: int
    sequences: int
    plan: Plan
    limits: Limits
    largest_seq_kv_tokens: int
    batch_kv_tokens: int
    seconds: float
    invalid_examples: list[str]  # the first few error messages
    warnings: list[str] = field(default_factory=list)  # capped max_tokens, groups run unshared

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "requests": self.requests, "invalid": self.invalid,
                "sequences": self.sequences, "plan": asdict(self.plan.stats),
                "block_size": self.plan.block_size,
                "kv": {"bytes_per_token": self.limits.kv_bytes_per_token, "pool_tokens": self.limits.kv_pool_tokens,
                       "largest_sequence_tokens": self.largest_seq_kv_tokens, "batch_tokens": self.batch_kv_tokens,
                       "batch_bytes": self.batch_kv_tokens * self.limits.kv_bytes_per_token},
                "seconds": self.seconds, "invalid_examples": self.invalid_examples, "warnings": self.warnings}

    def text(self) -> str:
        per = self.limits.kv_bytes_per_token
        waves = -(-self.batch_kv_tokens // self.limits.kv_pool_tokens) if self.limits.kv_pool_tokens else 0
        return "\n".join([
            f"{self.requests} requests ({self.invalid} invalid, skipped) -> {self.sequences} sequences; "
            f"planned in {self.seconds:.1f} s",
            self.plan.summary() if self.sequences else "Plan: nothing to plan",
            f"KV need: largest sequence {self.largest_seq_kv_tokens:,} tokens; whole batch at once (shared prefixes "
            f"once, every max_tokens) {self.batch_kv_tokens:,} tokens = {_size(self.batch_kv_tokens * per)}; "
            f"pool {self.limits.kv_pool_tokens:,} tokens = {_size(self.limits.kv_pool_tokens * per)}"
            + (f" (~{waves} waves)" if waves > 1 else ""),
            *[f"Warning: {w}" for w in self.warnings],
            *(["Invalid lines (run-batch writes them to the error file), e.g.:"]
              + [f"  {m}" for m in self.invalid_examples] if self.invalid_examples else []),
        ])


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def plan_file(path: str | Path, cfg: EngineConfig) -> PlanReport:
    """Parse, tokenize and validate like `run-batch`, then plan with `plan_batch`, as `LLM` does:
    each request with n samples becomes n sequences, expected output = max_tokens."""
    t0 = time.monotonic()
    limits = limits_of_config(cfg)
    with paused_gc():
        parsed = parse_file(path)
        prepared, bad = prepare(parsed.requests, Tokenizer(cfg.tokenizer or cfg.model), limits, None)
        return _report(parsed, prepared, sorted(parsed.errors + bad, key=lambda e: e.line), cfg, limits, t0)


def _report(parsed: ParsedFile, prepared: list[Prepared], bad: list[ErrorRecord], cfg: EngineConfig, limits: Limits,
            t0: float) -> PlanReport:
    prompt_ids = [ids for p in prepared for ids in p.prompt_ids]
    params = [sp for p in prepared for sp in p.params]
    plan = plan_batch(cfg, prompt_ids, params)
    finals = [final_tokens(len(ids), sp.max_tokens, limits.max_context) for ids, sp in zip(prompt_ids, params)]
    largest = max(finals, default=0)
    batch_kv = plan.stats.planned_prefill_tokens + sum((f - len(ids)) * sp.n
                                                       for f, ids, sp in zip(finals, prompt_ids, params))
    seq_lens = [len(ids) for ids, sp in zip(prompt_ids, params) for _ in range(sp.n)]
    seq_max = [sp.max_tokens for sp in params for _ in range(sp.n)]
    warnings = capacity_warnings([(g.shared, g.prefix_len, g.members) for g in plan.groups], seq_lens, seq_max,
                                 limits.max_context, limits.block_size, limits.num_kv_blocks)
    return PlanReport(parsed.num_lines, len(parsed.items), len(bad), sum(sp.n for sp in params), plan, limits,
                      largest, batch_kv, time.monotonic() - t0, [e.message for e in bad[:5]], warnings)
