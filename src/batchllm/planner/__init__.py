"""Global prefix planner: pure data (numpy only, no torch). See docs/design.md §2 and §3.2."""

from .plan import Group, Plan, PlanStats, PrefixGroup, build_plan, decode_ratio, maximize_reuse
from .prefix_tree import PrefixTree, TrieNode

__all__ = [
    "Group",
    "Plan",
    "PlanStats",
    "PrefixGroup",
    "PrefixTree",
    "TrieNode",
    "build_plan",
    "decode_ratio",
    "maximize_reuse",
]
