"""A `tokenizers` tokenizer built from a GGUF file's metadata (a GGUF carries no tokenizer.json).

Two kinds, by `tokenizer.ggml.model`:
- "gpt2": byte-level BPE. The tokens are already spelled in the byte-level alphabet; the text is
  split before BPE by the rule `tokenizer.ggml.pre` names (`PRE_TOKENIZERS`; a name not listed
  falls back to GPT-2's split, with a warning, as the split the merges most often come from).
- "llama": SentencePiece-style BPE with byte fallback: spaces become "▁" (with a leading one when
  `tokenizer.ggml.add_space_prefix`, default true, added even before a leading space, as
  SentencePiece and llama.cpp do: " Hi" is "▁", "▁Hi"), unknown characters become <0xXX> byte tokens,
  and the merges are the file's or, when it has none, derived from the token scores (a piece made
  of two vocabulary pieces merges with the priority of its score).
Tokens marked control (type 3) are special tokens, matched whole and skipped on decode; tokens
marked user-defined (type 4) are matched whole too. BOS/EOS are added as the file's
`add_bos_token`/`add_eos_token` say (llama-kind files without the flag add BOS, as llama.cpp does).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from batchllm.models.gguf_file import metadata

_CONTROL, _USER_DEFINED = 3, 4

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def _split(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


# `tokenizer.ggml.pre` -> (pre-tokenizer factory, NFC normalizer?, ignore_merges?). The names are
# llama.cpp's; each entry is the split that model family's own tokenizer.json applies.
PRE_TOKENIZERS: dict[str, tuple[Any, bool, bool]] = {
    **{name: (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False, False)
       for name in ("default", "gpt-2", "gpt2")},
    **{name: (_digits_then_gpt2, False, False) for name in ("smollm", "starcoder", "refact")},
    **{name: (lambda: _split(_LLAMA3_SPLIT), False, True)
       for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")},
    **{name: (lambda: _split(_QWEN2_SPLIT), True, False) for name in ("qwen2", "deepseek-r1-qwen")},
}


@dataclass
class GGUFTokenizer:
    """What tokenizer.py needs: the tokenizer, special token texts, EOS ids and chat template."""

    tokenizer: Tokenizer
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    chat_template: str | None


def load_gguf_tokenizer(path: str | Path) -> GGUFTokenizer:
    md = metadata(path)
    kind = md.get("tokenizer.ggml.model")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level(md, tokens)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece(md, tokens)
        add_bos_default = True
    else:
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pre = [f"{bos}:0"] if add_bos else []
        post = [f"{eos}:0"] if add_eos else []
        ids = {t: tokens.index(t) for t in (bos if add_bos else None, eos if add_eos else None) if t}
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(pre + ["$A:0"] + post), pair=" ".join(pre + ["$A:0"] + post + pre + ["$B:1"] + post),
            special_tokens=list(ids.items()))
    eos_ids = [int(md[f"tokenizer.ggml.{k}"]) for k in ("eos_token_id", "eot_token_id", "eom_token_id")
               if md.get(f"tokenizer.ggml.{k}") is not None]
    return GGUFTokenizer(tok, bos, eos, sorted(set(eos_ids)), md.get("tokenizer.chat_template"))


def _byte_level(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is unknown to batchllm; splitting text as GPT-2 does "
                      f"(known: {', '.join(sorted(PRE_TOKENIZERS))})", stacklevel=3)
    make_pre, nfc, ignore_merges = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["default"])
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in md:
        merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, md.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
                                     md.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two vocabulary pieces, best-scored token first (for
    equal scores, in vocabulary order of the pair): the order SentencePiece BPE merges in."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for t, score, ty in zip(tokens, scores, types):
        if ty != 1 or len(t) < 2:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                found.append((-score, vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]
