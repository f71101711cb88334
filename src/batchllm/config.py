"""EngineConfig: every engine setting in one frozen dataclass; unknown keys are an error."""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Policy = Literal["batchllm", "fcfs", "fcfs-lru", "lpm"]
POLICIES: tuple[str, ...] = ("batchllm", "fcfs", "fcfs-lru", "lpm")
AttentionMode = Literal["auto", "reference", "prefix-shared"]
ATTENTION_MODES: tuple[str, ...] = ("auto", "reference", "prefix-shared")  # select.Mode's values, torch-free


def cache_dir() -> Path:
    """Where batchllm keeps built files (demo models, compiled kernels): $BATCHLLM_CACHE, else
    $XDG_CACHE_HOME/batchllm, else ~/.cache/batchllm."""
    if os.environ.get("BATCHLLM_CACHE"):
        return Path(os.environ["BATCHLLM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchllm"


# The KV pool where the machine's free memory cannot be read (not Linux), in bytes.
DEFAULT_KV_CACHE_MEMORY = 2 * 1024**3
# Without kv_cache_memory / num_kv_blocks the engine may use this share of the memory available
# when it starts (/proc/meminfo MemAvailable), weights included; the KV pool gets the rest of that
# share. `gpu_memory_utilization` sets the share. Lower than vLLM's 0.9 of a GPU: CPU memory is
# shared with the OS and other processes, and activations need room beside the pool.
DEFAULT_MEMORY_UTILIZATION = 0.5

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "2147483648", "2GiB", "512MiB", "1.5G", "4e9"; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 4e9)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


# dtype spellings vLLM accepts, to the names the engine runs in.
DTYPE_ALIASES = {"auto": "auto", "float32": "float32", "float": "float32", "fp32": "float32",
                 "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "half": "float16",
                 "fp16": "float16"}


def normalize_dtype(value: Any) -> str:
    """A dtype name from a string alias or a torch.dtype (read by name: no torch import here)."""
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        value = str(value).removeprefix("torch.")
    if isinstance(value, str) and value.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[value.lower()]
    raise ValueError(f"dtype must be auto, float32 (float), bfloat16 or float16 (half), or the torch dtype, "
                     f"got {value!r}")


def normalize_device(value: Any) -> str:
    """"cpu", "cuda" or "cuda:N" (a torch.device is read by its string); anything else is refused."""
    text = str(value) if type(value).__module__ == "torch" else value
    if isinstance(text, str) and re.fullmatch(r"cpu|cuda(:[0-9]+)?", text.strip().lower()):
        return text.strip().lower()
    raise ValueError(f"device must be cpu, cuda or cuda:N, got {value!r}")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _vllm_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map the vLLM engine arguments a ported script passes: those with a meaning here become
    settings, the rest are ignored with a warning saying why, or refused with a ValueError."""
    kw = dict(kwargs)

    def ignore(name: str, why: str) -> None:
        warnings.warn(f"{name}={kw.pop(name)!r} is ignored: {why}", UserWarning, stacklevel=5)

    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if name in kw:
            if kw[name] not in (1, None):
                raise ValueError(f"{name}={kw[name]!r}: batchllm runs one engine on one device; use 1")
            kw.pop(name)
    if "enable_prefix_caching" in kw:
        v = kw.pop("enable_prefix_caching")
        if v is False and "policy" not in kw:
            kw["policy"] = "fcfs"  # no prefix reuse at all
    if "enforce_eager" in kw:
        if kw["enforce_eager"] is False:
            ignore("enforce_eager", "batchllm has no CUDA graphs; it always runs eagerly")
        else:
            kw.pop("enforce_eager")
    if "swap_space" in kw:
        if kw["swap_space"]:
            ignore("swap_space", "batchllm does not swap KV out; preempted sequences are recomputed")
        else:
            kw.pop("swap_space")
    if "trust_remote_code" in kw:
        if kw["trust_remote_code"]:
            ignore("trust_remote_code", "batchllm runs only its own model code, never code from the model folder")
        else:
            kw.pop("trust_remote_code")
    for name in ("disable_log_stats", "disable_custom_all_reduce"):  # no effect on what is computed
        kw.pop(name, None)
    if "tokenizer_mode" in kw:
        if kw["tokenizer_mode"] in ("auto", "hf"):
            kw.pop("tokenizer_mode")
        else:
            ignore("tokenizer_mode", "batchllm always uses the folder's tokenizer.json (the fast tokenizer)")
    if kw.get("kv_cache_dtype") not in (None, "auto"):
        raise ValueError(f"kv_cache_dtype={kw['kv_cache_dtype']!r} is not supported: the KV cache uses the "
                         f"model's dtype (kv_cache_dtype='auto')")
    kw.pop("kv_cache_dtype", None)
    for name, what in (("quantization", "quantized models"), ("enable_lora", "LoRA adapters"),
                       ("speculative_config", "speculative decoding"), ("cpu_offload_gb", "weight offloading")):
        if kw.get(name) not in (None, False, 0):
            raise ValueError(f"{name}={kw[name]!r}: batchllm does not support {what}")
        kw.pop(name, None)
    return kw


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one engine instance (vLLM spellings where one exists).

    `max_num_seqs=None` means "the policy's default": 256 for the streaming-style policies,
    no request cap (KV memory decides) for `batchllm`.
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    # A tokenizer folder other than the model's (vLLM's `tokenizer`).
    tokenizer: str | None = None
    seed: int = 0
    block_size: int = 16
    # The KV pool in bytes (an int, or a size string such as "4GiB"); num_kv_blocks overrides it.
    # Neither: a share of the free memory (DEFAULT_MEMORY_UTILIZATION, gpu_memory_utilization).
    kv_cache_memory: int | None = None
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float | None = None
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
    # Structured outputs: the time limit for compiling a run's constraints (all in parallel,
    # before the first step); a constraint not compiled by then is its requests' error.
    grammar_timeout_s: float = 30.0
    # Structured outputs: fill each step's grammar masks in a worker thread while the step is
    # scheduled and its forward pass runs (structured/masks.py); False fills them after the
    # forward pass, in the sampler: the reference path, same outputs.
    grammar_overlap: bool = True

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """Build a config; raise TypeError naming every unknown keyword.

        vLLM's engine arguments are mapped (`_vllm_arguments`); sizes may be strings ("4GiB");
        dtype takes vLLM's aliases and torch dtypes; device takes a torch.device.
        """
        kwargs = _vllm_arguments(kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"unknown engine argument(s): {', '.join(unknown)}; "
                f"valid ones are: {', '.join(sorted(known - {'model'}))}"
            )
        if isinstance(kwargs.get("kv_cache_memory"), str):
            kwargs["kv_cache_memory"] = parse_size(kwargs["kv_cache_memory"])
        if kwargs.get("dtype") is not None:
            kwargs["dtype"] = normalize_dtype(kwargs["dtype"])
        if kwargs.get("device") is not None:
            kwargs["device"] = normalize_device(kwargs["device"])
        if kwargs.get("tokenizer") is not None:
            kwargs["tokenizer"] = str(kwargs["tokenizer"])
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
        if self.kv_cache_memory is not None and (not isinstance(self.kv_cache_memory, int)
                                                 or self.kv_cache_memory < 1):
            problems.append(f"kv_cache_memory must be a positive number of bytes or a size such as '4GiB', "
                            f"got {self.kv_cache_memory!r}")
        if self.gpu_memory_utilization is not None and not (
                isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            problems.append(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.policy not in POLICIES:
            problems.append(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.attention not in ATTENTION_MODES:
            problems.append(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if not 0.0 < self.kv_threshold <= 1.0:
            problems.append(f"kv_threshold must be in (0, 1], got {self.kv_threshold}")
        if self.partial_block not in ("copy", "recompute"):
            problems.append(f"partial_block must be copy or recompute, got {self.partial_block!r}")
        if not (isinstance(self.grammar_timeout_s, (int, float)) and self.grammar_timeout_s > 0):
            problems.append(f"grammar_timeout_s must be > 0, got {self.grammar_timeout_s!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        try:
            normalize_device(self.device)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("; ".join(problems))

    def effective_max_num_seqs(self) -> int | None:
        """The request cap this config's policy runs with (None = bounded by KV memory only)."""
        if self.max_num_seqs is not None:
            return self.max_num_seqs
        if self.policy == "batchllm" and self.memory_centric:
            return None
        return 256
