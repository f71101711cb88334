"""Which code runs attention, and why: the executor (once per engine) and each step's plan.

Executor, chosen once when the engine is built (`make_executor`):
- CPU, float32 or bfloat16, C kernels loaded (a C compiler was found, `cpu_kernels` on):
  `CpuExecutor`. Decode queries run in C (`paged_decode`, `shared_decode`). Prefill chunks run in
  C (`paged_prefill`) where the kernels have a fast path for the head size (AVX-512, head size 64
  or 128, `CpuKernels.fast_prefill`); elsewhere that kernel goes one query row at a time and
  PyTorch's matmul / flash attention is several times faster, so prefill runs in PyTorch.
- CUDA with triton importable (the `gpu` extra): `TritonExecutor`, every part of the plan in
  Triton kernels (kernels/triton/). triton is imported only on this path.
- Anything else (float16 on CPU, CUDA without triton, no compiler, `cpu_kernels=False`):
  `TorchExecutor`.
- Models whose attention has features the C and Triton kernels lack (`AttentionFeatures`: sliding
  windows, which need lower key bounds, and attention-logit soft-capping) run on `TorchExecutor`
  too, which honours both in every pass.

Plan, built once per step for all layers of one window size (`plan_step`, from
`Attention.prepare`): one for the global layers, one per sliding window among the layers (at most
two for the models here):
- mode "reference": nothing shared; "prefix-shared": every group member's queries share;
- mode "auto": the executor's `AUTO_SHARE` kind of queries share when that saves at least its
  threshold of KV tokens read per layer (`cost.saved_tokens`); otherwise nothing is shared.

Measurements behind the constants below: bench/results/attention-selection.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Generic

import torch

from batchllm.attention.cost import saved_tokens
from batchllm.attention.executor import Executor, ExecutorKind, Prepared
from batchllm.attention.metadata import AttentionMetadata
from batchllm.attention.plan import AttentionPlan, Share, build_plan
from batchllm.kernels.cpu import DTYPES as KERNEL_DTYPES

if TYPE_CHECKING:
    from batchllm.kernels.cpu import CpuKernels

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --- Share or not (mode "auto") ---
# Sharing reads a group's prefix once instead of once per member. On the PyTorch executor it
# also costs a fixed amount per layer (a batched prefix pass, the merge, a dozen small ops), which
# the saved reads outweigh only from about ten thousand saved KV tokens per layer.
MIN_SAVED_TOKENS = 12288
# With the C kernels a group's decode queries are one `shared_decode` call instead of one
# `paged_decode` call per member, with no such fixed cost: the shared kernel measures as fast or
# faster in nearly every case. This threshold only keeps steps that save almost nothing (groups
# of one, prefixes of a block or two) on the per-sequence kernel.
MIN_SAVED_TOKENS_KERNELS = 1024
# Whether "auto" on `CpuExecutor` with C prefill also shares members' prefill chunks. Prefill
# attention is matrix-matrix and compute-bound either way: the shared pass saves only the
# per-member packing of the prefix keys, and adds a second, small own pass and the merge. So no:
# members' prefill chunks attend their whole context, like every other chunk. Mode
# "prefix-shared" still shares them.
SHARE_PREFILL_WITH_KERNELS = False

# --- How executors run a plan ---
# Group members' decode queries per `shared_decode` pass over their prefix: more per pass read
# the prefix fewer times but leave fewer tasks to spread over the threads.
SHARED_DECODE_MEMBERS = 16
# Query rows per PyTorch pass that materialises scores or a mask (a group's stacked rows, a
# prefill piece attended with its lse): bounds that pass's memory (512 rows x 8 heads x 4096
# keys of float32 scores = 64 MiB). Fresh chunks are not cut: the flash kernel runs them causal
# without a mask. The C kernels work in tiles of rows and need no cut.
MAX_ROWS = 512
# The PyTorch executor pads chunks of similar shape into one batch (`torch_buckets.bucketize`)
# while the padded area stays within this factor of the real one: fewer, larger ops against
# wasted work on padding. Prefill chunks: no bound on the number of buckets.
PREFILL_BUCKET_SLACK = 1.5
# Group prefix passes: a tighter slack keeps decode groups from padding to a prefill group's
# rows; at most GROUP_MAX_BUCKETS buckets bound the ops per layer however many groups a step has.
GROUP_BUCKET_SLACK = 1.25
GROUP_MAX_BUCKETS = 8
# Query rows (per batch entry and KV head) from which `torch_ops.attend` uses ATen's blocked CPU
# flash kernel (which also returns the lse) instead of matmul + softmax. fp32: the two are even
# from 16 rows; bf16: matmul + softmax is faster up to ~512 rows, the flash kernel from ~1024.
FLASH_MIN_ROWS_FP32 = 16
FLASH_MIN_ROWS_HALF = 1024  # bf16 / fp16

# --- The Triton executor (CUDA; unmeasured until a GPU run: bench/bench_triton.py) ---
# Rows of one `attend_tiles` program when a step has prefill chunks or group prefixes: query
# positions x heads per KV head (64 rows = 16 queries of a Llama-3-8B-shaped model, G = 4). A
# decode-only unshared step uses one query's heads (at least 16, `tl.dot`'s minimum).
TRITON_TILE_ROWS = 64
# Keys per KV tile (also what the interpreter costs per program-iteration in the tests).
TRITON_BLOCK_N = 64
# When the step's items x KV heads are fewer than this many programs per SM, cut KV ranges into
# segments of about equal work that make up that many, never shorter than TRITON_MIN_SEGMENT keys.
TRITON_PROGRAMS_PER_SM = 2
TRITON_MIN_SEGMENT = 256


class Mode(Enum):
    """`EngineConfig.attention`."""

    AUTO = "auto"  # share where it pays off (`AUTO_SHARE`)
    REFERENCE = "reference"  # never share
    PREFIX_SHARED = "prefix-shared"  # always share, decode queries and prefill chunks


# What mode "auto" shares on each kind of executor, and from how many saved KV tokens per layer.
AUTO_SHARE: dict[ExecutorKind, tuple[Share, int]] = {
    ExecutorKind.TORCH: (Share.ALL, MIN_SAVED_TOKENS),
    ExecutorKind.CPU_KERNELS: (Share.ALL if SHARE_PREFILL_WITH_KERNELS else Share.DECODES, MIN_SAVED_TOKENS_KERNELS),
    ExecutorKind.CPU_DECODE_KERNELS: (Share.ALL, MIN_SAVED_TOKENS_KERNELS),
    # One launch either way: a group prefix tile costs one read for up to TRITON_TILE_ROWS rows
    # and the merge is one small launch, so share from the same small saving as the C kernels.
    ExecutorKind.TRITON: (Share.ALL, MIN_SAVED_TOKENS_KERNELS),
}


def triton_available() -> bool:
    """Whether triton is installed (the `gpu` extra), found without importing it."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: made unimportable on purpose
        return False


