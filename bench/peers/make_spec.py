"""Write a shared-prefix workload spec for the peer runners (stdlib only).

    python bench/peers/make_spec.py OUT.json --model /abs/model [--groups 2 --group-size 4
        --context 100 --distinct 20 --max-tokens 16 --kv-tokens 4000 --warmup 2 --seed 0 --no-shuffle]

`groups` contexts of `context` random token ids (5..vocab-1), each followed by `group-size` distinct
suffixes of `distinct` tokens, shuffled (like bench/common.py shared_prefix_workload). The spec
records the prompt indices of each group in "groups".
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import Spec, write_spec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--distinct", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-tokens", type=int, default=4000)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-shuffle", action="store_true")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    toks = lambda n: [rng.randrange(5, a.vocab) for _ in range(n)]  # noqa: E731
    items = []
    for g in range(a.groups):
        ctx = toks(a.context)
        items += [(g, ctx + toks(a.distinct)) for _ in range(a.group_size)]
    if not a.no_shuffle:
        rng.shuffle(items)
    groups = [[i for i, (g, _) in enumerate(items) if g == k] for k in range(a.groups)]
    name = a.name or f"{a.groups}x{a.group_size}-ctx{a.context}+{a.distinct}-out{a.max_tokens}"
    write_spec(a.out, Spec(name=name, model=str(Path(a.model).resolve()), prompts=[p for _, p in items],
                           max_tokens=a.max_tokens, kv_tokens=a.kv_tokens, threads=a.threads, dtype=a.dtype,
                           warmup_prompts=a.warmup, groups=groups))
    print(a.out)


if __name__ == "__main__":
    main()
