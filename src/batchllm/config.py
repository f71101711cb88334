"""EngineConfig: every engine setting in one frozen dataclass; unknown keys are an error."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Policy = Literal["batchllm", "fcfs", "fcfs-lru", "lpm"]
POLICIES: tuple[str, ...] = ("batchllm", "fcfs", "fcfs-lru", "lpm")
AttentionMode = Literal["auto", "reference", "prefix-shared"]


def cache_dir() -> Path:
    """Where batchllm keeps built files (demo models, compiled kernels): $BATCHLLM_CACHE, else
    $XDG_CACHE_HOME/batchllm, else ~/.cache/batchllm."""
    if os.environ.get("BATCHLLM_CACHE"):
        return Path(os.environ["BATCHLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchllm"


DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3  # bytes


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine instance (vLLM spellings where one exists).

    `max_num_seqs=None` means "the policy's default": 256 for the streaming-style policies,
    no request cap (KV memory decides) for `batchllm`.
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0
    block_size: int = 16
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 2048
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    policy: str = "batchllm"
    # Ablation switches of the batchllm policy (docs/design.md §3.4).
    global_groups: bool = True
    decode_ratio_order: bool = True
    memory_centric: bool = True
    kv_threshold: float = 0.95
    partial_block: Literal["copy", "recompute"] = "copy"
    attention: str = "auto"
    lpm_window: int = 128
    # On CPU: keep freed memory in malloc's heap instead of unmapping it (executor/malloc.py).
    keep_heap: bool = True
    # On CPU: attention, decode and greedy argmax through the C kernels (kernels/), compiled on
    # first use, and bf16 linear weights packed once for oneDNN (models/linear.py); False keeps
    # the all-PyTorch path (no C compiler: the kernels fall back, the packing stays).
    cpu_kernels: bool = True

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """Build a config; raise TypeError naming every unknown keyword."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s): {', '.join(unknown)}; "
                f"valid ones are: {', '.join(sorted(known - {'model'}))}"
            )
        cfg = cls(model=str(model), **kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError for out-of-range settings."""
        problems = []
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            problems.append(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            problems.append(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            problems.append(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            problems.append(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.max_model_len is not None and self.max_model_len < 1:
            problems.append(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.policy not in POLICIES:
            problems.append(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.attention not in ("auto", "reference", "prefix-shared"):
            problems.append(f"attention must be auto, reference or prefix-shared, got {self.attention!r}")
        if not 0.0 < self.kv_threshold <= 1.0:
            problems.append(f"kv_threshold must be in (0, 1], got {self.kv_threshold}")
        if self.partial_block not in ("copy", "recompute"):
            problems.append(f"partial_block must be copy or recompute, got {self.partial_block!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))

    def effective_max_num_seqs(self) -> int | None:
        """The request cap this config's policy runs with (None = bounded by KV memory only)."""
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        if self.policy == "batchllm" and self.memory_centric:
            return None
        return 256
