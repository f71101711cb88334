"""Parse batch input lines into typed requests or error records (OpenAI Batch API shape).

Accepted line forms:

* OpenAI: ``{"custom_id", "method": "POST", "url": "/v1/completions" | "/v1/chat/completions",
  "body": {...}}`` with ``prompt`` (completions) or ``messages`` (chat) in the body;
* convenience: ``{"prompt": ...}`` or ``{"messages": [...]}`` with optional sampling fields and
  ``custom_id`` beside them; without ``custom_id`` the 1-based line number (as a string) is the id.

Unknown fields are refused (as OpenAI does), so a typo never silently changes results; known
OpenAI fields batchllm cannot honour are accepted only at their neutral value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from batchllm.sampling_params import SamplingParams, StructuredOutputsParams

Endpoint = Literal["completions", "chat"]
URLS: dict[str, Endpoint] = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 20

# Sampling fields mapped onto SamplingParams (vLLM's extensions included).
_SAMPLING = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "min_tokens", "stop", "stop_token_ids",
             "ignore_eos", "skip_special_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "include_stop_str_in_output")
# Mapped with a conversion: OpenAI's shapes to SamplingParams' (`_logit_bias`, `_response_format`).
_CONVERTED = ("logit_bias", "response_format")
# Accepted and without effect on generation.
_IGNORED = ("model", "user", "metadata", "store", "service_tier", "stream_options", "prompt_cache_key",
            "safety_identifier", "parallel_tool_calls")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Known OpenAI/vLLM fields batchllm does not implement: accepted only when neutral.
_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "stream": lambda v: v is False,
    "tools": lambda v: v == [],
    "functions": lambda v: v == [],
    "tool_choice": lambda v: v in ("none", "auto"),
    "function_call": lambda v: v in ("none", "auto"),
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "prediction": lambda v: False,
    "reasoning_effort": lambda v: False,
    "web_search_options": lambda v: False,
    "verbosity": lambda v: False,
}
# Chat only: how the conversation is rendered (vLLM's server fields).
_CHAT_TEMPLATE = ("chat_template_kwargs", "add_generation_prompt", "continue_final_message")
_COMPLETIONS_ONLY: dict[str, Callable[[Any], bool]] = {
    "suffix": lambda v: v == "",
}


@dataclass(frozen=True)
class BatchRequest:
    """One valid input line. `prompts` (completions: one or more) or `messages` (chat) is set."""

    line: int
    custom_id: str
    endpoint: Endpoint
    params: SamplingParams
    prompts: tuple[str | tuple[int, ...], ...] = ()
    messages: tuple[dict[str, Any], ...] = ()
    max_tokens_given: bool = True  # False: chat without max_tokens (capped later, see prepare)
    # chat: keyword arguments of `Tokenizer.apply_chat_template` (add_generation_prompt,
    # continue_final_message, and the body's chat_template_kwargs)
    template_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # completions: the text (and, with logprobs, the log-probs) starts with the prompt's
    echo: bool = False


@dataclass(frozen=True)
class ErrorRecord:
    """An input line (or request) that cannot run: written to the error file with status 400."""

    line: int
    custom_id: str | None
    message: str
    code: str = "invalid_request"
    param: str | None = None

    @property
    def owns_id(self) -> bool:
        """False for a duplicate: its custom_id belongs to an earlier line."""
        return self.code != "duplicate_custom_id"


Item = BatchRequest | ErrorRecord


class LineError(Exception):
    """Why a line is invalid; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class ParsedFile:
    """Every non-blank line of an input file, in order, plus the file's identity."""

    items: list[Item]
    sha256: str
    num_bytes: int
    num_lines: int

    @property
    def requests(self) -> list[BatchRequest]:
        return [i for i in self.items if isinstance(i, BatchRequest)]

    @property
    def errors(self) -> list[ErrorRecord]:
        return [i for i in self.items if isinstance(i, ErrorRecord)]


