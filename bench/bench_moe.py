"""A tiny mixture-of-experts model against the dense tiny model with the same active parameters:
tokens per second, and where the time goes.

Dense: the "tiny" Llama (hidden 512, 8 layers, MLP width 1,408). MoE: the same shape as Mixtral
with 8 experts of width 704, 2 per token, so each token runs 2 x 704 = 1,408 MLP columns, as in the
dense model (plus an 8 x 512 router). Both random-weight, bf16 (or --dtype), the same workload:
64 prompts in 8 groups sharing a 200-token prefix plus 32-80 own tokens, 32 greedy output tokens.

Where the time goes (MoE): the MoE blocks as a whole, and inside them the routing (router
matmul, softmax, top-k), the expert matmuls, and the rest (sort by expert, gather, weighting,
index_add); and torch's profiler's top operators for both models.

    python bench/bench_moe.py [--dtype bfloat16] [--repeats 3] [--experts 8] [--top-k 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from common import CACHE, random_tokens, save_json

from batchllm import LLM, SamplingParams
from batchllm.models import moe as moe_module


def workload(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(8):
        prefix = random_tokens(rng, 200)
        prompts += [prefix + random_tokens(rng, rng.randint(32, 80)) for _ in range(8)]
    rng.shuffle(prompts)
    return prompts


def folder(arch: str, dtype: str, experts: int, top_k: int) -> str:
    from batchllm.testing import SHAPES, make_tiny_model

    inter = SHAPES["tiny"]["intermediate_size"]
    name = f"bench-moe-{arch}-{dtype}" + (f"-e{experts}k{top_k}" if arch == "mixtral" else "")
    path = CACHE / name
    if not (path / "config.json").exists():
        extra = dict(num_local_experts=experts, num_experts_per_tok=top_k, intermediate_size=inter // top_k) \
            if arch == "mixtral" else {}
        make_tiny_model(path, arch=arch, shape="tiny", dtype=dtype, seed=0, **extra)
    return str(path)


class Timers:
    """Wall time of the MoE pieces, by patching SparseMoE (timing adds a little overhead)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self.route = moe_module.SparseMoE.route
        self.forward = moe_module.SparseMoE.forward
        self.linear = moe_module.F.linear

    def timed(self, fn, key: str):  # noqa: ANN001, ANN201
        """`fn` with its wall time added to `self.t[key]`."""
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[key] += time.perf_counter() - t0
        return wrapper

    def install(self) -> None:
        linear = self.timed(self.linear, "expert matmuls")

        class TimedF:  # F.linear inside moe.py is the expert matmuls
            def __getattr__(self, name):  # noqa: ANN001, ANN204
                return getattr(F, name)

        timed_f = TimedF()
        timed_f.linear = linear  # type: ignore[attr-defined]
        moe_module.SparseMoE.route = self.timed(self.route, "routing")
        moe_module.SparseMoE.forward = self.timed(self.forward, "MoE blocks")
        moe_module.F = timed_f

    def uninstall(self) -> None:
        moe_module.SparseMoE.route = self.route
        moe_module.SparseMoE.forward = self.forward
        moe_module.F = F


def run(path: str, dtype: str, prompts: list, params: SamplingParams, repeats: int, timers: Timers | None) -> dict:
    llm = LLM(path, dtype=dtype)
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    s = llm.last_run_stats
    t = statistics.median(times)
    row = dict(seconds=t, all_times=times, output_tok_s=s.output_tokens / t,
               computed_tok_s=(s.computed_prefill_tokens + s.output_tokens) / t, steps=s.steps)
    if timers is not None:
        timers.install()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        timers.uninstall()
        parts = dict(timers.t)
        parts["MoE other (sort, gather, weighting, index_add)"] = (
            parts.get("MoE blocks", 0) - parts.get("routing", 0) - parts.get("expert matmuls", 0))
        row["moe_parts_share_of_wall"] = {k: v / wall for k, v in parts.items()}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(ops.values()) or 1
    row["top_ops"] = [(k, v / total) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:10]]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="8 prompts, 4 tokens, 1 repeat: does it run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [{"prompt_token_ids": p} for p in workload()][: 8 if args.smoke else None]
    params = SamplingParams(temperature=0, max_tokens=4 if args.smoke else 32, ignore_eos=True)
    if args.smoke:
        args.repeats = 1
    rows = {}
    for arch in ("llama", "mixtral"):
        path = folder(arch, args.dtype, args.experts, args.top_k)
        rows[arch] = run(path, args.dtype, prompts, params, args.repeats, Timers() if arch == "mixtral" else None)
        r = rows[arch]
        print(f"{arch:8s} {r['seconds']:6.2f} s  output {r['output_tok_s']:6.0f} tok/s  computed "
              f"{r['computed_tok_s']:7.0f} tok/s  steps {r['steps']}")
        for k, v in r.get("moe_parts_share_of_wall", {}).items():
            print(f"           {k}: {v:.1%} of wall")
        for k, v in r["top_ops"][:6]:
            print(f"           op {k}: {v:.1%}")
    rows["moe_over_dense_time"] = rows["mixtral"]["seconds"] / rows["llama"]["seconds"]
    print(f"MoE / dense time: {rows['moe_over_dense_time']:.2f}x")
    if not args.smoke:
        save_json(f"moe-{args.dtype}", dict(args=vars(args), **rows))


if __name__ == "__main__":
    main()
