"""Structured outputs against free generation: 256 requests (shared-prefix prompts) with 16
distinct JSON schemas, then the same requests unconstrained with the same output lengths
(`max_tokens` = each constrained output's length, `ignore_eos`). Reports the end-to-end ratio
(target: at most 1.10), the grammar mask time per step and the compile time of the whole batch.

Greedy outputs of a random model under a grammar are "noise that parses"; the grammar work per
step is what a real model's would be (one mask per constrained row per step).

    python bench/bench_structured.py [--requests 256] [--schemas 16] [--shape tiny] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from common import model_folder, save_json, shared_prefix_workload

from batchllm import LLM, SamplingParams, StructuredOutputsParams


def schema(k: int) -> dict:
    """Schema k of a family of extraction schemas: nested objects, enums, arrays, patterns, bounded."""
    props: dict = {
        f"label_{k}": {"enum": ["positive", "negative", "neutral", f"other_{k}"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100 + k},
        "entities": {"type": "array", "maxItems": 1 + k % 4,
                     "items": {"type": "object", "additionalProperties": False, "required": ["name", "kind"],
                               "properties": {"name": {"type": "string", "maxLength": 6 + k},
                                              "kind": {"enum": ["person", "place", "org"]}}}},
        "code": {"type": "string", "pattern": f"^[A-Z]{{2}}-[0-9]{{{1 + k % 3}}}$"},
    }
    if k % 2:
        props["summary"] = {"type": "string", "maxLength": 12}
    return {"type": "object", "additionalProperties": False, "required": sorted(props), "properties": props}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--schemas", type=int, default=16)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (the best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prompts = [{"prompt_token_ids": p}
               for p in shared_prefix_workload(8, args.requests // 8, context=200, distinct=40, seed=1)]
    schemas = [schema(k) for k in range(args.schemas)]
    constrained = [SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                  structured_outputs=StructuredOutputsParams(json=schemas[i % args.schemas]))
                   for i in range(len(prompts))]
    llm = LLM(model_folder(args.shape), dtype="bfloat16")

    # Compile time of the whole batch, on a fresh cache (the LLM keeps compiled grammars).
    llm.engine._grammars = None
    t = time.perf_counter()
    failed = llm.structured_errors(constrained)
    compile_s = time.perf_counter() - t
    assert not failed, failed

    def run(params: list[SamplingParams]) -> tuple[float, list, object]:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, outs, llm.last_run_stats

    llm.generate(prompts[:4], constrained[:4], use_tqdm=False)  # warm-up (kernels, threads)
    best_c = best_f = float("inf")
    for _ in range(args.repeats):
        tc, outs, stats_c = run(constrained)
        best_c = min(best_c, tc)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        tf, outs_f, stats_f = run(free)
        best_f = min(best_f, tf)
        assert [len(o.outputs[0].token_ids) for o in outs_f] == lengths
    finished = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    result = {
        "requests": len(prompts), "schemas": args.schemas, "shape": args.shape,
        "output_tokens": sum(lengths), "constrained_finished_by_grammar": finished,
        "constrained_s": round(best_c, 3), "free_s": round(best_f, 3), "ratio": round(best_c / best_f, 3),
        "steps": stats_c.steps, "mask_steps": stats_c.grammar_mask_steps,
        "mask_ms_per_step": round(1e3 * stats_c.grammar_mask_time_s / max(1, stats_c.grammar_mask_steps), 3),
        "mask_total_s": round(stats_c.grammar_mask_time_s, 3),
        "compile_all_s": round(compile_s, 3),
    }
    for k, v in result.items():
        print(f"{k:34s} {v}")
    print(f"saved {save_json('structured', result)}")


if __name__ == "__main__":
    main()