def _prompts(value: Any, where: str) -> tuple[str | tuple[int, ...], ...]:
    """A completions prompt: a string, token ids, or a list of either (one prompt each)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value:
        if all(_is_int(t) for t in value):
            return (tuple(value),)
        if all(isinstance(p, str) for p in value):
            return tuple(value)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
            return tuple(tuple(p) for p in value)
    if isinstance(value, list) and not value:
        raise LineError(f"{where} must not be empty", where)
    raise LineError(f"{where} must be a string, a list of strings, a list of token ids or a list of "
                    f"token-id lists, got {json.dumps(value)[:80]}", where)


def _template_options(body: dict[str, Any], where: str) -> dict[str, Any]:
    """Chat template options a vLLM server takes in the body: add_generation_prompt,
    continue_final_message (booleans) and chat_template_kwargs (an object passed to the template)."""
    opts: dict[str, Any] = {}
    for key in ("add_generation_prompt", "continue_final_message"):
        if body.get(key) is not None:
            if not isinstance(body[key], bool):
                raise LineError(f"{where}{key} must be true or false", where + key)
            opts[key] = body[key]
    if opts.get("continue_final_message") and opts.get("add_generation_prompt", True):
        raise LineError(f"{where}continue_final_message needs add_generation_prompt=false",
                        where + "continue_final_message")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise LineError(f"{where}chat_template_kwargs must be an object", where + "chat_template_kwargs")
        reserved = sorted({"messages", "add_generation_prompt", "bos_token", "eos_token", "chat_template",
                           "continue_final_message"} & set(kwargs))
        if reserved:
            raise LineError(f"{where}chat_template_kwargs may not set {', '.join(reserved)}",
                            where + "chat_template_kwargs")
        opts.update(kwargs)
    return opts


def _messages(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    """Chat messages with text content; content-part lists are joined with newlines (as vLLM)."""
    if not isinstance(value, list) or not value:
        raise LineError(f"{where} must be a non-empty list of messages", where)
    out = []
    for k, m in enumerate(value):
        at = f"{where}[{k}]"
        if not isinstance(m, dict):
            raise LineError(f"{at} must be an object with role and content", at)
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise LineError(f"{at}.role must be a non-empty string", f"{at}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise LineError(f"{at}: tool and function calls are not supported", at, "unsupported")
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise LineError(f"{at}.content[{j}]: only text content parts are supported, got {kind!r}",
                                    f"{at}.content", "unsupported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise LineError(f"{at}.content must be a string or a list of text parts", f"{at}.content")
        out.append({**m, "content": content})
    return tuple(out)


def _check_fields(body: dict[str, Any], endpoint: Endpoint, where: str) -> None:
    """Refuse unknown fields, and known ones batchllm cannot honour unless they are neutral."""
    known = {*_SAMPLING, *_CONVERTED, *_IGNORED, *_NEUTRAL, "max_tokens", "max_completion_tokens", "logprobs"}
    known |= {"prompt", "best_of", "echo", *_COMPLETIONS_ONLY} if endpoint == "completions" else {
        "messages", "top_logprobs", *_CHAT_TEMPLATE}
    for key in body:
        if key not in known:
            raise LineError(f"unrecognized request argument supplied: {where}{key}", where + key)
    for key, neutral in (_NEUTRAL | _COMPLETIONS_ONLY if endpoint == "completions" else _NEUTRAL).items():
        if body.get(key) is not None and not neutral(body[key]):
            raise LineError(f"{where}{key}={json.dumps(body[key])[:60]} is not supported by batchllm",
                            where + key, "unsupported")
    if endpoint == "completions" and body.get("best_of") not in (None, body.get("n") or 1):
        raise LineError(f"{where}best_of other than n is not supported by batchllm", where + "best_of",
                        "unsupported")


def _logprobs(body: dict[str, Any], endpoint: Endpoint, where: str) -> int | None:
    """Completions: `logprobs: k`; chat: `logprobs: true` (+ `top_logprobs: k`). None = not asked."""
    lp = body.get("logprobs")
    if endpoint == "completions":
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise LineError(f"{where}logprobs must be an integer in [0, {MAX_LOGPROBS}], got {lp!r}",
                            where + "logprobs")
        return lp
    top = body.get("top_logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise LineError(f"{where}logprobs must be true or false for chat", where + "logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= MAX_LOGPROBS:
            raise LineError(f"{where}top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {top!r}",
                            where + "top_logprobs")
        if not lp:
            raise LineError(f"{where}top_logprobs needs logprobs=true", where + "top_logprobs")
    return (top or 0) if lp else None


def _logit_bias(value: Any, where: str) -> dict[int, float] | None:
    """OpenAI's `{"token id": bias}` (bias in [-100, 100]) -> {int: float}."""
    if value is None:
        return None
    bad = LineError(f"{where}logit_bias must map token ids to numbers in [-100, 100]", where + "logit_bias")
    if not isinstance(value, dict):
        raise bad
    out: dict[int, float] = {}
    for k, v in value.items():
        if not (isinstance(k, str) and k.isdigit()) or not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and -100 <= v <= 100):
            raise bad
        out[int(k)] = float(v)
    return out


