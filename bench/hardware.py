"""The machine's limit, measured in the same run, and each workload's unavoidable work.

`measure_peak` times bf16 GEMMs of the model's own shapes and a large copy; `unavoidable_flops`
counts what any engine must compute: every distinct prompt token once (a token is distinct per
prefix-tree edge, so shared prefixes count once), every output token once, attention included.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Peak:
    gemm_gflops: float  # best bf16 GEMM throughput over the model's layer shapes, M = 2048
    gemm_by_shape: dict[str, float]
    copy_gb_s: float  # bytes read + written per second by a large tensor copy
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _dims(cfg: dict) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, heads, KV heads, head dim) of an HF config.json."""
    heads = cfg["num_attention_heads"]
    return (cfg["hidden_size"], cfg["intermediate_size"], heads, cfg.get("num_key_value_heads") or heads,
            cfg.get("head_dim") or cfg["hidden_size"] // heads)


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` bf16 products [m, k] x [k, n] (as `F.linear`)."""
    a = torch.randn(m, k, dtype=torch.bfloat16)
    b = torch.randn(n, k, dtype=torch.bfloat16)
    return 2 * m * k * n / _best_time(lambda: torch.nn.functional.linear(a, b), repeats) / 1e9


def measure_peak(cfg: dict, threads: int = 2, m: int = 2048, repeats: int = 5) -> Peak:
    """bf16 GEMM GFLOP/s for the q/k/v, o, gate/up and down projections of `cfg` (an HF
    config.json), and copy bandwidth over 512 MiB."""
    torch.set_num_threads(threads)
    h, inter, heads, kvh, d = _dims(cfg)
    shapes = {"qkv": (h, (heads + 2 * kvh) * d), "o": (heads * d, h), "gate_up": (h, 2 * inter),
              "down": (inter, h), "square-2048": (2048, 2048)}
    by_shape = {name: gemm_gflops(m, k, n, repeats) for name, (k, n) in shapes.items()}
    src = torch.empty(256 * 1024 * 1024 // 2, dtype=torch.bfloat16).fill_(1)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), repeats)
    return Peak(max(by_shape.values()), by_shape, 2 * src.numel() * 2 / t / 1e9, threads)


def flops_per_token(cfg: dict) -> tuple[float, float, float]:
    """(linear FLOPs of one token through all layers, LM-head FLOPs of one token, attention
    FLOPs per token per key position across layers)."""
    h, inter, heads, kvh, d = _dims(cfg)
    layers = cfg["num_hidden_layers"]
    linear = 2 * layers * (h * (heads + 2 * kvh) * d + heads * d * h + 3 * h * inter)
    return float(linear), float(2 * h * cfg["vocab_size"]), float(layers * heads * 4 * d)


def distinct_positions(prompts: list[list[int]]) -> tuple[int, int]:
    """(number of distinct prompt tokens = prefix-tree edge tokens, sum of their 1-based positions)."""
    count = pos_sum = 0
    prev: list[int] = []
    for p in sorted(prompts):
        lcp = 0
        for a, b in zip(prev, p):
            if a != b:
                break
            lcp += 1
        n = len(p) - lcp
        count += n
        pos_sum += (lcp + 1 + len(p)) * n // 2
        prev = p
    return count, pos_sum


def unavoidable_flops(cfg: dict, prompts: list[list[int]], max_tokens: int) -> float:
    """FLOPs any engine must spend: distinct prompt tokens once (linear + causal attention),
    each output token once (linear + LM head + attention over its context)."""
    linear, head, attn = flops_per_token(cfg)
    n_distinct, pos_sum = distinct_positions(prompts)
    out_tokens = len(prompts) * max_tokens
    out_pos = sum(len(p) * max_tokens + max_tokens * (max_tokens + 1) // 2 for p in prompts)
    return n_distinct * linear + pos_sum * attn + out_tokens * (linear + head) + out_pos * attn
