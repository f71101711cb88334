"""The planning issue's workload: 256 requests in 16 groups of 16, each sharing a 1,000-token
context plus 100 distinct tokens, 50 output tokens (`ignore_eos`), shuffled; tiny model, bf16;
KV pool limited to 12,000 tokens. Times every policy and every batchllm ablation in one run.

    python bench/bench_policies.py [--quick] [--only batchllm,fcfs-lru]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import model_folder, save_json, shared_prefix_workload

from batchllm import LLM, SamplingParams

RUNS = {
    "batchllm": dict(policy="batchllm"),
    "batchllm-reference-attn": dict(policy="batchllm", attention="reference"),
    "batchllm-no-kernels": dict(policy="batchllm", cpu_kernels=False),
    "no-global-groups": dict(policy="batchllm", global_groups=False),
    "no-decode-ratio-order": dict(policy="batchllm", decode_ratio_order=False),
    "no-memory-centric": dict(policy="batchllm", memory_centric=False),
    "partial-block-recompute": dict(policy="batchllm", partial_block="recompute"),
    "fcfs-lru": dict(policy="fcfs-lru"),
    "lpm": dict(policy="lpm"),
    "fcfs": dict(policy="fcfs"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 groups of 8 instead of 16 of 16")
    ap.add_argument("--only", default="", help="comma-separated run names")
    ap.add_argument("--kv-tokens", type=int, default=12000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    groups, size = (4, 8) if args.quick else (16, 16)
    prompts = [{"prompt_token_ids": p} for p in shared_prefix_workload(groups, size, 1000, 100)]
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    path = model_folder("tiny")
    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    rows, reference = [], None
    for name in names:
        llm = LLM(path, dtype="bfloat16", num_kv_blocks=args.kv_tokens // 16, **RUNS[name])
        plan = llm.plan(prompts, params)
        llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        t = time.perf_counter() - t0
        s = llm.last_run_stats
        toks = [o.outputs[0].token_ids for o in outs]
        reference = reference or toks
        agree = sum(a == b for a, b in zip(toks, reference)) / len(toks)
        rows.append(dict(name=name, seconds=t, computed_prefill_tokens=s.computed_prefill_tokens,
                         logical_prefill_tokens=s.logical_prefill_tokens,
                         multilevel_optimum_tokens=plan.stats.multilevel_optimum_tokens,
                         peak_kv_tokens=s.peak_kv_tokens, preemptions=s.preemptions, steps=s.steps,
                         tokens_per_step=s.tokens_per_step, output_tok_s=s.output_tokens / t,
                         agreement_with_first=agree))
        print(f"{name:26s} {t:7.2f} s  computed prefill {s.computed_prefill_tokens:7d} (optimum "
              f"{plan.stats.multilevel_optimum_tokens})  peak KV {s.peak_kv_tokens:6d}  preempt "
              f"{s.preemptions:4d}  steps {s.steps:4d}  agree {agree:.0%}", flush=True)
    base = {r["name"]: r["seconds"] for r in rows}
    if "fcfs-lru" in base:
        for r in rows:
            print(f"{r['name']:26s} speed-up over fcfs-lru: {base['fcfs-lru'] / r['seconds']:.2f}x")
    save_json("policies-quick" if args.quick else "policies", rows)


if __name__ == "__main__":
    main()
