"""vLLM's per-request logits processing: allowed token ids, bad words, logit bias, and the
presence, frequency and repetition penalties. Applied before temperature and the grammar mask,
only to the rows whose parameters ask for it."""

from __future__ import annotations

import torch

from batchllm.sequence import Sequence
from batchllm.tokenizer import Tokenizer


class LogitsProcessors:
    """Applies each row's processing; `bad_words` are tokenized once per distinct word list."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bad: dict[tuple[str, ...], list[list[int]]] = {}

    def bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids, alone and after a space (as vLLM: a word may start a text or
        follow one), without duplicates."""
        key = tuple(words)
        if key not in self._bad:
            seqs: list[list[int]] = []
            for w in words:
                for text in (w, " " + w.lstrip()):
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                    if ids and ids not in seqs:
                        seqs.append(ids)
            self._bad[key] = seqs
        return self._bad[key]

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`logits` (rows = `seqs`) after each row's processing; copied, in float32 on the
        processed rows, only when some row asks for processing."""
        rows = [i for i, s in enumerate(seqs) if s.params.processes_logits]
        if not rows:
            return logits
        out = logits.clone()
        for i in rows:
            out[i] = self.process_row(logits[i].float(), seqs[i]).to(out.dtype)
        return out

    def process_row(self, row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        """One row's logits (float32, not modified) after allowed ids, bad words, bias, penalties."""
        p = seq.params
        v = row.shape[-1]
        row = row.clone()
        if p.allowed_token_ids:
            keep = torch.zeros(v, dtype=torch.bool)
            keep[[t for t in p.allowed_token_ids if t < v]] = True
            row.masked_fill_(~keep, float("-inf"))
        if p.bad_words:
            out_ids = seq.output_token_ids
            for ids in self.bad_word_ids(p.bad_words):
                # The last token of a bad word is banned where the output ends with the rest of it.
                head = ids[:-1]
                if ids[-1] < v and (not head or out_ids[len(out_ids) - len(head):] == head):
                    row[ids[-1]] = float("-inf")
        if p.logit_bias:
            for t, b in p.logit_bias.items():
                if t < v:
                    row[t] += b
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted({t for t in seq.token_ids if t < v}), dtype=torch.long)
            if len(seen):
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out_ids = torch.tensor(seq.output_token_ids, dtype=torch.long)
            if len(out_ids):
                counts = torch.bincount(out_ids[out_ids < v], minlength=v).float()
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return row
