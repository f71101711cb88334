"""ModelRunner: owns the model and the KV pool; turns one SchedulerOutput into one forward pass."""

from __future__ import annotations

import math
import mmap

import torch

from batchllm.attention.metadata import build_metadata
from batchllm.attention.plan import AttentionPlan
from batchllm.attention.select import Attention
from batchllm.executor.prompt_logprobs import PromptLogprobs
from batchllm.models.llama import CausalLM
from batchllm.scheduler.scheduler import SchedulerOutput


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled KV pool: padded or masked reads must never meet NaN (0 * NaN poisons a row).

    On the CPU the pool is an anonymous memory mapping, whose pages the OS hands out zeroed when
    they are first touched: a pool sized to a share of the machine's memory costs no start-up time
    and no resident memory until blocks are used (a zero-filled heap tensor writes every page up
    front: about 2 s per GiB here). The tensor keeps the mapping alive.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, math.prod(shape) * dtype.itemsize), dtype=dtype).view(shape)


def logit_rows(out: SchedulerOutput) -> list[int]:
    """Indices (into `out.seqs`) of the sequences that get logits this step, in the order of the
    logits rows `ModelRunner.run` returns: those whose last token is computed by it (never a
    group's prefix pseudo-sequence). Known before the step runs (structured outputs' masks are
    filled meanwhile)."""
    return [i for i, (seq, n) in enumerate(zip(out.seqs, out.num_tokens))
            if seq.num_computed_tokens + n == seq.num_tokens and not seq.is_prefix]


class ModelRunner:
    """Packs the scheduled tokens of every sequence into one flat batch (no padding) and runs it.

    The KV pool is one tensor [layers, 2, kv_heads, (num_blocks + 1) * block_size, head_dim]
    (head-major, see `gather_kv`); slot `b * block_size + i` holds position i of block b. Block 0
    is the null block.
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, backend: Attention) -> None:
        cfg = model.cfg
        self.model = model
        self.block_size = block_size
        self.device = device
        self.backend = backend
        self.kv_cache = zeroed_pool((cfg.num_layers, 2, cfg.num_kv_heads, (num_blocks + 1) * block_size, cfg.head_dim),
                                    dtype, device)
        self.last_plan: AttentionPlan | None = None  # the attention plan of the last step
        # The last step's prompt log-prob rows: their logits and (sequence, positions) spans.
        self.last_prompt_rows: tuple[torch.Tensor, list[tuple]] | None = None

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy the KV of whole blocks (src -> dst) in every layer."""
        if not copies:
            return
        bs = self.block_size
        pool = self.kv_cache.view(*self.kv_cache.shape[:3], -1, bs, self.kv_cache.shape[-1])
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        pool[:, :, :, dst] = pool[:, :, :, src]

    def run(self, out: SchedulerOutput, prompt_logprobs: PromptLogprobs | None = None) -> tuple[torch.Tensor, list[int]]:
        """Compute the scheduled tokens; return logits [rows, vocab] and the indices (into
        `out.seqs`) of the sequences they belong to: those whose last token was computed.

        With `prompt_logprobs`, the positions it asks for also get logits (only those: each row
        costs a vocabulary-sized product); they are left in `last_prompt_rows`."""
        self.copy_blocks(out.copies)
        ids, pos, q_lens, ctx_lens, ends = [], [], [], [], []
        prompt_rows: list[int] = []
        spans: list[tuple] = []
        start = 0
        for seq, n in zip(out.seqs, out.num_tokens):
            c = seq.num_computed_tokens
            ids.extend(seq.token_ids[c:c + n])
            pos.extend(range(c, c + n))
            q_lens.append(n)
            ctx_lens.append(c + n)
            if prompt_logprobs is not None and (want := prompt_logprobs.rows(seq, c, n)):
                prompt_rows.extend(start + p - c for p in want)
                spans.append((seq, want))
            start += n
            ends.append(start - 1)
        row_seqs = logit_rows(out)
        rows = [ends[i] for i in row_seqs]
        meta = build_metadata(
            q_lens, ctx_lens, [s.block_table for s in out.seqs], self.block_size, self.device,
            shared_lens=[s.num_shared_blocks * self.block_size for s in out.seqs],
            group_ids=[s.group_id for s in out.seqs],
        )
        prepared = self.backend.prepare(meta)
        self.last_plan = prepared.plan
        logits = self.model(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(pos, dtype=torch.long, device=self.device),
            self.kv_cache, meta, self.backend, prepared,
            torch.tensor(rows + prompt_rows, dtype=torch.long, device=self.device),
        )
        logits = logits.cpu()
        self.last_prompt_rows = (logits[len(rows):], spans) if spans else None
        return logits[:len(rows)], row_seqs
