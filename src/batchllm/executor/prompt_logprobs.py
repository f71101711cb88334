"""Prompt log-probabilities (`SamplingParams.prompt_logprobs`), exact under prefix sharing.

The log-prob of prompt token t comes from the logits of position t - 1. A member of a shared
group never computes its group's prefix positions: the prefix pseudo-sequence does, once, and
computes logits for them only when some member asks for prompt log-probs. Its positions before
the last hold the same target token for every member (the prefix is common); its last position
predicts each member's first own token, so that row is read once per asking member.

Results are stored per target position as the chunks are computed: a sequence that is
preempted and recomputed writes the same values again over the same positions, so nothing is
lost or duplicated. The runner asks `rows` which positions of a scheduled chunk need logits and
hands the logits of those rows to `record`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchllm.outputs import Logprob
from batchllm.sequence import Sequence


@dataclass
class Entry:
    """One prompt position: its token's log-prob and rank (1 + the number of strictly more likely
    tokens, as the sampler ranks), and the top-k (token ids, log-probs)."""

    logprob: float
    rank: int
    top_ids: list[int]
    top_lps: list[float]


class PromptLogprobs:
    """The prompt log-probs of one run's sequences. `first[seq_id]` is the first prompt position
    a sequence wants (1 for all of them; `LLM.loglikelihood` asks for the continuation only)."""

    def __init__(self, seqs: list[Sequence], first: dict[int, int] | None = None) -> None:
        first = first or {}
        self._first = {s.seq_id: max(1, first.get(s.seq_id, 1)) for s in seqs if s.params.prompt_logprobs is not None}
        self._k = {s.seq_id: s.params.prompt_logprobs for s in seqs if s.params.prompt_logprobs is not None}
        # group id -> the members that want prompt log-probs (read when the group's prefix runs)
        self._members: dict[int, list[Sequence]] = {}
        for s in seqs:
            if s.seq_id in self._k and s.group_id >= 0:
                self._members.setdefault(s.group_id, []).append(s)
        self._entries: dict[int, dict[int, Entry]] = {}  # seq_id -> target position -> Entry
        self._prefix_of: dict[int, int] = {}  # group id -> its prefix sequence's id

    @property
    def active(self) -> bool:
        return bool(self._k)

    def _want(self, seq: Sequence) -> tuple[int, int, int] | None:
        """(first target, last target, k) that `seq`'s computed positions must provide, or None.
        A prefix provides targets up to its length (the last one is each member's first own
        token); any other sequence up to its last prompt token."""
        if seq.is_prefix:
            members = self._members.get(seq.group_id)
            if not members:
                return None
            self._prefix_of[seq.group_id] = seq.seq_id
            return (min(self._first[m.seq_id] for m in members), seq.num_tokens,
                    max(self._k[m.seq_id] for m in members))
        if seq.seq_id not in self._k:
            return None
        return self._first[seq.seq_id], seq.num_prompt_tokens - 1, self._k[seq.seq_id]

    def rows(self, seq: Sequence, start: int, n: int) -> range:
        """Positions in [start, start + n) whose logits `seq` needs for its prompt log-probs."""
        want = self._want(seq)
        if want is None:
            return range(0)
        lo, hi, _ = want  # targets lo..hi come from positions lo-1..hi-1
        return range(max(start, lo - 1), min(start + n, hi))

    def record(self, logits: torch.Tensor, spans: list[tuple[Sequence, range]]) -> None:
        """Store the entries of the positions in `spans` (in order, one logits row per position)."""
        if not spans:
            return
        logp = torch.log_softmax(logits.float(), dim=-1)
        wants = [self._want(s) for s, _ in spans]
        k = max(w[2] for w in wants)  # type: ignore[index]
        top_v, top_i = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
        top_v, top_i = top_v.tolist(), top_i.tolist()
        # Each row's target token (the next prompt token; for a prefix's last position, where
        # members differ, each member's token is looked up below), ranked in one pass.
        rows = [(seq, w[2], p) for (seq, positions), w in zip(spans, wants) for p in positions]  # type: ignore[index]
        targets = torch.tensor([seq.token_ids[p + 1] if p + 1 < seq.num_tokens else 0 for seq, _, p in rows])
        chosen = logp.gather(1, targets[:, None])
        ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
        chosen = chosen[:, 0].tolist()
        for row, (seq, kk, p) in enumerate(rows):
            t = p + 1
            if t < seq.num_tokens:
                self._entries.setdefault(seq.seq_id, {})[t] = Entry(chosen[row], ranks[row], top_i[row][:kk],
                                                                    top_v[row][:kk])
                continue
            for m in self._members[seq.group_id]:  # a prefix's last position: each member's first own token
                lp = logp[row, m.token_ids[t]]
                km = self._k[m.seq_id]
                self._entries.setdefault(m.seq_id, {})[t] = Entry(
                    float(lp), int((logp[row] > lp).sum()) + 1, top_i[row][:km], top_v[row][:km])

    def entries(self, seq: Sequence) -> list[Entry | None]:
        """Per prompt position 0..L-1: its Entry (None for position 0 and positions not asked for).
        A member's prefix positions come from its group's prefix pass."""
        own = self._entries.get(seq.seq_id, {})
        shared = self._entries.get(self._prefix_of.get(seq.group_id, -1), {})
        out: list[Entry | None] = [None]
        for t in range(1, seq.num_prompt_tokens):
            out.append(own.get(t) or shared.get(t))
        return out

    def take(self, seq: Sequence) -> list[dict[int, Logprob] | None] | None:
        """vLLM's `RequestOutput.prompt_logprobs` for finished `seq` (None if it did not ask), once:
        None for the first position, then {token id: Logprob} holding the prompt token and the top k."""
        if seq.seq_id not in self._k:
            return None
        k = self._k[seq.seq_id]
        out: list[dict[int, Logprob] | None] = []
        for t, e in enumerate(self.entries(seq)):
            if e is None:
                out.append(None)
                continue
            # NOTE: a group prefix's entries hold the largest k any member asked for
            d = {tid: Logprob(lp, r + 1) for r, (tid, lp) in enumerate(zip(e.top_ids[:k], e.top_lps[:k]))}
            tok = seq.token_ids[t]
            if tok not in d:
                d[tok] = Logprob(e.logprob, e.rank)
            out.append(d)
        # NOTE: its own entries are read once; a group prefix's stay for the other members.
        self._entries.pop(seq.seq_id, None)
        return out
