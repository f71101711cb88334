"""Admission on expected output (issue #19): chat lines without max_tokens against the same
lines with max_tokens set to the lengths they actually produced, and a decode-heavy batch.

The chat batch: distinct prompts (a shared system prompt and a question), each stopping at a
token of its own (stop_token_ids) that the model emits after 16-256 tokens (found by a
calibration run), as a real model stops at its end-of-turn. Run A gives no max_tokens (room to
the end of the context, as run-batch does for chat); run B sets max_tokens to A's output
lengths. Both must produce the same tokens; the target is A's time within 1.2x of B's (best of
`--repeats` runs each, alternated; the median of the paired ratios too). The
decode-heavy batch is the peer benchmark's (bench/workloads.py; 256 outputs, ignore_eos).

    python bench/bench_admission.py [--quick] [--kv-tokens 93200] [--only chat,decode-heavy]

Prints and writes bench/results/admission.json: seconds, steps, peak KV blocks, preemptions per
run. Steps, peak KV and preemptions are deterministic; time it on a quiet machine. Run it from
another checkout (PYTHONPATH=that/src) for the before numbers.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import batchllm  # before torch: it sets the OpenMP wait policy (batchllm/openmp.py)
from batchllm import LLM, SamplingParams

from common import RESULTS, model_folder, random_tokens
from workloads import decode_heavy


def _run(llm: LLM, prompts: list, params: list) -> tuple[dict, list[list[int]]]:
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    t = time.perf_counter() - t0
    s = llm.last_run_stats
    row = dict(seconds=round(t, 3), steps=s.steps, peak_kv_blocks=s.peak_kv_blocks, num_kv_blocks=s.num_kv_blocks,
               preemptions=s.preemptions, output_tokens=s.output_tokens,
               computed_prefill_tokens=s.computed_prefill_tokens)
    return row, [o.outputs[0].token_ids for o in outs]


def chat(llm: LLM, n: int, repeats: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    system = random_tokens(rng, 48)
    prompts = [system + random_tokens(rng, rng.randint(20, 120)) for _ in range(n)]
    wanted = [rng.randint(16, 256) for _ in prompts]
    ids = [{"prompt_token_ids": p} for p in prompts]
    calib = llm.generate(ids, [SamplingParams(temperature=0, max_tokens=w, ignore_eos=True) for w in wanted],
                         use_tqdm=False)
    stops = [o.outputs[0].token_ids[-1] for o in calib]
    limits = getattr(llm.engine, "limits", None)  # checkouts before issue #19 (the before numbers) have none
    room = limits.max_context if limits is not None else llm.engine.max_model_len
    open_ended = [SamplingParams(temperature=0, max_tokens=room - len(p), stop_token_ids=[t], ignore_eos=True)
                  for p, t in zip(prompts, stops)]
    a, out_a = _run(llm, ids, open_ended)
    exact = [SamplingParams(temperature=0, max_tokens=max(1, len(o)), stop_token_ids=[t], ignore_eos=True)
             for o, t in zip(out_a, stops)]
    b, out_b = _run(llm, ids, exact)
    times_a, times_b = [a["seconds"]], [b["seconds"]]
    for _ in range(repeats - 1):  # alternated, so a drift in the machine's speed hits both alike
        times_a.append(_run(llm, ids, open_ended)[0]["seconds"])
        times_b.append(_run(llm, ids, exact)[0]["seconds"])
    ratios = sorted(x / y for x, y in zip(times_a, times_b))
    return dict(requests=n, no_max_tokens=a, max_tokens_as_produced=b, same_outputs=out_a == out_b,
                seconds_no_max_tokens=times_a, seconds_max_tokens_as_produced=times_b,
                time_ratio_best=round(min(times_a) / min(times_b), 3),
                time_ratio_median=round(ratios[len(ratios) // 2], 3), step_ratio=round(a["steps"] / b["steps"], 3))


def decode(llm: LLM, quick: bool) -> dict:
    w = decode_heavy(quick)
    row, _ = _run(llm, [{"prompt_token_ids": p} for p in w.prompts],
                  [SamplingParams(temperature=0, max_tokens=w.max_tokens, ignore_eos=True)] * len(w.prompts))
    return dict(requests=len(w.prompts), max_tokens=w.max_tokens, **row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches (a smoke run)")
    ap.add_argument("--kv-tokens", type=int, default=93_200, help="KV pool (default 5,825 blocks, issue #19's)")
    ap.add_argument("--only", default="chat,decode-heavy")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each chat variant, alternated")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    llm = LLM(model_folder("tiny"), dtype="bfloat16", num_kv_blocks=args.kv_tokens // 16)
    result: dict = dict(kv_tokens=args.kv_tokens, quick=args.quick, batchllm=batchllm.__file__)
    only = args.only.split(",")
    if "chat" in only:
        result["chat"] = chat(llm, 16 if args.quick else 128, args.repeats)
        print("chat", json.dumps(result["chat"]), flush=True)
    if "decode-heavy" in only:
        result["decode_heavy"] = decode(llm, args.quick)
        print("decode-heavy", json.dumps(result["decode_heavy"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "admission.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