def rows_per_prefix_read(share: Share) -> int:
    """Query rows the cost model lets share one read of a group prefix: a decode-only plan is the
    C kernels' (`SHARED_DECODE_MEMBERS` queries per `shared_decode` pass), a plan that shares
    prefill chunks is costed as the PyTorch passes (`MAX_ROWS` stacked rows)."""
    return SHARED_DECODE_MEMBERS if share is Share.DECODES else MAX_ROWS


def plan_step(meta: AttentionMetadata, mode: Mode, kind: ExecutorKind, window: int | None = None) -> AttentionPlan:
    """The plan of one step under `mode` on an executor of `kind`, for the layers with sliding
    window `window` (None: global attention); see the module docstring."""
    if mode is Mode.REFERENCE:
        return build_plan(meta, Share.NONE, window)
    if mode is Mode.PREFIX_SHARED:
        return build_plan(meta, Share.ALL, window)
    share, min_saved = AUTO_SHARE[kind]
    plan = build_plan(meta, share, window)
    if not plan.groups:  # nothing to share: the same plan, on the reference path
        return dataclasses.replace(plan, share=Share.NONE)
    if saved_tokens(plan, rows_per_prefix_read(share)) >= min_saved:
        return plan
    return build_plan(meta, Share.NONE, window)


