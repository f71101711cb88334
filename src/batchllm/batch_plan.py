"""The plan of a batch under an engine config: what `LLM` runs and `batchllm plan` prints.

No module-level torch import (`batchllm plan` imports this module).
"""

from __future__ import annotations

from collections.abc import Sequence

from batchllm.config import EngineConfig
from batchllm.planner import Plan, build_plan
from batchllm.sampling_params import SamplingParams


def plan_batch(cfg: EngineConfig, prompt_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Plan:
    """Plan prompts with `cfg`'s planner switches. Prompt i with n samples is n sequences, numbered
    prompt by prompt and sample by sample within a prompt (as `LLM` numbers its sequences); each
    sequence's expected output is its `max_tokens`."""
    seqs: list[Sequence[int]] = []
    expected: list[int] = []
    for ids, p in zip(prompt_ids, params, strict=True):
        seqs += [ids] * p.n
        expected += [p.max_tokens] * p.n
    return build_plan(seqs, block_size=cfg.block_size, expected_output_tokens=expected,
                      partial_block=cfg.partial_block, order="decode-ratio" if cfg.decode_ratio_order else "input",
                      global_groups=cfg.global_groups)
