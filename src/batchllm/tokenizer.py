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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render a conversation with the model's chat template (as transformers renders it)."""
        if self._template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a rendered conversation (the template writes its own special tokens)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    return env.from_string(template)
