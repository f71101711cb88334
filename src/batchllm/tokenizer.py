"""Tokenizer: tokenizer.json, special tokens and chat template from tokenizer_config.json, EOS ids
(or all of these from a GGUF file's metadata, gguf_tokenizer.py)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from batchllm.gguf_tokenizer import load_gguf_tokenizer
from batchllm.models.gguf_file import is_gguf


def _token_text(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Encodes prompts, renders chat conversations and decodes outputs for one model folder."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if is_gguf(path):
            g = load_gguf_tokenizer(path)
            self._tok, self.bos_token, self.eos_token = g.tokenizer, g.bos_token, g.eos_token
            self._set_template(g.chat_template)
            self.eos_token_ids = g.eos_token_ids
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
            return
        self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        template_file = path / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        self._set_template(template)
        self.eos_token_ids = self._eos_ids(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._compiled: dict[str, jinja2.Template] = {}
        decoder = self._tok.decoder
        self._bytes_of = _token_bytes_rule(json.loads(decoder.__getstate__()) if decoder is not None else None)
        # Added tokens (special ones included) are stored as their text, not in the byte alphabet.
        self._added = set(self._tok.get_added_tokens_decoder())
        self._token_bytes: dict[int, bytes] = {}

    def _set_template(self, template: str | None) -> None:
        self.chat_template: str | None = template
        self._template = _compile(template) if template else None

    def _eos_ids(self, path: Path) -> list[int]:
        ids: list[int] = []
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not ids and self.eos_token is not None:
            tid = self._tok.token_to_id(self.eos_token)
            ids = [tid] if tid is not None else []
        return [int(i) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar libraries build their vocabulary from)."""
        return self._tok.to_str()

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for: a token that holds part of a UTF-8 character
        gives just its bytes, so consecutive tokens' bytes join to the text's UTF-8."""
        b = self._token_bytes.get(token_id)
        if b is None:
            piece = self._tok.id_to_token(token_id)
            if piece is None:
                b = b""
            elif token_id in self._added:
                b = piece.encode()
            else:
                b = self._bytes_of(piece)
            self._token_bytes[token_id] = b
        return b

    def token_text(self, token_id: int) -> str:
        """A token's text on its own; a token holding part of a UTF-8 character is written as
        "bytes:" and its bytes in \\xNN escapes (as OpenAI writes such tokens)."""
        b = self.token_bytes(token_id)
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)
        return self.decode([token_id], skip_special_tokens=False)

    def token_pieces(self, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
        """The text each token adds to `decode(ids)`, so the pieces join to it: a token that
        completes a character split over several tokens carries the whole character, the ones
        before it "". Decodes a short window per token (as streaming detokenizers do)."""
        pieces: list[str] = []
        start = read = 0  # the window ids[start:read] is already emitted
        for i in range(len(ids)):
            before = self.decode(ids[start:read], skip_special_tokens)
            now = self.decode(ids[start:i + 1], skip_special_tokens)
            if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
                pieces.append(now[len(before):])
                start, read = read, i + 1
            else:
                pieces.append("")
        if pieces and read < len(ids):  # a held tail (e.g. an unfinished character) goes to the last token
            before = self.decode(ids[start:read], skip_special_tokens)
            pieces[-1] += self.decode(ids[start:], skip_special_tokens)[len(before):]
        return pieces

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            **template_kwargs: Any) -> str:
        """Render a conversation with the model's chat template (or `chat_template`), as
        transformers renders it. Content given as OpenAI content parts is joined (text parts
        only, with newlines). `continue_final_message` leaves the last message open, so the
        model continues it; `template_kwargs` reach the template (e.g. Qwen3's enable_thinking)."""
        if chat_template is not None:
            if chat_template not in self._compiled:
                self._compiled[chat_template] = _compile(chat_template)
            template = self._compiled[chat_template]
        elif self._template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json or chat_template.jinja); "
                             "pass chat_template")
        else:
            template = self._template
        if add_generation_prompt and continue_final_message:
            raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
        messages = text_messages(messages)
        if not messages:
            raise ValueError("a conversation needs at least one message")
        reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & set(template_kwargs)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}")
        text = template.render(**{"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                                  **template_kwargs, "messages": messages,
                                  "add_generation_prompt": add_generation_prompt})
        if continue_final_message:
            final = messages[-1]["content"]
            at = text.rfind(final) if final else -1
            if at < 0:
                raise ValueError("continue_final_message: the final message's text was not found in the "
                                 "rendered conversation (is it empty?)")
            text = text[:at + len(final)]
        return text

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        """Token ids of a rendered conversation (the template writes its own special tokens)."""
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def join_text_parts(content: Any, where: str = "content") -> Any:
    """OpenAI content parts ([{"type": "text", "text": ...}, ...]) as one string, the texts joined
    with newlines (as vLLM does); other content is returned as it is. ValueError for non-text parts."""
    if not isinstance(content, list):
        return content
    texts = []
    for j, part in enumerate(content):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"{where}[{j}]: only text content parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def text_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with content-part lists joined into strings (`join_text_parts`)."""
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{k}] must be a dict with role and content, got {type(m).__name__}")
        content = m.get("content")
        out.append({**m, "content": join_text_parts(content, f"messages[{k}].content")}
                   if isinstance(content, list) else m)
    return out


def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte value has one printable character. Printable
    Latin-1 bytes stand for themselves; the others map, in byte order, to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_types(decoder: Any) -> list[str]:
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence":
        return [t for d in decoder.get("decoders", []) for t in _decoder_types(d)]
    return [str(decoder.get("type"))]


def _token_bytes_rule(decoder: Any) -> Any:
    """How a vocabulary entry becomes bytes, from tokenizer.json's decoder: byte-level BPE maps
    each character back to its byte; SentencePiece-style vocabularies write "▁" for a space
    and "<0xNN>" for raw bytes; anything else is the entry's UTF-8."""
    types = _decoder_types(decoder)
    if "ByteLevel" in types:
        table = _byte_level_table()
        return lambda piece: bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
    if "ByteFallback" in types or "Metaspace" in types or "Replace" in types:
        def sentencepiece(piece: str) -> bytes:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            return piece.replace("\u2581", " ").encode()
        return sentencepiece
    return lambda piece: piece.encode()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    return env.from_string(template)
