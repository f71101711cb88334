"""Token-level compact prefix tree (radix tree) over all prompts (docs/design.md §2.1).

Pure data: numpy only, no torch. Built from the lexicographically sorted prompts and the
longest-common-prefix (LCP) array of sorted neighbours with one stack pass (the classic
suffix-array -> suffix-tree construction), so the only per-token work is vectorised numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Prompt = Sequence[int] | np.ndarray

#: Child key of a zero-length leaf edge: the prompt ends exactly at the parent node.
END = None


@dataclass(slots=True, eq=False)
class TrieNode:
    """One node. Its edge is ``prompts[rep][start:depth]``; ``depth`` is the token depth.

    ``seqs`` (non-empty only on leaves) holds the sequence indices of every prompt that ends
    here; identical prompts share one leaf. ``count`` is the number of sequences below.
    """

    id: int
    rep: int
    start: int
    depth: int
    children: dict[int | None, TrieNode] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)
    count: int = 0

    @property
    def edge_len(self) -> int:
        return self.depth - self.start


def _sort_keys(prompts: Sequence[Prompt]) -> tuple[list[bytes], np.dtype]:
    """Byte strings whose bytewise order is the prompts' lexicographic token order."""
    arrays = [np.asarray(p) for p in prompts]
    if any(a.ndim != 1 or a.dtype.kind not in "iu" for a in arrays):
        raise ValueError("prompts must be 1-D sequences of integer token ids")
    lo = min((int(a.min()) for a in arrays if a.size), default=0)
    hi = max((int(a.max()) for a in arrays if a.size), default=0)
    shift = min(lo, 0)
    span = hi - shift
    # NOTE: big-endian unsigned ints compare like the tokens under memcmp, and a proper prefix
    # sorts first; the narrowest width that fits halves (or quarters) sort and LCP memory.
    width = next(w for w in (1, 2, 4, 8) if span < 256**w)
    dt = np.dtype(f">u{width}")
    if shift:
        return [(a.astype(np.int64) - shift).astype(dt).tobytes() for a in arrays], dt
    return [a.astype(dt).tobytes() for a in arrays], dt


class PrefixTree:
    """Compact prefix tree over ``prompts``; node 0 is the root (empty edge).

    Contract: prompts are non-empty 1-D integer sequences (lists or numpy arrays); raises
    ValueError otherwise. The tree keeps a reference to ``prompts`` (edges are slices of
    them), so do not mutate them afterwards.
    """

    def __init__(self, prompts: Sequence[Prompt]) -> None:
        self.prompts: Sequence[Prompt] = prompts
        self.lengths: list[int] = [len(p) for p in prompts]
        if not all(self.lengths):
            raise ValueError("every prompt needs at least one token")
        self.nodes: list[TrieNode] = []
        self.root: TrieNode = self._new(rep=0, start=0, depth=0)
        self._build()
        # Tokens on all edges = number of distinct non-empty prompt prefixes (docs/design.md §2.1).
        self.multilevel_optimum_tokens: int = sum(n.edge_len for n in self.nodes)

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    def _new(self, rep: int, start: int, depth: int) -> TrieNode:
        node = TrieNode(len(self.nodes), rep, start, depth)
        self.nodes.append(node)
        return node

    def _key(self, seq: int, pos: int) -> int | None:
        """Child key of the edge of ``seq`` starting at token ``pos``."""
        return int(self.prompts[seq][pos]) if pos < self.lengths[seq] else END

    def edge_tokens(self, node: TrieNode) -> list[int]:
        return [int(t) for t in self.prompts[node.rep][node.start : node.depth]]

    def _build(self) -> None:
        keys, dt = _sort_keys(self.prompts)
        order = sorted(range(len(keys)), key=keys.__getitem__)
        stack: list[TrieNode] = [self.root]
        prev: np.ndarray | None = None

        def close(node: TrieNode) -> None:
            # NOTE: a node popped off the rightmost path is final (later prompts sort after
            # its whole subtree), so its count can be summed here; no second traversal.
            node.count = len(node.seqs) + sum(c.count for c in node.children.values())

        for seq in order:
            cur = np.frombuffer(keys[seq], dtype=dt)
            n = len(cur)
            if prev is None:
                lcp = 0
            else:
                m = min(n, len(prev))
                diff = np.flatnonzero(cur[:m] != prev[:m])
                lcp = int(diff[0]) if diff.size else m
            prev = cur
            last: TrieNode | None = None
            while stack[-1].depth > lcp:
                last = stack.pop()
                close(last)
            top = stack[-1]
            if top.depth < lcp:
                # Split the edge of `last` at depth lcp (last was top's rightmost child).
                assert last is not None
                mid = self._new(rep=last.rep, start=top.depth, depth=lcp)
                top.children[self._key(last.rep, top.depth)] = mid  # same key, same slot
                last.start = lcp
                mid.children[self._key(last.rep, lcp)] = last
                stack.append(mid)
                top = mid
            elif top.depth == n and top.seqs and not top.children:
                top.seqs.append(seq)  # identical to the previous prompt
                continue
            if top.seqs:
                # The previous prompt ends at `top`, a proper prefix of this one: move its
                # sequences to a zero-length END leaf so that leaves alone carry sequences.
                end = self._new(rep=top.rep, start=top.depth, depth=top.depth)
                end.seqs, top.seqs = top.seqs, []
                top.children[END] = end
                close(end)
            leaf = self._new(rep=seq, start=lcp, depth=n)
            leaf.seqs.append(seq)
            top.children[self._key(seq, lcp)] = leaf
            stack.append(leaf)
        while stack:
            close(stack.pop())
