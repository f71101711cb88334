"""Shared fixtures: tiny random model folders, built once per test session.

Model folders are cached by their arguments, so every test file asking for the same tiny model
gets the same folder (and nothing is rebuilt per test). Use `shape="test"` (hidden 64, 2 layers,
vocab 1024) and `tie_word_embeddings=False` unless a test is about something else: a random
model with tied embeddings mostly repeats its last input token, which makes equality toothless.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from batchllm.testing import make_tiny_model  # noqa: E402

# NOTE: the test models are tiny; with 2 intra-op threads on 2 cores shared with other work,
# torch's worker threads spin against each other and a step gets ~50x slower. One thread is
# faster here by far. BATCHLLM_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("BATCHLLM_TEST_THREADS", "1")))

# Token ids 0..4 are special tokens (BOS, EOS, <|im_start|>, <|im_end|>, pad) in every tiny model.
FIRST_PLAIN_TOKEN = 5


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`model_factory(arch="llama", shape="test", **overrides) -> Path`, cached per arguments."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama", shape: str = "test", **kwargs: Any) -> Path:
        kwargs.setdefault("tie_word_embeddings", False)
        key = json.dumps([arch, shape, kwargs], sort_keys=True, default=str)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"model-{arch}-{shape}")
            cache[key] = make_tiny_model(path, arch=arch, shape=shape, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def llama_dir(model_factory: Callable[..., Path]) -> Path:
    """The default test model: Llama, GQA (4 heads, 2 KV heads), untied embeddings, fp32."""
    return model_factory("llama")


@pytest.fixture(scope="session")
def random_prompts() -> Callable[..., list[list[int]]]:
    """`random_prompts(n, lo, hi, seed=0, vocab=1024)`: n token-id prompts of lo..hi tokens
    drawn from the plain (non-special) ids, deterministic per seed."""

    def make(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 1024) -> list[list[int]]:
        rng = random.Random(seed)
        return [[rng.randrange(FIRST_PLAIN_TOKEN, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]

    return make
