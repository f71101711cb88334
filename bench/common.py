"""Shared pieces of the benchmarks: model folders, seeded workloads, timing output."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

CACHE = Path(os.environ.get("BATCHLLM_CACHE", Path.home() / ".cache" / "batchllm"))
RESULTS = Path(__file__).parent / "results"


def model_folder(shape: str = "tiny", arch: str = "llama", dtype: str = "bfloat16") -> str:
    """A random-weight model folder of `shape`, built once into the cache, with an 8,192-token
    context (the micro-long workload's prompts have 4,100 tokens)."""
    from batchllm.testing import make_tiny_model

    path = CACHE / f"bench-{arch}-{shape}-{dtype}-ctx8k"
    if not (path / "config.json").exists():
        make_tiny_model(path, arch=arch, shape=shape, dtype=dtype, seed=0, max_position_embeddings=8192)
    return str(path)


def random_tokens(rng: random.Random, n: int, vocab: int = 4000) -> list[int]:
    """n random ordinary token ids (ids below 5 are special tokens)."""
    return [rng.randrange(5, vocab) for _ in range(n)]


def shared_prefix_workload(num_groups: int, group_size: int, context: int, distinct: int, seed: int = 0,
                           shuffle: bool = True) -> list[list[int]]:
    """`num_groups` contexts of `context` tokens, each followed by `group_size` distinct suffixes."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_groups):
        ctx = random_tokens(rng, context)
        prompts += [ctx + random_tokens(rng, distinct) for _ in range(group_size)]
    if shuffle:
        rng.shuffle(prompts)
    return prompts


def save_json(name: str, data: object) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
