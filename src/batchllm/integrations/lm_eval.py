"""An lm-evaluation-harness model backed by batchllm, registered as "batchllm" on import.

    import batchllm.integrations.lm_eval  # registers "batchllm"
    import lm_eval
    lm_eval.simple_evaluate(model="batchllm", model_args="pretrained=PATH,dtype=float32", tasks=[...])

lm-eval's own command line finds models only in its registry (it loads no plugins), so
`batchllm eval ARGS...` runs lm-eval's command line with this model registered:
`batchllm eval --model batchllm --model_args pretrained=PATH,dtype=bfloat16 --tasks mmlu`.

Each request list is handed to the engine as one batch: every context of a `loglikelihood` call
(a question scored with each of its choices, few-shot examples repeated across questions) is
planned as a shared prefix and computed once. Tokenization follows lm-eval's `hf` model with its
defaults (the tokenizer's special tokens, none when the text already starts with BOS), so both
score the same tokens. Needs the `lm-eval` package (`pip install "batchllm[lm-eval]"`).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch
# NOTE: lm-eval fills its registry with its built-in models only when the registry is empty at
# the first lookup; importing them first keeps "hf", "vllm"... available beside "batchllm".
import lm_eval.models  # noqa: F401
from lm_eval.api.model import TemplateLM
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from batchllm.llm import LLM
from batchllm.sampling_params import SamplingParams

# lm-eval's model arguments that are about its own batching: batchllm schedules the whole batch.
_BATCHING_ARGS = ("batch_size", "max_batch_size")


@register_model("batchllm")
class BatchLLMEval(TemplateLM):
    """lm-eval model arguments: `pretrained` (the model folder), `dtype`, `max_length` (default:
    the engine's max_model_len), `max_gen_toks` (default 256), `add_bos_token`, `prefix_token_id`,
    and any `LLM` engine argument (`num_kv_blocks`, `max_num_batched_tokens`, ...)."""

    def __init__(self, pretrained: str, dtype: str = "auto", max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 device: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        for name in _BATCHING_ARGS:
            kwargs.pop(name, None)
        if device is not None:
            # NOTE: lm-eval's command line passes device "cuda" unless told otherwise; on a machine
            # without CUDA the engine runs on the CPU instead (as lm-eval's hf model does).
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                warnings.warn(f"device {device!r} asked for but CUDA is not available; batchllm runs on the CPU",
                              stacklevel=2)
                device = "cpu"
            kwargs["device"] = device
        self.llm = LLM(str(pretrained), dtype=dtype, **kwargs)
        self.tokenizer = self.llm.tokenizer
        self.pretrained = str(pretrained)
        # NOTE: a scored text of max_length + 1 tokens (the last one is only predicted) plus the one
        # token the engine samples after every prompt must fit the engine's max_model_len.
        self._max_length = int(max_length) if max_length is not None else self.llm.engine.max_model_len - 2
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self._prefix_token_id = prefix_token_id
        tok = self.tokenizer
        self._eot = self._special_id(tok.eos_token) if tok.eos_token else tok.eos_token_ids[0]
        self._bos = self._special_id(tok.bos_token) if tok.bos_token else None

    def _special_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"special token {text!r} is not one token")
        return ids[0]

    # ---- tokens -----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        """The token that stands for an empty context: BOS where the tokenizer has one, else EOT."""
        if self._prefix_token_id is not None:
            return int(self._prefix_token_id)
        return self._bos if self._bos is not None else self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False  # the text carries its BOS already
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    # ---- requests ---------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Score token pairs, the context cut from the left so that the model reads at most
        `max_length` tokens (context + continuation but its last token, which is only predicted)."""
        fitted = []
        for ctx, cont in pairs:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit max_length={self.max_length}")
            keep = self.max_length + 1 - len(cont)
            fitted.append((ctx[-keep:], cont))
        return self.llm.loglikelihood(fitted, use_tqdm=not disable_tqdm)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (key, _, _), res in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in disjoint windows of at most `max_length` tokens each
        conditioned on the tokens before it (the first on `prefix_token_id`); every window of every
        text runs in one batch."""
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((list(ctx), list(cont)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(windows, disable_tqdm), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate from each context until one of its `until` strings (cut from the text), EOS or
        `max_gen_toks`; `do_sample=False` (the default) or `temperature=0` is greedy."""
        prompts, params = [], []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
            if not do_sample:
                temperature = 0.0
            extra = {k: kw[k] for k in ("top_p", "top_k", "min_p", "seed") if k in kw}
            ids = self.tok_encode(context)[-(self.max_length - max_gen):]
            prompts.append(ids)
            params.append(SamplingParams(max_tokens=max_gen, temperature=temperature, stop=until or None,
                                         **extra))
        outs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        texts = [o.outputs[0].text for o in outs]
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    # ---- chat templates ---------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The model's chat template (batchllm reads one per model folder), or None when off."""
        if chat_template is False or chat_template is None:
            return None
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)


def run_command_line(argv: Sequence[str]) -> None:
    """lm-eval's command line with arguments `argv` (it reads them from `sys.argv`), "batchllm"
    registered (this module's import did that)."""
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
