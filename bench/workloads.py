"""The peer benchmark's workloads, generated from a seed (no downloads).

Each workload is a `Workload`: token-id prompts, a fixed output length (greedy, `ignore_eos`),
the KV capacity in tokens every engine gets, and the groups of prompts known to share a prefix
(only llama.cpp's runner uses them, to prefill a shared prefix once and copy it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from common import random_tokens


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: int
    kv_tokens: int
    groups: list[list[int]]
    description: str

    def spec(self, model: str, threads: int = 2, warmup_prompts: int = 2) -> dict:
        """The runner-interface spec (bench/peers/spec.py) of this workload on `model`."""
        return dict(name=self.name, model=model, prompts=self.prompts, max_tokens=self.max_tokens,
                    kv_tokens=self.kv_tokens, threads=threads, dtype="bfloat16",
                    warmup_prompts=warmup_prompts, groups=self.groups)


def _grouped(rng: random.Random, groups: list[tuple[int, int, tuple[int, int]]]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts from (members, shared length, (min, max) distinct length) per group, shuffled;
    returns the prompts and, per group, the indices of its members after the shuffle."""
    items = []
    for g, (members, shared, (lo, hi)) in enumerate(groups):
        ctx = random_tokens(rng, shared)
        items += [(g, ctx + random_tokens(rng, rng.randint(lo, hi))) for _ in range(members)]
    rng.shuffle(items)
    by_group: list[list[int]] = [[] for _ in groups]
    for i, (g, _) in enumerate(items):
        by_group[g].append(i)
    return [p for _, p in items], by_group


def _contexts(name: str, seed: int, n_groups: int, size: int, context: int, kv_tokens: int) -> Workload:
    """`n_groups` shared contexts of `context` tokens, `size` members each with 100 distinct
    tokens, 50 output tokens, shuffled."""
    prompts, groups = _grouped(random.Random(seed), [(size, context, (100, 100))] * n_groups)
    return Workload(name, prompts, 50, kv_tokens, groups,
                    f"{n_groups * size} requests, {n_groups} groups of {size}, {context:,}-token contexts + 100 "
                    f"distinct tokens, 50 output tokens, shuffled, KV {kv_tokens:,} tokens")


def micro(quick: bool, seed: int = 0) -> Workload:
    return _contexts("micro", seed, *((4, 8) if quick else (16, 16)), 1000, 12_000)


def micro_long(quick: bool, seed: int = 1) -> Workload:
    return _contexts("micro-long", seed, *((2, 8) if quick else (16, 8)), 4000, 24_000)


def decode_heavy(quick: bool, seed: int = 2) -> Workload:
    n, out = (64, 64) if quick else (512, 256)
    prompts, groups = _grouped(random.Random(seed), [(n, 64, (64, 128))])
    return Workload("decode-heavy", prompts, out, 65_536, groups,
                    f"{n} requests sharing a 64-token system prompt, 64-128 distinct tokens, {out} output "
                    "tokens, KV 65,536 tokens")


def mixed(quick: bool, seed: int = 3) -> Workload:
    """Half the groups decode-heavy (64-token prefix, 64-128 distinct, many members), half
    prefill-heavy (1,000-token context, 100 distinct); one output length for all (the runner
    interface has one), interleaved by the shuffle."""
    k, dec, pre = (2, 16, 4) if quick else (4, 32, 16)
    spec = [(dec, 64, (64, 128)), (pre, 1000, (100, 100))] * k
    prompts, groups = _grouped(random.Random(seed), spec)
    out = 64 if quick else 128
    return Workload("mixed", prompts, out, 32_768, groups,
                    f"{len(prompts)} requests: {k} decode-heavy groups of {dec} (64-token prefix) and {k} "
                    f"prefill-heavy groups of {pre} (1,000-token context), {out} output tokens, shuffled, "
                    "KV 32,768 tokens")


def no_sharing(quick: bool, seed: int = 4) -> Workload:
    n = 32 if quick else 128
    rng = random.Random(seed)
    prompts = [random_tokens(rng, 600) for _ in range(n)]
    return Workload("no-sharing", prompts, 50, 32_768, [],
                    f"{n} random distinct prompts of 600 tokens, 50 output tokens, KV 32,768 tokens")


WORKLOADS = {"micro": micro, "micro-long": micro_long, "decode-heavy": decode_heavy, "mixed": mixed,
             "no-sharing": no_sharing}
