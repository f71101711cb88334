"""What an engine can hold (context length, KV pool, vocabulary), from its config and config.json.

`engine_limits` is the one rule: `Engine.__init__` sizes itself with it, and run-batch and
`batchllm plan` validate against it (`plan` through `limits_of_config`, without loading weights).
No module-level torch import: `batchllm plan` imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchllm.config import DEFAULT_KV_CACHE_MEMORY, DEFAULT_MEMORY_UTILIZATION, EngineConfig, available_memory
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
    # How the pool was sized when nothing was given (one line for the user); "" otherwise.
    kv_note: str = ""

    @property
    def kv_pool_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def max_context(self) -> int:
        """The longest sequence (prompt + output) that fits: the cap for chat without max_tokens."""
        return min(self.max_model_len, self.kv_pool_tokens)

    def prompt_errors(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> dict[int, str]:
        """{prompt index: why} for each prompt these limits reject; empty when all fit."""
        return prompt_errors(prompt_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                             kv_pool_tokens=self.kv_pool_tokens)


def effective_dtype(cfg: EngineConfig, mc: ModelConfig) -> str:
    """The dtype the engine runs in: `cfg.dtype`, or the checkpoint's for "auto"."""
    return mc.dtype if cfg.dtype == "auto" else cfg.dtype


def engine_limits(cfg: EngineConfig, mc: ModelConfig) -> Limits:
    """The limits an engine for `cfg` and the model `mc` runs with; ValueError for a
    `max_model_len` beyond the model's or a KV memory too small for one block."""
    limit = mc.max_position_embeddings
    if cfg.max_model_len is not None and cfg.max_model_len > limit:
        raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's limit {limit}")
    dtype = effective_dtype(cfg, mc)
    per_token = mc.kv_bytes_per_token(dtype)
    blocks = cfg.num_kv_blocks
    note = ""
    if blocks is None:
        memory = cfg.kv_cache_memory
        if memory is None:
            memory, note = default_kv_cache_memory(cfg, mc, dtype)
        blocks = memory // (per_token * cfg.block_size)
        if blocks < 1:
            raise ValueError(f"kv_cache_memory {memory} bytes holds no block of {cfg.block_size} tokens "
                             f"({per_token} bytes per token)")
    return Limits(dtype, mc.vocab_size, cfg.max_model_len or limit, blocks, cfg.block_size, per_token, note)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def default_kv_cache_memory(cfg: EngineConfig, mc: ModelConfig, dtype: str) -> tuple[int, str]:
    """The KV pool when neither kv_cache_memory nor num_kv_blocks is given, and a line saying how
    it was chosen: `gpu_memory_utilization` (default DEFAULT_MEMORY_UTILIZATION) of the memory
    available now, less the weights in `dtype`; DEFAULT_KV_CACHE_MEMORY where the free memory
    cannot be read. ValueError when the weights leave nothing for the pool."""
    from batchllm.models.config import DTYPE_BYTES
    from batchllm.models.folder import weight_files

    how = "set kv_cache_memory (--kv-cache-memory) or gpu_memory_utilization to choose"
    free = available_memory()
    if free is None:
        return DEFAULT_KV_CACHE_MEMORY, (f"KV cache {_gib(DEFAULT_KV_CACHE_MEMORY)} (the free memory cannot be "
                                         f"read on this system); {how}")
    share = cfg.gpu_memory_utilization or DEFAULT_MEMORY_UTILIZATION
    try:
        on_disk = sum(f.stat().st_size for f in weight_files(Path(cfg.model)))
    except (OSError, ValueError):
        on_disk = 0
    weights = on_disk * DTYPE_BYTES[dtype] // DTYPE_BYTES.get(mc.dtype, DTYPE_BYTES[dtype])
    memory = int(share * free) - weights
    if memory < 1:
        raise ValueError(f"no memory left for the KV cache: {share:.0%} of the {_gib(free)} available is "
                         f"{_gib(share * free)}, and the weights take {_gib(weights)}; {how}")
    return memory, (f"KV cache {_gib(memory)}: {share:.0%} of the {_gib(free)} of memory available, less "
                    f"{_gib(weights)} of weights; {how}")


def limits_of_config(cfg: EngineConfig) -> Limits:
    """`engine_limits` for `cfg`'s model folder, from its config.json alone (no weights loaded)."""
    from batchllm.models.folder import read_config

    return engine_limits(cfg, read_config(Path(cfg.model)))
