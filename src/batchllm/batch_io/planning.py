"""`batchllm plan`: tokenize and plan a batch file without loading the model's weights."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from batchllm.config import EngineConfig
from batchllm.planner import Plan, build_plan
from batchllm.tokenizer import Tokenizer

from .prepare import Limits, Prepared, limits_of_config, paused_gc, prepare, static_validator
from .requests import ParsedFile, parse_file


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

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "requests": self.requests, "invalid": self.invalid,
                "sequences": self.sequences, "plan": asdict(self.plan.stats),
                "block_size": self.plan.block_size,
                "kv": {"bytes_per_token": self.limits.kv_bytes_per_token, "pool_tokens": self.limits.kv_pool_tokens,
                       "largest_sequence_tokens": self.largest_seq_kv_tokens, "batch_tokens": self.batch_kv_tokens,
                       "batch_bytes": self.batch_kv_tokens * self.limits.kv_bytes_per_token},
                "seconds": self.seconds}

    def text(self) -> str:
        gib = self.limits.kv_bytes_per_token / 2**30
        waves = -(-self.batch_kv_tokens // self.limits.kv_pool_tokens) if self.limits.kv_pool_tokens else 0
        return "\n".join([
            f"{self.requests} requests ({self.invalid} invalid, skipped) -> {self.sequences} sequences; "
            f"planned in {self.seconds:.1f} s",
            self.plan.summary() if self.sequences else "Plan: nothing to plan",
            f"KV need: largest sequence {self.largest_seq_kv_tokens:,} tokens; whole batch at once (shared prefixes "
            f"once, every max_tokens) {self.batch_kv_tokens:,} tokens = {self.batch_kv_tokens * gib:.2f} GiB; "
            f"pool {self.limits.kv_pool_tokens:,} tokens = {self.limits.kv_pool_tokens * gib:.2f} GiB"
            + (f" (~{waves} waves)" if waves > 1 else ""),
        ])


def plan_file(path: str | Path, cfg: EngineConfig) -> PlanReport:
    """Parse, tokenize and validate like `run-batch`, then plan as `LLM.plan` does: each request
    with n samples becomes n sequences, expected output = max_tokens."""
    t0 = time.monotonic()
    limits = limits_of_config(cfg)
    with paused_gc():
        parsed = parse_file(path)
        prepared, bad = prepare(parsed.requests, Tokenizer(cfg.model), limits, static_validator(limits), None)
        return _report(parsed, prepared, len(bad), cfg, limits, t0)


def _report(parsed: ParsedFile, prepared: list[Prepared], num_bad: int, cfg: EngineConfig, limits: Limits,
            t0: float) -> PlanReport:
    seqs: list[list[int]] = []
    expected: list[int] = []
    largest = 0
    for p in prepared:
        for ids, sp in zip(p.prompt_ids, p.params):
            seqs += [ids] * sp.n
            expected += [sp.max_tokens] * sp.n
            largest = max(largest, min(len(ids) + sp.max_tokens, limits.max_model_len))
    # NOTE: the same arguments as `LLM._plan` (llm.py); keep the two in step.
    plan = build_plan(seqs, block_size=cfg.block_size, expected_output_tokens=expected,
                      partial_block=cfg.partial_block, order="decode-ratio" if cfg.decode_ratio_order else "input",
                      global_groups=cfg.global_groups)
    batch_kv = plan.stats.planned_prefill_tokens + sum(expected)
    return PlanReport(parsed.num_lines, len(parsed.items), len(parsed.errors) + num_bad, len(seqs), plan, limits,
                      largest, batch_kv, time.monotonic() - t0)