def _response_format(value: Any, where: str) -> StructuredOutputsParams | None:
    """`{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON object) or
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. The schema is always
    enforced, `strict` or not."""
    at = where + "response_format"
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise LineError(f"{at}.json_schema must be an object with a `schema` object", at + ".json_schema")
        if spec.get("strict") not in (None, True, False):
            raise LineError(f"{at}.json_schema.strict must be true or false", at + ".json_schema.strict")
        return StructuredOutputsParams(json=spec.get("schema") or {})
    raise LineError(f"{at} must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}", at)


def _params(body: dict[str, Any], endpoint: Endpoint, where: str) -> tuple[SamplingParams, bool]:
    """SamplingParams from request fields (None = absent, as in OpenAI); True if max_tokens given."""
    _check_fields(body, endpoint, where)
    kw = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    for key in ("ignore_eos", "skip_special_tokens"):
        if key in kw and not isinstance(kw[key], bool):
            raise LineError(f"{where}{key} must be true or false", where + key)
    stop = kw.get("stop")
    if not (stop is None or isinstance(stop, str) or
            (isinstance(stop, list) and all(isinstance(x, str) for x in stop))):
        raise LineError(f"{where}stop must be a string or a list of strings", where + "stop")
    ids = kw.get("stop_token_ids")
    if ids is not None and not (isinstance(ids, list) and all(_is_int(t) for t in ids)):
        raise LineError(f"{where}stop_token_ids must be a list of integers", where + "stop_token_ids")
    mt, mct = body.get("max_tokens"), body.get("max_completion_tokens")
    if mt is not None and mct is not None and mt != mct:
        raise LineError(f"{where}max_tokens and max_completion_tokens disagree; give one", where + "max_tokens")
    given = mt is not None or mct is not None
    if given:
        kw["max_tokens"] = mct if mct is not None else mt
    elif endpoint == "completions":
        kw["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
    else:  # chat: until EOS or the context is full; the cap is set once the prompt is tokenized
        min_tokens = kw.get("min_tokens", 0)
        kw["max_tokens"] = max(1, min_tokens) if _is_int(min_tokens) else 1
    lp = _logprobs(body, endpoint, where)
    if lp is not None:
        kw["logprobs"] = lp
    if (bias := _logit_bias(body.get("logit_bias"), where)) is not None:
        kw["logit_bias"] = bias
    if (so := _response_format(body.get("response_format"), where)) is not None:
        kw["structured_outputs"] = so
    if endpoint == "completions" and body.get("echo") is not None and not isinstance(body["echo"], bool):
        raise LineError(f"{where}echo must be true or false", where + "echo")
    if endpoint == "completions" and body.get("echo") and lp is not None:
        kw["prompt_logprobs"] = lp  # echo returns the prompt's log-probs too
    try:
        return SamplingParams(**kw), given
    except (ValueError, TypeError) as e:
        first = str(e).removeprefix("invalid sampling parameters: ").split(" ", 1)[0]
        raise LineError(str(e), where + first if first in kw else None, "invalid_value") from e


def parse_object(obj: Any, line: int) -> BatchRequest:
    """One decoded JSON line -> BatchRequest; raises LineError saying what is wrong."""
    if not isinstance(obj, dict):
        raise LineError(f"a line must be a JSON object, got {type(obj).__name__}")
    if any(k in obj for k in ("body", "url", "method")):  # the OpenAI batch form
        missing = [k for k in ("custom_id", "method", "url", "body") if k not in obj]
        if missing:
            raise LineError(f"missing field(s): {', '.join(missing)}", missing[0], "missing_field")
        extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if extra:
            raise LineError(f"unrecognized field(s): {', '.join(extra)}", extra[0])
        cid, method, url, body = obj["custom_id"], obj["method"], obj["url"], obj["body"]
        if not isinstance(cid, str) or not cid:
            raise LineError("custom_id must be a non-empty string", "custom_id")
        if method != "POST":
            raise LineError(f"method must be \"POST\", got {json.dumps(method)}", "method")
        if url not in URLS:
            raise LineError(f"unsupported url {json.dumps(url)}; batchllm serves {' and '.join(URLS)}", "url",
                            "unsupported_url")
        if not isinstance(body, dict):
            raise LineError("body must be a JSON object", "body")
        endpoint, where = URLS[url], "body."
    else:
        body, where = obj, ""
        cid = obj.get("custom_id", str(line))
        if not isinstance(cid, str) or not cid:
            raise LineError("custom_id must be a non-empty string", "custom_id")
        if ("prompt" in obj) == ("messages" in obj):
            raise LineError("a line needs custom_id, method, url and body (OpenAI batch form), or exactly one "
                            "of prompt and messages", "body", "missing_field")
        endpoint = "completions" if "prompt" in obj else "chat"
        body = {k: v for k, v in obj.items() if k != "custom_id"}
    key = "prompt" if endpoint == "completions" else "messages"
    if body.get(key) is None:
        url = "/v1/completions" if key == "prompt" else "/v1/chat/completions"
        raise LineError(f"{where}{key} is required for {url}", where + key, "missing_field")
    params, given = _params(body, endpoint, where)
    if endpoint == "completions":
        return BatchRequest(line, cid, endpoint, params, prompts=_prompts(body["prompt"], where + "prompt"),
                            echo=bool(body.get("echo")))
    return BatchRequest(line, cid, endpoint, params, messages=_messages(body["messages"], where + "messages"),
                        max_tokens_given=given, template_options=_template_options(body, where))


def _custom_id_of(obj: Any, line: int) -> str | None:
    """The id an invalid line claims, when one can be read (for the error record)."""
    if isinstance(obj, dict):
        cid = obj.get("custom_id")
        if isinstance(cid, str) and cid:
            return cid
        if cid is None and not any(k in obj for k in ("body", "url", "method")):
            return str(line)
    return None


def parse_line(raw: bytes, line: int) -> Item:
    """One raw line (without its newline) -> BatchRequest or ErrorRecord."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return ErrorRecord(line, None, f"line {line}: not valid UTF-8 ({e.reason} at byte {e.start})", "invalid_json")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ErrorRecord(line, None, f"line {line}: not valid JSON: {e}", "invalid_json")
    try:
        return parse_object(obj, line)
    except LineError as e:
        return ErrorRecord(line, _custom_id_of(obj, line), f"line {line}: {e}", e.code, e.param)


def parse_file(path: str | Path) -> ParsedFile:
    """Parse a batch file (blank lines skipped); a custom_id seen on an earlier line makes the later
    line an error. Line numbers are 1-based and count blank lines."""
    path = Path(path)
    hasher = hashlib.sha256()
    items: list[Item] = []
    n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            hasher.update(raw)
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                items.append(parse_line(raw, n))
    seen: dict[str, int] = {}
    for k, item in enumerate(items):
        cid = item.custom_id
        if cid is None:
            continue
        if cid not in seen:
            seen[cid] = item.line
        elif isinstance(item, BatchRequest):
            items[k] = ErrorRecord(item.line, cid, f"line {item.line}: duplicate custom_id {cid!r} (first used "
                                   f"on line {seen[cid]})", "duplicate_custom_id", "custom_id")
        else:
            items[k] = dataclasses.replace(item, code="duplicate_custom_id",
                                           message=f"{item.message}; also a duplicate custom_id (line {seen[cid]})")
    return ParsedFile(items, hasher.hexdigest(), path.stat().st_size, n)