@dataclass(frozen=True)
class AttentionFeatures:
    """What a model's attention needs beyond causal softmax at its scale: each layer's sliding
    window (`windows`, one per layer, None: global; empty: all global) and attention-logit
    soft-capping (`softcap`, None: none)."""

    windows: tuple[int | None, ...] = ()
    softcap: float | None = None

    @property
    def window_sizes(self) -> list[int | None]:
        """The distinct windows among the layers, global (None) first: one plan each per step."""
        sizes = set(self.windows) or {None}
        return sorted(sizes, key=lambda w: -1 if w is None else w)

    @property
    def plain(self) -> bool:
        """No windows and no soft-capping: what the C kernels run."""
        return self.softcap is None and all(w is None for w in self.windows)


@dataclass(frozen=True)
class PreparedStep(Generic[Prepared]):
    """A step's plans and the executor's index tensors for them, one per window size among the
    model's layers (key None: the global layers)."""

    plans: dict[int | None, AttentionPlan]
    inputs: dict[int | None, Prepared]

    @property
    def plan(self) -> AttentionPlan:
        """The global layers' plan (a model with windows on every layer: its first window's)."""
        return self.plans[None] if None in self.plans else next(iter(self.plans.values()))


class Attention(Generic[Prepared]):
    """The engine's attention: `prepare` once per step (a plan per window size, then the
    executor's index tensors), `forward` once per layer (`Executor.run`'s contract)."""

    def __init__(self, mode: Mode | str, executor: Executor[Prepared], features: AttentionFeatures | None = None) -> None:
        self.mode = Mode(mode)
        self.executor = executor
        self.windows = (features or AttentionFeatures()).window_sizes

    def prepare(self, meta: AttentionMetadata) -> PreparedStep[Prepared]:
        plans = {w: plan_step(meta, self.mode, self.executor.kind, w) for w in self.windows}
        return PreparedStep(plans, {w: self.executor.prepare(p) for w, p in plans.items()})

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: PreparedStep[Prepared],
                scale: float, window: int | None = None) -> torch.Tensor:
        """One layer's attention; `window`: that layer's sliding window (None: global)."""
        return self.executor.run(q, k_cache, v_cache, step.inputs[window], scale)


def make_executor(device: torch.device, dtype: torch.dtype, head_dim: int, kernels: CpuKernels | None,
                  features: AttentionFeatures | None = None, heads: tuple[int, int] | None = None) -> Executor:
    """The executor for an engine on `device` in `dtype` with heads of `head_dim`; `kernels`: the
    loaded C kernels, None where there are none (no compiler, or switched off); `features`: what
    the model's attention needs (None: plain causal attention); `heads`: (query heads, KV heads),
    which the Triton executor packs into its rows (None: no Triton executor)."""
    # NOTE: imported here because the executors import their constants from this module.
    from batchllm.attention.cpu_executor import CpuExecutor
    from batchllm.attention.torch_executor import TorchExecutor

    features = features or AttentionFeatures()
    if kernels is not None and device.type == "cpu" and dtype in KERNEL_DTYPES and features.plain:
        return CpuExecutor(kernels, prefill_in_c=kernels.fast_prefill(head_dim))
    if (device.type == "cuda" and heads is not None and dtype in TRITON_DTYPES and features.plain
            and triton_available()):
        from batchllm.attention.triton_executor import TritonExecutor  # imports triton: CUDA only

        return TritonExecutor(device, *heads)
    return TorchExecutor(device, softcap=features.softcap)


def make_attention(mode: Mode | str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   kernels: CpuKernels | None, features: AttentionFeatures | None = None,
                   heads: tuple[int, int] | None = None) -> Attention:
    """The engine's attention: `mode` (`EngineConfig.attention`) on the executor `make_executor`
    picks, with a plan per window size of `features`."""
    return Attention(Mode(mode), make_executor(device, dtype, head_dim, kernels, features, heads), features)
