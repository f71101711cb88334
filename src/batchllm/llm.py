"""The LLM facade (vLLM-shaped): generate / chat / plan; input order in, input order out."""

from __future__ import annotations

import json
import numbers
import sys
import time
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence as Seq
from typing import Any, Union

from tqdm import tqdm

from batchllm.batch_plan import plan_batch
from batchllm.config import EngineConfig
from batchllm.engine import Engine
from batchllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RunStats
from batchllm.planner import Plan
from batchllm.sampling_params import SamplingParams
from batchllm.seeding import prompt_seeds, sample_seed
from batchllm.sequence import Sequence

import torch

PromptType = Union[str, list[int], dict[str, Any]]


def _token_ids(x: Any) -> list[int] | None:
    """`x` as a list of Python ints when it is a sequence of integers (Python or numpy integers,
    not bools), else None."""
    if isinstance(x, (str, bytes, dict)):
        return None
    try:
        items = list(x)
    except TypeError:
        return None
    if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
        return [int(t) for t in items]
    return None


def _no_lora(lora_request: Any) -> None:
    if lora_request is not None:
        raise ValueError("lora_request is not supported by batchllm (no LoRA adapters)")


class LLM:
    """An engine for one model folder. Unknown keyword arguments raise TypeError; vLLM's engine
    arguments are mapped, ignored with a warning, or refused (see `EngineConfig.from_kwargs`).

    Example: `LLM("path/to/model", dtype="bfloat16").generate(["Hello"], SamplingParams(max_tokens=8))`.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.config = EngineConfig.from_kwargs(model, **kwargs)
        self.engine = Engine(self.config)
        self.tokenizer = self.engine.tokenizer
        self.last_run_stats: RunStats | None = None
        self._default_params: SamplingParams | None = None
        if self.engine.limits.kv_note:
            print(f"[batchllm] {self.engine.limits.kv_note}", file=sys.stderr, flush=True)

    # ---- inputs -----------------------------------------------------------------------------
    @staticmethod
    def _as_list(prompts: PromptType | Seq[PromptType]) -> list[PromptType]:
        """One prompt (a string, a dict, or one sequence of token ids) or a sequence of prompts."""
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and (ids := _token_ids(prompts)) is not None:
            return [ids]  # one prompt given as token ids
        return prompts  # type: ignore[return-value]

    def _tokenize(self, prompts: Seq[PromptType]) -> tuple[list[str | None], list[list[int]], dict[int, str]]:
        """(texts, token ids, {index: why} for prompts of no known shape, whose ids are [])."""
        texts: list[str | None] = []
        ids: list[list[int]] = []
        bad: dict[int, str] = {}
        for i, p in enumerate(prompts):
            text, given = (p, None) if isinstance(p, str) else \
                (p.get("prompt"), p.get("prompt_token_ids")) if isinstance(p, dict) else (None, p)
            if given is not None and (tokens := _token_ids(given)) is not None:
                texts.append(text if isinstance(text, str) else None)
                ids.append(tokens)
            elif given is None and isinstance(text, str):
                texts.append(text)
                ids.append(self.tokenizer.encode(text))
            else:
                texts.append(None)
                ids.append([])
                bad[i] = (f"a prompt is a string, a sequence of integer token ids or a dict with 'prompt' or "
                          f"'prompt_token_ids', got {type(p).__name__}"
                          + (f" with prompt_token_ids of {type(given).__name__}" if isinstance(p, dict) else ""))
        return texts, ids, bad

    def default_sampling_params(self) -> SamplingParams:
        """What `sampling_params=None` means: vLLM's defaults overridden by the model's
        generation_config.json (temperature, top_p, top_k, repetition_penalty), as vLLM does;
        said once on stderr when the model sets any of them."""
        if self._default_params is None:
            path = Path(self.config.model) / "generation_config.json"
            gen = json.loads(path.read_text()) if path.exists() else {}
            found = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")
                     if gen.get(k) is not None}
            self._default_params = SamplingParams(**found)
            if found:
                print(f"[batchllm] default sampling parameters from the model's generation_config.json: "
                      + ", ".join(f"{k}={v}" for k, v in found.items())
                      + " (pass SamplingParams to override)", file=sys.stderr, flush=True)
        return self._default_params

    def _params_list(self, n: int, sampling_params: SamplingParams | Seq[SamplingParams] | None
                     ) -> list[SamplingParams]:
        if sampling_params is None:
            return [self.default_sampling_params()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return params

    def validate(self, prompt_ids: list[list[int]], params: list[SamplingParams]) -> dict[int, str]:
        """{prompt index: why} for each invalid prompt; empty when all are valid."""
        return self.engine.limits.prompt_errors(prompt_ids, params)

    def structured_errors(self, params: list[SamplingParams]) -> dict[int, str]:
        """Compile every distinct structured-output constraint of `params` (in parallel, each once,
        within the engine's time limit); {index: why} for the entries whose constraint failed."""
        if not any(p.structured_outputs is not None for p in params):
            return {}
        grammars = self.engine.grammars
        before = grammars.compile_time_s
        failed = grammars.compile(params, timeout_s=self.config.grammar_timeout_s)
        self._compile_time_s = grammars.compile_time_s - before
        return failed

    @staticmethod
    def _truncated(ids: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
        """`truncate_prompt_tokens=k`: the last k tokens of the prompt."""
        return [x[-p.truncate_prompt_tokens:] if p.truncate_prompt_tokens else x for x, p in zip(ids, params)]

    @staticmethod
    def _make_seqs(prompt_ids: list[list[int]], params: list[SamplingParams], seeds: list[int | None]
                   ) -> list[Sequence]:
        """Prompt i's n samples as n sequences, numbered as `plan_batch` numbers them; sampled
        ones each with a generator seeded from `seeds[i]` (`prompt_seeds`, which batch_io writes up
        front too)."""
        seqs: list[Sequence] = []
        for i, (ids, p, seed) in enumerate(zip(prompt_ids, params, seeds, strict=True)):
            for j in range(p.n):
                gen = None if seed is None else torch.Generator().manual_seed(sample_seed(seed, j))
                seqs.append(Sequence(seq_id=len(seqs), request_index=i, sample_index=j, token_ids=list(ids),
                                     num_prompt_tokens=len(ids), params=p, generator=gen))
        return seqs

    # ---- public -----------------------------------------------------------------------------
    def plan(self, prompts: PromptType | Seq[PromptType],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> Plan:
        """Plan the batch (prefix-sharing groups and their order) without running the model."""
        _, ids, bad = self._tokenize(self._as_list(prompts))
        if bad:
            raise TypeError("; ".join(f"prompt {i}: {why}" for i, why in bad.items()))
        return plan_batch(self.config, ids, self._params_list(len(ids), sampling_params))

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: None = None, return_errors: bool = False
                 ) -> list[RequestOutput]:
        """Generate completions; returns one RequestOutput per prompt, in input order.

        An invalid prompt (unknown shape, empty, too long, bad parameters, a constraint that does
        not compile) raises for the whole call, before anything runs; with `return_errors=True` it
        becomes that prompt's output instead (`error` set, no completions) and the others run."""
        _no_lora(lora_request)
        prompts = self._as_list(prompts)
        results: list[RequestOutput | None] = [None] * len(prompts)
        for out in self.iter_generate(prompts, sampling_params, use_tqdm=use_tqdm, return_errors=return_errors):
            results[int(out.request_id)] = out
        return [r for r in results if r is not None]

    def loglikelihood(self, pairs: Seq[tuple[str | list[int], str | list[int]]], use_tqdm: bool = True
                      ) -> list[tuple[float, bool]]:
        """Score (context, continuation) pairs, given as two strings or two lists of token ids:
        per pair, the continuation's summed log-prob and whether greedy decoding from the context
        would produce it. Contexts are planned as shared prefixes (see `batchllm.scoring`)."""
        from batchllm.scoring import loglikelihood
        return loglikelihood(self, pairs, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = True, lora_request: None = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[Any] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Render conversations with the model's chat template (or `chat_template`), then generate.

        `messages`: one conversation or a list of them; content may be a string or OpenAI text
        content parts (joined with newlines). `continue_final_message` leaves the last message
        open for the model to continue (then `add_generation_prompt` must be False);
        `chat_template_kwargs` reach the template, e.g. `{"enable_thinking": False}` for Qwen3.
        The arguments follow vLLM's order; `lora_request` and `tools` must be None (not
        supported), and content always reaches the template as a string (format "auto"/"string").
        """
        _no_lora(lora_request)
        if tools:
            raise ValueError("tools are not supported by batchllm")
        if chat_template_content_format not in ("auto", "string"):
            raise ValueError(f"chat_template_content_format={chat_template_content_format!r} is not supported: "
                             f"content reaches the template as a string ('auto' or 'string')")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt, chat_template=chat_template,  # type: ignore[arg-type]
                continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def iter_generate(self, prompts: Seq[PromptType],
                      sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                      use_tqdm: bool = True, should_stop: Callable[[], bool] | None = None,
                      prompt_logprobs_from: list[int] | None = None, return_errors: bool = False
                      ) -> Iterator[RequestOutput]:
        """Like `generate`, but yields each request's output as soon as all its samples finish
        (completion order; `request_id` is the input index). Validates everything first; with
        `return_errors`, the invalid prompts' outputs (`error` set) come first.
        `prompt_logprobs_from[i]`: the first prompt position whose log-prob request i wants
        (earlier ones are None; `loglikelihood` skips the context this way)."""
        arrival = time.time()
        texts, ids, bad = self._tokenize(self._as_list(prompts))
        if bad and not return_errors:
            raise TypeError("; ".join(f"prompt {i}: {why}" for i, why in bad.items()))
        params = self._params_list(len(ids), sampling_params)
        ids = self._truncated(ids, params)
        self._compile_time_s = 0.0
        errors = {**self.structured_errors(params), **self.validate(ids, params), **bad}
        if errors and not return_errors:
            listed = [f"prompt {i}: {why}" for i, why in sorted(errors.items())]
            raise ValueError(f"{len(errors)} invalid prompt(s): " + "; ".join(listed[:20])
                             + (" ..." if len(errors) > 20 else ""))
        for i, why in sorted(errors.items()):
            yield RequestOutput(request_id=str(i), prompt=texts[i], prompt_token_ids=ids[i], outputs=[], error=why)
        seeds = prompt_seeds(ids, params, self.config.seed)  # over every prompt: an error moves no seed
        # The valid prompts run, as requests numbered 0..; `index[r]` is request r's input index.
        index = [i for i in range(len(ids)) if i not in errors]
        texts, ids, params, seeds = ([xs[i] for i in index] for xs in (texts, ids, params, seeds))
        if prompt_logprobs_from is not None:
            prompt_logprobs_from = [prompt_logprobs_from[i] for i in index]
        if not ids:
            return
        seqs = self._make_seqs(ids, params, seeds)
        plan = plan_batch(self.config, ids, params) if self.config.policy == "batchllm" else None
        # The request each shared group's prefix is computed for: its first member's.
        prefix_owner = {gid: seqs[g.members[0]].request_index for gid, g in enumerate(plan.groups)
                        if g.shared} if plan is not None else {}
        self.engine.sampler.first_token_time.clear()
        # NOTE: logical prefill counts every sample: without sharing, each of n samples prefills its prompt.
        stats = RunStats(num_requests=len(ids), logical_prefill_tokens=sum(s.num_prompt_tokens for s in seqs),
                         grammar_compile_time_s=self._compile_time_s)
        self.last_run_stats = stats
        by_request: dict[int, list[Sequence]] = {}
        for s in seqs:
            by_request.setdefault(s.request_index, []).append(s)
        remaining = {i: len(v) for i, v in by_request.items()}
        bar = tqdm(total=len(ids), desc="requests", unit="req", disable=not use_tqdm, file=sys.stderr,
                   dynamic_ncols=True)
        last_refresh = [time.monotonic()]

        def postfix(refresh: bool) -> None:
            t = max(stats.wall_time_s, 1e-9)
            # NOTE: prefill counts the prompt tokens computed so far, so it moves while long
            # prompts prefill and no request has finished yet.
            bar.set_postfix_str(f"prefill {stats.computed_prefill_tokens / t:.0f} tok/s, out "
                                f"{stats.output_tokens / t:.0f} tok/s", refresh=refresh)

        def step_hook() -> bool:  # polled before every engine step
            if use_tqdm and stats.steps and time.monotonic() - last_refresh[0] >= 0.5:
                last_refresh[0] = time.monotonic()
                postfix(True)
            return should_stop is not None and should_stop()

        try:
            first = None if prompt_logprobs_from is None else {
                s.seq_id: prompt_logprobs_from[s.request_index] for s in seqs}
            for seq in self.engine.run(seqs, plan, stats, should_stop=step_hook, prompt_logprobs_from=first):
                i = seq.request_index
                remaining[i] -= 1
                if remaining[i]:
                    continue
                bar.update(1)
                postfix(False)
                yield self._request_output(index[i], texts[i], ids[i], by_request[i], prefix_owner, arrival)
        finally:
            bar.close()

    def _request_output(self, index: int, text: str | None, ids: list[int], seqs: list[Sequence],
                        prefix_owner: dict[int, int], arrival: float) -> RequestOutput:
        outs = []
        for s in seqs:
            p = s.params
            out_text = s.stop_text if s.stop_text is not None else self.tokenizer.decode(
                s.output_token_ids, skip_special_tokens=p.skip_special_tokens)
            outs.append(CompletionOutput(
                index=s.sample_index, text=out_text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if p.logprobs is not None else None,
                logprobs=self._decoded(s.logprobs), finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            ))
        now = time.time()
        firsts = [t for s in seqs if (t := self.engine.sampler.first_token_time.pop(s.seq_id, None)) is not None]
        return RequestOutput(request_id=str(index), prompt=text, prompt_token_ids=ids, outputs=outs,
                             num_cached_tokens=min(self._cached_tokens(s, prefix_owner) for s in seqs),
                             prompt_logprobs=self._decoded(self.engine.prompt_logprobs.take(seqs[0])),
                             metrics=RequestMetrics(arrival, min(firsts, default=None), now, now))

    @staticmethod
    def _cached_tokens(seq: Sequence, prefix_owner: dict[int, int]) -> int:
        """Prompt tokens `seq` reused from computation done for another request. A group's prefix
        is computed once, for its first member's request: that request's samples count it as
        computed, the other members' requests as cached."""
        if prefix_owner.get(seq.group_id) == seq.request_index:
            return 0
        return seq.num_cached_tokens

    def _decoded(self, steps: list[dict[int, Logprob] | None] | None) -> list[dict[int, Logprob] | None] | None:
        """The steps' Logprobs with `decoded_token` (each token's text on its own) filled in."""
        if steps is None:
            return None
        for d in steps:
            for tid, lp in (d or {}).items():
                if lp.decoded_token is None:
                    lp.decoded_token = self.tokenizer.decode([tid], skip_special_tokens=False)
        return steps
