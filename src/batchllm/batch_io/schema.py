"""Output records in the OpenAI Batch API shape (result lines and error lines).

Ids are derived from the input file's hash and the line number, so a resumed job writes the
same ids an uninterrupted one would. Result choices also carry vLLM's `stop_reason`.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from batchllm.outputs import CompletionOutput, Logprob, RequestOutput
from batchllm.tokenizer import Tokenizer

from .requests import BatchRequest, ErrorRecord


def _hex(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]


class RecordMaker:
    """Builds result and error records for one input file and model."""

    def __init__(self, input_sha256: str, model_name: str, tokenizer: Tokenizer | None,
                 system_fingerprint: str | None = None) -> None:
        self.sha = input_sha256
        self.model = model_name
        self.tok = tokenizer
        self.fingerprint = system_fingerprint
        self._token_text: dict[int, str] = {}

    def _ids(self, line: int) -> tuple[str, str]:
        return f"batch_req_{_hex(self.sha, line)}", f"req_{_hex(self.sha, line, 'request')}"

    def error(self, err: ErrorRecord) -> dict[str, Any]:
        """A 400 error line; `line` (1-based input line) lets resume and users find the input."""
        rid, req = self._ids(err.line)
        body = {"error": {"message": err.message, "type": "invalid_request_error", "param": err.param,
                          "code": err.code}}
        return {"id": rid, "custom_id": err.custom_id, "response": {"status_code": 400, "request_id": req,
                                                                   "body": body}, "error": None, "line": err.line}

    def result(self, req: BatchRequest, outputs: list[RequestOutput]) -> dict[str, Any]:
        """A 200 result line: one output per prompt of `req` (chat: one)."""
        rid, request_id = self._ids(req.line)
        logprobs = req.params.logprobs
        choices: list[dict[str, Any]] = []
        prompt_tokens = cached = completion_tokens = 0
        for k, out in enumerate(outputs):
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.num_cached_tokens
            for c in sorted(out.outputs, key=lambda c: c.index):
                completion_tokens += len(c.token_ids)
                choice: dict[str, Any] = {"index": k * req.params.n + c.index}
                if req.endpoint == "chat":
                    choice["message"] = {"role": "assistant", "content": c.text, "refusal": None}
                    choice["logprobs"] = self._chat_logprobs(c, logprobs) if logprobs is not None else None
                else:
                    echo = self._echo(out, req.params.skip_special_tokens) if req.echo else None
                    choice["text"] = c.text if echo is None else echo[0] + c.text
                    choice["logprobs"] = (self._completion_logprobs(c, req.params.skip_special_tokens, echo)
                                          if logprobs is not None else None)
                choice["finish_reason"] = c.finish_reason
                choice["stop_reason"] = c.stop_reason
                choices.append(choice)
        chat = req.endpoint == "chat"
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{_hex(self.sha, req.line, 'body')}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached}},
            "system_fingerprint": self.fingerprint,
        }
        return {"id": rid, "custom_id": req.custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}

    def _text(self, token: int) -> str:
        t = self._token_text.get(token)
        if t is None:
            assert self.tok is not None
            t = self._token_text[token] = self.tok.token_text(token)
        return t

    def _echo(self, out: RequestOutput, skip_special_tokens: bool) -> tuple[str, RequestOutput]:
        """`echo`: the prompt's text (as given, or decoded from its token ids) and its output."""
        assert self.tok is not None
        text = out.prompt if out.prompt is not None else self.tok.decode(out.prompt_token_ids, skip_special_tokens)
        return text, out

    def _completion_logprobs(self, c: CompletionOutput, skip_special_tokens: bool,
                             echo: tuple[str, RequestOutput] | None = None) -> dict[str, Any]:
        """/v1/completions logprobs: tokens, token_logprobs, top_logprobs, text_offset. `tokens`
        join to the choice's text (a split character is carried by the token completing it) and
        `text_offset` is where each starts in it; a stop string cut from the text is cut from
        the tokens too. With `echo`, the prompt's tokens come first (the first one without a
        log-prob: null and null, as OpenAI writes it)."""
        assert self.tok is not None
        tokens, token_lps, tops, offsets = [], [], [], []
        offset = 0
        if echo is not None:
            text, out = echo
            ids = out.prompt_token_ids
            for tid, d, piece in zip(ids, out.prompt_logprobs or [None] * len(ids),
                                     self.tok.token_pieces(ids, skip_special_tokens)):
                piece = piece[:max(0, len(text) - offset)]
                tokens.append(piece)
                token_lps.append(None if d is None else _value(d.get(tid)))
                tops.append(None if d is None else
                            {self._text(t): _value(lp) for t, lp in sorted(d.items(), key=lambda kv: -_value(kv[1]))})
                offsets.append(offset)
                offset += len(piece)
            offset = len(text)
        steps = (c.logprobs or [])[:len(c.token_ids)]
        pieces = self.tok.token_pieces(c.token_ids[:len(steps)], skip_special_tokens)
        text_end = offset + len(c.text)
        for tid, d, piece in zip(c.token_ids, steps, pieces):
            piece = piece[:max(0, text_end - offset)]
            tokens.append(piece)
            token_lps.append(_value(d.get(tid)))
            tops.append({self._text(t): _value(lp) for t, lp in sorted(d.items(), key=lambda kv: -_value(kv[1]))})
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, c: CompletionOutput, top: int) -> dict[str, Any]:
        """/v1/chat/completions logprobs: content = [{token, logprob, bytes, top_logprobs}]; `bytes`
        are each token's raw bytes (a split character's bytes over its tokens), `token` its text,
        or "bytes:\\xNN..." where its bytes are not whole characters."""
        assert self.tok is not None
        content = []
        for tid, d in zip(c.token_ids, c.logprobs or [], strict=False):
            best = sorted(d.items(), key=lambda kv: -_value(kv[1]))[:top]
            content.append({"token": self._text(tid), "logprob": _value(d.get(tid)),
                            "bytes": list(self.tok.token_bytes(tid)),
                            "top_logprobs": [{"token": self._text(t), "logprob": _value(lp),
                                              "bytes": list(self.tok.token_bytes(t))} for t, lp in best]})
        return {"content": content, "refusal": None}


def _value(lp: Logprob | float | None) -> float | None:
    """A log-probability as a float (engine outputs hold Logprob objects)."""
    return lp.logprob if isinstance(lp, Logprob) else lp
