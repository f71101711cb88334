"""MaximizeReuse -> groups -> materialise -> order -> Plan (docs/design.md §2.2, §2.3, §3.2).

Pure data: no torch. A Plan lists groups in execution order; each group is a shared prefix
(computed once) plus each member's own part (computed per member), or one unshared sequence.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, NamedTuple

from .prefix_tree import Prompt, PrefixTree


class PrefixGroup(NamedTuple):
    """A depth-1 node after MaximizeReuse: ``prefix_len`` tokens shared by ``members``."""

    prefix_len: int
    members: tuple[int, ...]


def maximize_reuse(tree: PrefixTree) -> list[PrefixGroup]:
    """Flatten ``tree`` into single-level groups (not materialised; the tree is untouched).

    Bottom-up, for child c of v and grandchild g under c: hoist g (g <- c||g, sibling of c)
    when (w(g)-1)*|g| - |c| > 0; merge c into its child when it is left with exactly one.
    """
    nodes = tree.nodes
    ln = [n.edge_len for n in nodes]  # edge length to the current parent
    w = [n.count for n in nodes]  # sequences below
    kids = [[c.id for c in n.children.values()] for n in nodes]
    # NOTE: explicit post-order stack: trees can be thousands of levels deep.
    stack: list[tuple[int, bool]] = [(tree.root.id, False)]
    while stack:
        v, ready = stack.pop()
        if not ready:
            stack.append((v, True))
            stack.extend((c, False) for c in kids[v])
            continue
        new: list[int] = []
        for c in kids[v]:
            keep: list[int] = []
            for g in kids[c]:
                if (w[g] - 1) * ln[g] - ln[c] > 0:
                    ln[g] += ln[c]
                    w[c] -= w[g]
                    new.append(g)
                else:
                    keep.append(g)
            kids[c] = keep
            if len(keep) == 1:  # merge c into its only child (c itself holds no sequences)
                ln[keep[0]] += ln[c]
                new.append(keep[0])
            elif keep or nodes[c].seqs:
                new.append(c)  # a node left with no children and no sequences vanishes
        kids[v] = new
    groups: list[PrefixGroup] = []
    for d in kids[tree.root.id]:
        members: list[int] = []
        todo = [d]
        while todo:
            x = todo.pop()
            members.extend(nodes[x].seqs)
            todo.extend(kids[x])
        groups.append(PrefixGroup(ln[d], tuple(sorted(members))))
    return groups


@dataclass(frozen=True)
class Group:
    """Members (ascending sequence indices) share ``prefix_len`` tokens; ``own_lens[k]`` is
    member k's own part (prompt length - prefix_len, >= 1; empty only if built by hand).
    Unshared: one member, prefix_len 0, own part = the whole prompt."""

    prefix_len: int
    members: tuple[int, ...]
    own_lens: tuple[int, ...] = ()

    @property
    def shared(self) -> bool:
        return len(self.members) >= 2 and self.prefix_len > 0

    @property
    def prefill_tokens(self) -> int:
        """Tokens the engine prefills for this group: the prefix once plus every own part."""
        return self.prefix_len + sum(self.own_lens)


@dataclass(frozen=True)
class PlanStats:
    logical_prefill_tokens: int
    planned_prefill_tokens: int
    multilevel_optimum_tokens: int
    saving: float
    num_groups: int
    num_shared_groups: int
    mean_share_degree: float
    mean_prefix_len: float
    mean_suffix_len: float
    share_degree_histogram: dict[int, int]  # members per group -> groups; 1 = unshared


@dataclass
class Plan:
    """Groups in execution order. ``partial_block``: how a prefix not ending on a block
    boundary is handled ("copy": its last partial block's KV is copied to every member)."""

    groups: tuple[Group, ...]
    block_size: int
    num_sequences: int
    stats: PlanStats
    partial_block: Literal["copy", "recompute"] = "copy"
    _where: dict[int, int] | None = field(default=None, init=False, repr=False, compare=False)

    def group_index(self, seq_index: int) -> int:
        """Position in ``groups`` of the group holding sequence ``seq_index`` (KeyError if none)."""
        # NOTE: built lazily once; treat ``groups`` as read-only after the first call.
        if self._where is None:
            self._where = {m: k for k, g in enumerate(self.groups) for m in g.members}
        return self._where[seq_index]

    def group_of(self, seq_index: int) -> Group:
        """The group that holds sequence ``seq_index`` (KeyError if none)."""
        return self.groups[self.group_index(seq_index)]

    def to_json(self) -> str:
        groups = [
            {"prefix_len": g.prefix_len, "members": g.members, "own_lens": g.own_lens} for g in self.groups
        ]
        d = {
            "groups": groups,
            "block_size": self.block_size,
            "num_sequences": self.num_sequences,
            "stats": asdict(self.stats),
            "partial_block": self.partial_block,
        }
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str) -> Plan:
        d = json.loads(s)
        st = d["stats"]
        st["share_degree_histogram"] = {int(k): v for k, v in st["share_degree_histogram"].items()}
        groups = tuple(
            Group(g["prefix_len"], tuple(g["members"]), tuple(g["own_lens"])) for g in d["groups"]
        )
        return cls(groups, d["block_size"], d["num_sequences"], PlanStats(**st), d["partial_block"])

    def summary(self) -> str:
        s = self.stats
        logical, optimum = s.logical_prefill_tokens, s.multilevel_optimum_tokens
        opt = 1 - optimum / logical if logical else 0.0
        lines = [
            f"Plan: {self.num_sequences} sequences in {s.num_groups} groups, {s.num_shared_groups} shared"
            f" (mean degree {s.mean_share_degree:.1f}); block {self.block_size}, {self.partial_block}",
            f"Prefill tokens: logical {logical:,}, planned {s.planned_prefill_tokens:,}"
            f" (saving {s.saving:.1%}), multi-level optimum {optimum:,} (saving {opt:.1%})",
            f"Mean shared prefix {s.mean_prefix_len:.1f} tokens, mean own part {s.mean_suffix_len:.1f} tokens",
            "Share degree (members per group: groups):",
        ]
        # NOTE: power-of-two buckets keep the histogram a few lines for any workload.
        buckets: Counter[int] = Counter()
        for deg, n in s.share_degree_histogram.items():
            buckets[(deg - 1).bit_length()] += n
        top = max(buckets.values(), default=1)
        for b in sorted(buckets):
            lo, hi = (1, 1) if b == 0 else (2 ** (b - 1) + 1, 2**b)
            label = str(lo) if lo == hi else f"{lo}-{hi}"
            lines.append(f"  {label:>11} {buckets[b]:>8}  {'#' * max(1, round(30 * buckets[b] / top))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def build_plan(
    prompts: Sequence[Prompt],
    *,
    block_size: int = 16,
    expected_output_tokens: Sequence[int] | None = None,
    partial_block: Literal["copy", "recompute"] = "copy",
    order: Literal["decode-ratio", "input"] = "decode-ratio",
    global_groups: bool = True,
) -> Plan:
    """Plan a batch: every sequence in exactly one group, groups in execution order.

    ``expected_output_tokens[i]`` is ô for sequence i (default 1 each); ``order`` picks
    decode-ratio-first (docs/design.md §3.2) or input order; ``global_groups=False`` disables sharing.
    Raises ValueError on bad arguments or empty prompts.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if partial_block not in ("copy", "recompute"):
        raise ValueError(f"partial_block must be 'copy' or 'recompute', got {partial_block!r}")
    if order not in ("decode-ratio", "input"):
        raise ValueError(f"order must be 'decode-ratio' or 'input', got {order!r}")
    n = len(prompts)
    est = [1] * n if expected_output_tokens is None else list(expected_output_tokens)
    if len(est) != n:
        raise ValueError(f"expected_output_tokens has {len(est)} entries for {n} prompts")
    tree = PrefixTree(prompts)
    lens = tree.lengths
    raw = maximize_reuse(tree) if global_groups else [PrefixGroup(0, (i,)) for i in range(n)]

    groups: list[Group] = []
    for prefix, members in raw:
        # NOTE: every member keeps >= 1 own token to sample from (covers duplicates and n>1).
        prefix = min(prefix, min(lens[m] for m in members) - 1)
        if partial_block == "recompute":
            prefix -= prefix % block_size
        if len(members) >= 2 and prefix >= block_size:
            groups.append(Group(prefix, members, tuple(lens[m] - prefix for m in members)))
        else:
            groups.extend(Group(0, (m,), (lens[m],)) for m in members)

    if order == "input":
        groups.sort(key=lambda g: g.members[0])
    else:
        groups.sort(key=lambda g: (-decode_ratio(g, est), -g.prefix_len, g.members[0]))

    shared = [g for g in groups if g.shared]
    logical = sum(lens)
    planned = sum(g.prefill_tokens for g in groups)
    stats = PlanStats(
        logical_prefill_tokens=logical,
        planned_prefill_tokens=planned,
        multilevel_optimum_tokens=tree.multilevel_optimum_tokens,
        saving=1 - planned / logical if logical else 0.0,
        num_groups=len(groups),
        num_shared_groups=len(shared),
        mean_share_degree=sum(len(g.members) for g in shared) / len(shared) if shared else 0.0,
        mean_prefix_len=sum(g.prefix_len for g in shared) / len(shared) if shared else 0.0,
        mean_suffix_len=sum(sum(g.own_lens) for g in groups) / n if n else 0.0,
        share_degree_histogram=dict(sorted(Counter(len(g.members) for g in groups).items())),
    )
    return Plan(tuple(groups), block_size, n, stats, partial_block)


def decode_ratio(group: Group, expected_output_tokens: Sequence[float]) -> float:
    """R = Σ_members ô / (prefix_len + Σ own_len): expected decode per prefill token (docs/design.md §3.2)."""
    # NOTE: one correctly rounded int division, so mathematically equal R compare equal.
    return sum(expected_output_tokens[m] for m in group.members) / group.prefill_tokens
