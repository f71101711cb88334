"""Structured outputs against free generation: 256 requests (shared-prefix prompts) with 16
distinct JSON schemas, then the same requests unconstrained with the same output lengths
(`max_tokens` = each constrained output's length, `ignore_eos`). Reports the end-to-end ratio
(target: at most 1.10), the grammar mask time per step (what the step loop waits for: the fill
when it is not done yet, applying the masks, feeding the sampled tokens) beside llguidance's fill
time per step (mostly in a worker thread during the forward pass, `grammar_overlap`), and the
compile time of the whole batch. `--reference` also times the reference path (masks filled in the
sampler, `grammar_overlap=False`) in the same alternation.

Greedy outputs of a random model under a grammar are "noise that parses"; the grammar work per
step is what a real model's would be (one mask per constrained row per step).

    python bench/bench_structured.py [--requests 256] [--schemas 16] [--shape tiny] [--repeats 2] [--reference]
"""

from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (best and median reported)")
    ap.add_argument("--reference", action="store_true", help="also time the reference path (grammar_overlap=False)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    prompts = [{"prompt_token_ids": p}
               for p in shared_prefix_workload(8, args.requests // 8, context=200, distinct=40, seed=1)]
    schemas = [schema(k) for k in range(args.schemas)]
    constrained = [SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                  structured_outputs=StructuredOutputsParams(json=schemas[i % args.schemas]))
                   for i in range(len(prompts))]
    llms = {"overlap": LLM(model_folder(args.shape), dtype="bfloat16")}
    if args.reference:
        llms["reference"] = LLM(model_folder(args.shape), dtype="bfloat16", grammar_overlap=False)
    llm = llms["overlap"]

    # Compile time of the whole batch, on a fresh cache (the LLM keeps compiled grammars).
    llm.engine._grammars = None
    t = time.perf_counter()
    failed = llm.structured_errors(constrained)
    compile_s = time.perf_counter() - t
    assert not failed, failed

    def run(llm: LLM, params: list[SamplingParams]) -> tuple[float, list, object]:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, outs, llm.last_run_stats

    for m in llms.values():
        m.generate(prompts[:4], constrained[:4], use_tqdm=False)  # warm-up (kernels, threads, compiled grammars)
    times: dict[str, list[float]] = {"free": [], **{k: [] for k in llms}}
    stats = {}
    for _ in range(args.repeats):  # the variants alternate, so a slow moment hits them alike
        for name, m in llms.items():
            tc, outs, stats[name] = run(m, constrained)
            times[name].append(tc)
            tokens = [o.outputs[0].token_ids for o in outs]
            if name == "overlap":
                lengths = [len(t) for t in tokens]
                reference_tokens = tokens
            assert tokens == reference_tokens, "the two mask paths disagree"
        free = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        tf, outs_f, _ = run(llm, free)
        times["free"].append(tf)
        assert [len(o.outputs[0].token_ids) for o in outs_f] == lengths
    finished = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    result = {
        "requests": len(prompts), "schemas": args.schemas, "shape": args.shape, "repeats": args.repeats,
        "output_tokens": sum(lengths), "constrained_finished_by_grammar": finished,
        "free_s_best": round(min(times["free"]), 3), "free_s_median": round(statistics.median(times["free"]), 3),
    }
    for name in llms:
        st = stats[name]
        steps = max(1, st.grammar_mask_steps)
        result.update({
            f"{name}_s_best": round(min(times[name]), 3),
            f"{name}_s_median": round(statistics.median(times[name]), 3),
            f"{name}_ratio_best": round(min(times[name]) / min(times["free"]), 3),
            f"{name}_ratio_median": round(statistics.median([c / f for c, f in zip(times[name], times["free"])]), 3),
            f"{name}_mask_ms_per_step": round(1e3 * st.grammar_mask_time_s / steps, 3),
            f"{name}_fill_ms_per_step": round(1e3 * st.grammar_fill_time_s / steps, 3),
        })
    result.update({"steps": stats["overlap"].steps, "mask_steps": stats["overlap"].grammar_mask_steps,
                   "compile_all_s": round(compile_s, 3)})
    for k, v in result.items():
        print(f"{k:34s} {v}")
    print(f"saved {save_json('structured', result)}")


if __name__ == "__main__":
    main()
