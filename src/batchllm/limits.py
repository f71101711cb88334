"""What an engine can hold (context length, KV pool, vocabulary), from its config and config.json.

`engine_limits` is the one rule: `Engine.__init__` sizes itself with it, and run-batch and
`batchllm plan` validate against it (`plan` through `limits_of_config`, without loading weights).
No module-level torch import: `batchllm plan` imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchllm.config import DEFAULT_KV_CACHE_MEMORY, EngineConfig
from batchllm.validation import prompt_errors

if TYPE_CHECKING:
    from batchllm.models.config import ModelConfig
    from batchllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class Limits:
    """The engine's dtype, vocabulary, context length and KV pool (blocks of `block_size` tokens)."""

    dtype: str  # "float32" | "bfloat16" | "float16": what the model and the KV pool run in
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    kv_bytes_per_token: int

    @property
    def kv_pool_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + output) that fits: the cap for chat without max_tokens."""
        return min(self.max_model_len, self.kv_pool_tokens)

    def prompt_errors(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> list[str]:
        """One message per prompt these limits reject ("prompt i: reason"); empty when all fit."""
        return prompt_errors(prompt_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                             kv_pool_tokens=self.kv_pool_tokens)


def effective_dtype(cfg: EngineConfig, mc: ModelConfig) -> str:
    """The dtype the engine runs in: `cfg.dtype`, or the checkpoint's for "auto"."""
    return mc.dtype if cfg.dtype == "auto" else cfg.dtype


def engine_limits(cfg: EngineConfig, mc: ModelConfig) -> Limits:
    """The limits an engine for `cfg` and the model `mc` runs with; ValueError for a
    `max_model_len` beyond the model's or a KV memory too small for one block."""
    limit = mc.max_position_embeddings
    if mc.sliding_window:  # NOTE: no sliding-window attention: stay inside the window.
        limit = min(limit, mc.sliding_window)
    if cfg.max_model_len is not None and cfg.max_model_len > limit:
        raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's limit {limit}")
    dtype = effective_dtype(cfg, mc)
    per_token = mc.kv_bytes_per_token(dtype)
    blocks = cfg.num_kv_blocks
    if blocks is None:
        memory = cfg.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY
        blocks = memory // (per_token * cfg.block_size)
        if blocks < 1:
            raise ValueError(f"kv_cache_memory {memory} bytes holds no block of {cfg.block_size} tokens "
                             f"({per_token} bytes per token)")
    return Limits(dtype, mc.vocab_size, cfg.max_model_len or limit, blocks, cfg.block_size, per_token)


def limits_of_config(cfg: EngineConfig) -> Limits:
    """`engine_limits` for `cfg`'s model folder, from its config.json alone (no weights loaded)."""
    from batchllm.models.folder import read_config

    return engine_limits(cfg, read_config(Path(cfg.model)))
