"""Where batchllm's time goes on one workload spec: scheduling, attention, the rest of the model
(GEMMs, norms, rope, activations), sampling and Python overhead per step; plus, from a second
pass under torch.profiler, the share of operator time spent in GEMMs.

    python bench/profile_engine.py SPEC.json [--policy batchllm] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from spec import load_spec  # noqa: E402

import batchllm.engine as engine_module  # noqa: E402
from batchllm import LLM, SamplingParams  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "mkldnn::_linear_pointwise",
            "aten::_scaled_dot_product_flash_attention_for_cpu")


def timed(fn, bucket: str, totals: dict[str, float]):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[bucket] += time.perf_counter() - t0
    return wrapper


def profile(spec_path: str, policy: str) -> dict:
    spec = load_spec(spec_path)
    torch.set_num_threads(spec.threads)
    llm = LLM(spec.model, dtype=spec.dtype, num_kv_blocks=spec.kv_tokens // 16, policy=policy)
    params = SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in spec.prompts]
    llm.generate(prompts[: spec.warmup_prompts or 2], params, use_tqdm=False)

    totals: dict[str, float] = defaultdict(float)
    eng = llm.engine
    runner, backend = eng.runner, eng.runner.backend
    backend.forward = timed(backend.forward, "attention", totals)
    backend.prepare = timed(backend.prepare, "attention metadata", totals)
    runner.run = timed(runner.run, "model step", totals)
    eng.sampler = timed(eng.sampler, "sampling", totals)
    make = engine_module.make_scheduler

    def make_timed(*args, **kwargs):
        sched = make(*args, **kwargs)
        for name in ("schedule", "after_step", "finish"):
            setattr(sched, name, timed(getattr(sched, name), "scheduling", totals))
        return sched

    engine_module.make_scheduler = make_timed
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    engine_module.make_scheduler = make
    model_rest = totals["model step"] - totals["attention"] - totals["attention metadata"]
    parts = {"layers (GEMMs, norms, rope, MLP)": model_rest, "attention": totals["attention"],
             "attention metadata": totals["attention metadata"], "sampling": totals["sampling"],
             "scheduling": totals["scheduling"]}
    parts["engine loop and other Python"] = wall - sum(parts.values())

    from torch.profiler import ProfilerActivity, profile as torch_profile
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    ops = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    op_total = sum(ops.values()) or 1
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return dict(workload=spec.name, policy=policy, wall_s=wall, steps=llm.last_run_stats.steps,
                parts=parts, gemm_share_of_op_time=sum(ops.get(k, 0) for k in GEMM_OPS) / op_total,
                top_ops=[(k, v / op_total) for k, v in top])


def markdown(p: dict) -> list[str]:
    lines = [f"`{p['policy']}` on `{p['workload']}`: {p['wall_s']:.2f} s over {p['steps']} steps "
             f"({p['wall_s'] / max(p['steps'], 1) * 1e3:.1f} ms per step).", "",
             "| part | seconds | share |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / p['wall_s']:.0%} |" for k, v in p["parts"].items()]
    lines += ["", f"Under torch.profiler, matrix products (GEMMs, batched matmuls and SDPA) take "
              f"{p['gemm_share_of_op_time']:.0%} of operator time; the largest operators: "
              + ", ".join(f"{k} {v:.0%}" for k, v in p["top_ops"]) + "."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument("--policy", default="batchllm")
    ap.add_argument("--json", default=None, help="write the breakdown here")
    args = ap.parse_args()
    p = profile(args.spec, args.policy)
    print("\n".join(markdown(p)))
    if args.json:
        Path(args.json).write_text(json.dumps(p, indent=1))


if __name__ == "__main__":
    main()
