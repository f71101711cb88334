"""The attention plan of one step: which query rows attend which keys, and which results are merged.

Pure data, built once per step from `AttentionMetadata` and read by every layer's executor call,
by the cost model and by the share-or-not decision. A plan says what is computed, not how: an
executor may batch its parts as it likes, as long as every query row gets the attention the plan
describes.

Every query row attends its own sequence's keys causally. A sequence's keys are split in two only
where its group's prefix is shared: the prefix keys (attended once per group, by all members'
rows together) and the sequence's own keys after them; the row's result is the log-sum-exp merge
of the two parts. The unshared case is the plan with no groups.

Sliding windows. A plan for the layers of one window size (`AttentionPlan.window`) limits every
query row from below as well: the row at position p sees keys p - window + 1 .. p only. Keys are
counted in each chunk's own coordinates, so the lower bound of a row whose own keys end at
`limit` is `limit - window` (clamped at 0), the same rule for every chunk; a sequence's table is
cut at the first block that any of its rows still sees, so the keys before it are never read. A
group member shares its prefix on such a plan only while its whole context fits in the window
(context <= window): then every one of its rows sees the whole prefix, the prefix pass needs no
lower bound, and its own rows' lower bounds fall at or below 0. Members past that attend their
windowed context on their own, exactly like unshared sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from batchllm.attention.metadata import AttentionMetadata


class Share(Enum):
    """Which queries of prefix-sharing group members attend their group's prefix once per group."""

    NONE = "none"  # every query attends its whole context on its own (the reference path)
    DECODES = "decodes"  # members' decode queries; their prefill chunks attend their whole context
    ALL = "all"  # members' decode queries and prefill chunks


@dataclass(frozen=True)
class Chunks:
    """Query chunks, each over its sequence's own keys.

    Chunk c is the `num_rows[c]` query rows from flat row `rows[c]`, over the first `key_lens[c]`
    keys of block table `tables[c]` (trimmed to those keys). Its queries are the last positions of
    those keys, so query j sees keys 0 .. `first_limits()[c]` + j - 1 (causal; on a windowed plan
    only the last `window` of those). The lists are not modified after the plan is built.
    """

    rows: list[int]
    num_rows: list[int]
    tables: list[list[int]]
    key_lens: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def first_limits(self) -> list[int]:
        """Keys the first query of each chunk sees (the next query one more)."""
        return [t - n + 1 for t, n in zip(self.key_lens, self.num_rows)]


@dataclass(frozen=True)
class Group:
    """A prefix-sharing group of this step: the first `num_keys` keys of block table `blocks`
    precede every member's own keys, so each member query sees all of them. The members are
    `decodes` (indices into `AttentionPlan.decodes`) and `prefills` (into `AttentionPlan.prefills`);
    each of their rows is the log-sum-exp merge of its pass over the prefix and its chunk's pass
    over its own keys."""

    blocks: list[int]
    num_keys: int
    decodes: list[int]
    prefills: list[int]

    @property
    def num_members(self) -> int:
        return len(self.decodes) + len(self.prefills)


@dataclass(frozen=True)
class AttentionPlan:
    """Everything an executor needs to run one step's attention in every layer.

    `decodes` are the one-query chunks, `prefills` those of more; together they cover the step's
    `num_tokens` flat rows exactly once. `share` is what the plan was built to share; `groups`
    lists the groups that share something this step (possibly none). `window`: the sliding window
    of the layers this plan is for (None: global attention), see the module docstring.
    """

    share: Share
    num_tokens: int
    block_size: int
    decodes: Chunks
    prefills: Chunks
    groups: list[Group]
    window: int | None = None

    @property
    def prefix_shared(self) -> bool:
        """True for the prefix-shared path (what `RunStats.prefix_shared_attention_steps` counts)."""
        return self.share is not Share.NONE

    @property
    def merges_decodes(self) -> bool:
        """Whether some decode rows are merged with a prefix pass (then they need their lse)."""
        return any(g.decodes for g in self.groups)

    @property
    def merges_prefills(self) -> bool:
        """Whether some prefill rows are merged with a prefix pass (then they need their lse)."""
        return any(g.prefills for g in self.groups)


def build_plan(meta: AttentionMetadata, share: Share, window: int | None = None) -> AttentionPlan:
    """The plan of the step `meta` describes, sharing group prefixes as `share` says, for layers
    with sliding window `window` (None: global attention).

    A sequence shares when it belongs to a group (`group_ids[i] >= 0`) with `shared_lens[i] > 0`,
    `share` covers its kind of query and (with a window) its context fits in the window. Groups
    are keyed by their prefix's physical blocks, not by group id, so a wrong group id can never
    mix two prefixes' KV.
    """
    bs, n = meta.block_size, meta.num_seqs
    starts, lens, ctxs, tables = meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables
    shared = [0] * n  # keys of each sequence in its group's shared prefix (0: not shared)
    members: dict[tuple[int, ...], list[int]] = {}  # prefix blocks -> member sequences
    if share is not Share.NONE:
        for i, (gid, sl) in enumerate(zip(meta.group_ids, meta.shared_lens)):
            if gid >= 0 and sl > 0 and (share is Share.ALL or lens[i] == 1) and (window is None or ctxs[i] <= window):
                members.setdefault(tuple(tables[i][: sl // bs]), []).append(i)
                shared[i] = sl
    if window is not None:  # unshared: skip the whole blocks no row sees (the first row sees ctx - len - window + 1 on)
        shared = [s if s else max(0, c - q + 1 - window) // bs * bs for s, c, q in zip(shared, ctxs, lens)]
    # own keys: positions shared .. ctx (a table is cut only where it holds more than that)
    own = [t if s == 0 and len(t) == -(-c // bs) else t[s // bs: -(-c // bs)]
           for t, s, c in zip(tables, shared, ctxs)]
    d = [i for i in range(n) if lens[i] == 1]
    p = [i for i in range(n) if lens[i] > 1]
    decodes = Chunks([starts[i] for i in d], [1] * len(d), [own[i] for i in d], [ctxs[i] - shared[i] for i in d])
    prefills = Chunks([starts[i] for i in p], [lens[i] for i in p], [own[i] for i in p],
                      [ctxs[i] - shared[i] for i in p])
    groups = []
    if members:
        index = [0] * n  # each sequence's position among the decodes or among the prefills
        for j, i in enumerate(d):
            index[i] = j
        for j, i in enumerate(p):
            index[i] = j
        groups = [Group(list(key), len(key) * bs, [index[i] for i in m if lens[i] == 1],
                        [index[i] for i in m if lens[i] > 1]) for key, m in members.items()]
    return AttentionPlan(share, meta.num_tokens, bs, decodes, prefills, groups, window)
