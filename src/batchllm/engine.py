"""Engine: the model, its KV pool, the scheduler and the sampler; runs sequences to completion."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from batchllm.config import EngineConfig
from batchllm.executor.logits_processors import LogitsProcessors
from batchllm.executor.malloc import keep_heap
from batchllm.executor.prompt_logprobs import PromptLogprobs
from batchllm.executor.runner import ModelRunner, logit_rows
from batchllm.executor.sampler import Sampler
from batchllm.kernels.cpu import DTYPES as KERNEL_DTYPES, load_cpu_kernels
from batchllm.limits import engine_limits
from batchllm.models.folder import read_config
from batchllm.models.loader import DTYPES, load_model
from batchllm.outputs import RunStats
from batchllm.planner import Plan
from batchllm.scheduler.policies import make_scheduler
from batchllm.sequence import Sequence
from batchllm.tokenizer import Tokenizer
from batchllm.attention.select import AttentionFeatures, make_attention

if TYPE_CHECKING:
    from batchllm.structured.grammars import GrammarCache


class Engine:
    """Loads a model folder and runs batches of `Sequence`s through one scheduler, one flat
    forward pass per step."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = Path(config.model)
        self.model_config = read_config(path)
        self.tokenizer = Tokenizer(Path(config.tokenizer) if config.tokenizer else path)
        mc = self.model_config
        # The rule run-batch and `batchllm plan` validate against too (limits.py).
        self.limits = engine_limits(config, mc)
        self.dtype = DTYPES[self.limits.dtype]
        self.device = torch.device(config.device)
        if config.keep_heap and self.device.type == "cpu":
            keep_heap()
        self.max_model_len = self.limits.max_model_len
        self.num_blocks = self.limits.num_kv_blocks
        self.kv_bytes_per_token = self.limits.kv_bytes_per_token
        model = load_model(path, mc, self.dtype, self.device, self.max_model_len, pack_weights=config.cpu_kernels)
        # NOTE: only for the dtypes the kernels take (float16 runs all PyTorch), so every component
        # handed `kernels` may use them for the whole run.
        use_kernels = config.cpu_kernels and self.device.type == "cpu" and self.dtype in KERNEL_DTYPES
        kernels = load_cpu_kernels() if use_kernels else None
        model.kernels = kernels
        self.runner = ModelRunner(model, self.num_blocks, config.block_size, self.dtype, self.device,
                                  make_attention(config.attention, self.device, self.dtype, mc.head_dim, kernels,
                                                 AttentionFeatures(mc.layer_windows, mc.attn_logit_softcapping),
                                                 (mc.num_heads, mc.num_kv_heads)))
        self.sampler = Sampler(kernels, LogitsProcessors(self.tokenizer))
        self.prompt_logprobs = PromptLogprobs([])  # the last run's
        self._grammars = None  # structured.grammars.GrammarCache, made on the first constraint

    @property
    def grammars(self) -> "GrammarCache":
        """Compiled structured-output constraints (llguidance is imported on first use)."""
        if self._grammars is None:
            from batchllm.structured.grammars import GrammarCache

            self._grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size)
        return self._grammars

    @property
    def eos_token_ids(self) -> list[int]:
        return self.tokenizer.eos_token_ids

    def run(self, seqs: list[Sequence], plan: Plan | None, stats: RunStats,
            on_step: Callable[[RunStats], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            prompt_logprobs_from: dict[int, int] | None = None) -> Iterator[Sequence]:
        """Run `seqs` to completion, yielding each one as it finishes; fill `stats` on the way.

        `should_stop` is asked before every step; when it says yes, nothing new is admitted and
        the run ends after the current step (unfinished sequences are not yielded). The prompt
        log-probs of the run are in `self.prompt_logprobs` (`prompt_logprobs_from`: seq_id ->
        first prompt position wanted, 1 when absent).
        """
        sched = make_scheduler(self.config, self.num_blocks, seqs, plan, self.limits.max_context)
        # NOTE: built after the scheduler, which gives group members their group id.
        self.prompt_logprobs = lp = PromptLogprobs(seqs, prompt_logprobs_from)
        stats.num_kv_blocks, stats.block_size = self.num_blocks, self.config.block_size
        stats.policy = self.config.policy
        masks = None
        if any(s.params.structured_outputs is not None for s in seqs):
            from batchllm.structured.masks import StepMasks

            # Every constraint is compiled before the first step (`LLM` compiles and reports
            # failures first; this compiles whatever a direct caller did not).
            failed = self.grammars.compile([s.params for s in seqs])
            if failed:
                raise ValueError("structured outputs that do not compile: " + "; ".join(sorted(set(failed.values()))))
            masks = StepMasks(self.grammars, seqs, self.eos_token_ids, self.sampler.kernels,
                              overlap=self.config.grammar_overlap)
        start = time.perf_counter()
        try:
            while sched.has_unfinished():
                if should_stop is not None and should_stop():
                    break
                out = sched.schedule()
                if not out.seqs:
                    raise RuntimeError("scheduler produced an empty step with work left (KV pool too small?)")
                stats.peak_kv_blocks = max(stats.peak_kv_blocks, sched.bm.num_used_blocks)
                if masks:  # filled during the forward pass when overlapping (StepMasks)
                    masks.begin([out.seqs[i] for i in logit_rows(out)])
                logits, row_seqs = self.runner.run(out, lp if lp.active else None)
                if self.runner.last_prompt_rows is not None:
                    lp.record(*self.runner.last_prompt_rows)
                plan = self.runner.last_plan
                stats.prefix_shared_attention_steps += plan is not None and plan.prefix_shared
                sched.after_step(out)
                result = self.sampler(logits, [out.seqs[i] for i in row_seqs], self.eos_token_ids,
                                      masks) if row_seqs else None
                if masks and row_seqs:
                    masks.advance([out.seqs[i] for i in row_seqs], result.token_ids)
                for j, i in enumerate(row_seqs):
                    seq = out.seqs[i]
                    reason = self._append(seq, result.token_ids[j], result.logprobs[j], result.top_logprobs[j])
                    if reason is not None:
                        sched.finish(seq, reason)
                        stats.output_tokens += seq.num_output_tokens
                        yield seq
                stats.steps += 1
                stats.tokens_per_step.append(out.total_tokens)
                stats.computed_prefill_tokens = sched.computed_prefill_tokens
                stats.preemptions = sched.num_preemptions
                stats.wall_time_s = time.perf_counter() - start
                if on_step is not None:
                    on_step(stats)
        finally:
            if masks is not None:
                masks.close(raise_error=sys.exc_info()[0] is None)
        stats.wall_time_s = time.perf_counter() - start
        if masks is not None:
            stats.grammar_mask_time_s, stats.grammar_mask_steps = masks.mask_time_s, masks.mask_steps
            stats.grammar_fill_time_s = masks.fill_time_s
        stats.kv_blocks_in_use_at_end = sched.bm.num_used_blocks

    def _append(self, seq: Sequence, token: int, logprob: float | None, top: dict[int, float] | None) -> str | None:
        """Append a sampled token; return why the sequence is finished ("stop", "length") or None."""
        seq.token_ids.append(token)
        p = seq.params
        if top is not None:
            seq.logprobs = (seq.logprobs or []) + [top]
            seq.cumulative_logprob += logprob
        n_out = seq.num_output_tokens
        reason: str | None = None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                reason, seq.stop_reason = "stop", None
            elif token in p.stop_token_ids:
                reason, seq.stop_reason = "stop", token
            elif p.stop_list:
                text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
                # NOTE: only text generated after the first min_tokens tokens may stop the sequence
                # (as in vLLM): a match must end past the text of those tokens.
                floor = len(self.tokenizer.decode(seq.output_token_ids[:p.min_tokens], p.skip_special_tokens)
                            ) if p.min_tokens else 0
                hits = [(at, s) for s in p.stop_list if (at := text.find(s, max(0, floor - len(s) + 1))) >= 0]
                if hits:
                    at, s = min(hits)
                    end = at + len(s) if p.include_stop_str_in_output else at
                    reason, seq.stop_reason, seq.stop_text = "stop", s, text[:end]
        # NOTE: max_context (the context or the pool, whichever is smaller) caps a max_tokens beyond
        # it: a longer sequence could never get its KV (capacity.py).
        if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= self.limits.max_context):
            reason = "length"
        return reason
