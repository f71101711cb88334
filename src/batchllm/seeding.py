"""Which seed each prompt's samples draw from: `LLM` seeds its generators with it, and run-batch
writes it into the requests up front, so a resumed job samples what an uninterrupted one does.

No torch import: batch_io and the `plan` command use this module.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batchllm.sampling_params import SamplingParams


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (independent of Python's hash randomisation)."""
    h = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def prompt_seeds(prompt_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 engine_seed: int) -> list[int | None]:
    """Per prompt: its own `seed`, else one derived from the engine seed, the prompt's tokens and
    how often the same prompt came before it in the list (never its position in the batch);
    None for greedy prompts, which draw nothing."""
    seeds: list[int | None] = []
    seen: Counter[tuple[int, ...]] = Counter()
    for ids, p in zip(prompt_ids, params, strict=True):
        key = tuple(ids)
        occurrence = seen[key]  # counted over every prompt, greedy ones included
        seen[key] += 1
        if p.greedy:
            seeds.append(None)
        else:
            seeds.append(p.seed if p.seed is not None else derive_seed(engine_seed, hash(key), occurrence))
    return seeds


def sample_seed(prompt_seed: int, sample_index: int) -> int:
    """The generator seed of sample `sample_index` (0 .. n-1) of a prompt seeded `prompt_seed`."""
    return derive_seed(prompt_seed, sample_index)


def with_seeds(prompt_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams],
               engine_seed: int) -> list[SamplingParams]:
    """`params` with each unseeded sampled prompt's `prompt_seeds` seed written in: what a driver
    does before splitting a batch, so each part samples what the whole batch would."""
    import dataclasses

    seeds = prompt_seeds(prompt_ids, params, engine_seed)
    return [dataclasses.replace(p, seed=s) if p.seed is None and s is not None else p
            for p, s in zip(params, seeds, strict=True)]
