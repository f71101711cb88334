"""Planner speed on a large synthetic batch (no GPU, no torch).

Default workload: 100,000 prompts x 2,000 tokens = a shared 50-token system prompt, one of
1,000 documents (1,850 tokens), and a 100-token question; 100 questions per document, rows
shuffled so that sharing is not visible in input order.

    python bench/bench_planner.py [--scale 0.1] [--vocab 128256] [--lists]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from batchllm.planner import PrefixTree, build_plan, maximize_reuse


def make_prompts(scale: float, vocab: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n_docs = max(1, round(1000 * scale))
    per_doc, sys_len, doc_len, q_len = 100, 50, 1850, 100
    system = rng.integers(0, vocab, sys_len, dtype=np.int32)
    docs = rng.integers(0, vocab, (n_docs, doc_len), dtype=np.int32)
    rows = np.empty((n_docs * per_doc, sys_len + doc_len + q_len), dtype=np.int32)
    rows[:, :sys_len] = system
    rows[:, sys_len : sys_len + doc_len] = np.repeat(docs, per_doc, axis=0)
    rows[:, sys_len + doc_len :] = rng.integers(0, vocab, (len(rows), q_len), dtype=np.int32)
    rows = rows[rng.permutation(len(rows))]
    return list(rows)  # row views: one int32 array per prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 1,000 documents")
    ap.add_argument("--vocab", type=int, default=128_256, help="token ids drawn from [0, vocab)")
    ap.add_argument("--lists", action="store_true", help="pass Python lists instead of arrays")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()

    t = time.perf_counter()
    prompts = make_prompts(args.scale, args.vocab)
    if args.lists:
        prompts = [p.tolist() for p in prompts]
    total = sum(len(p) for p in prompts)
    print(f"workload: {len(prompts):,} prompts, {total:,} tokens (made in {time.perf_counter() - t:.2f}s)")

    t = time.perf_counter()
    tree = PrefixTree(prompts)
    t_tree = time.perf_counter() - t
    t = time.perf_counter()
    groups = maximize_reuse(tree)
    t_mr = time.perf_counter() - t
    print(f"prefix tree: {len(tree.nodes):,} nodes in {t_tree:.2f}s;", end=" ")
    print(f"maximize_reuse: {len(groups):,} groups in {t_mr:.2f}s")
    del tree, groups

    t = time.perf_counter()
    out = [1000 - (i % 7) * 100 for i in range(len(prompts))]  # varied max_tokens
    plan = build_plan(prompts, block_size=args.block_size, expected_output_tokens=out)
    t_plan = time.perf_counter() - t
    t = time.perf_counter()
    js = plan.to_json()
    t_json = time.perf_counter() - t
    print(f"build_plan (end to end): {t_plan:.2f}s; to_json: {t_json:.2f}s ({len(js) / 1e6:.1f} MB)")
    print(plan.summary())


if __name__ == "__main__":
    main()
