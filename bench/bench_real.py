"""The real model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to bf16) on real text: the demo's
short texts, each the system prompt of its questions, rendered with the model's chat template;
greedy answers that stop at EOS (at most --max-tokens). Times each policy.

    python bench/bench_real.py [--policies fcfs,batchllm] [--repeats 3] [--copies 4]

`--copies N` asks every question N times with a different "(variant k)" suffix, so the batch
has 16 x N + 4 x N requests with long shared prefixes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import save_json

from batchllm import LLM, SamplingParams
from batchllm.batch_io.demo import _PLAIN, _QUESTIONS, _TEXTS
from batchllm.models.smollm2 import ensure_smollm2


def conversations(copies: int) -> list[list[dict[str, str]]]:
    convs = []
    for k in range(copies):
        tag = f" (variant {k})" if k else ""
        for name, text in _TEXTS.items():
            system = f"Answer the question about this text briefly.\n\nText: {text}"
            convs += [[{"role": "system", "content": system}, {"role": "user", "content": q + tag}]
                      for q in _QUESTIONS[name]]
        convs += [[{"role": "user", "content": q + tag}] for q in _PLAIN]
    return convs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="fcfs,batchllm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = str(ensure_smollm2())
    convs = conversations(args.copies)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    for policy in args.policies.split(","):
        llm = LLM(path, dtype=args.dtype, policy=policy)
        llm.chat(convs[:4], params, use_tqdm=False)  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.chat(convs, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        s = llm.last_run_stats
        t = statistics.median(times)
        stopped = sum(o.outputs[0].finish_reason == "stop" for o in outs)
        row = dict(policy=policy, requests=len(convs), seconds=t, all_times=times, output_tok_s=s.output_tokens / t,
                   prompt_tok_s=s.logical_prefill_tokens / t, saving=s.saving, steps=s.steps,
                   mean_output_tokens=s.output_tokens / len(convs), stopped_at_eos=stopped)
        rows.append(row)
        print(f"{policy:9s} {t:6.2f} s  {len(convs)} requests  output {row['output_tok_s']:6.0f} tok/s  prompt "
              f"{row['prompt_tok_s']:6.0f} tok/s  prefix saving {s.saving:.1%}  mean output "
              f"{row['mean_output_tokens']:.1f} tokens  {stopped} stopped at EOS")
    save_json("real-smollm2", rows)


if __name__ == "__main__":
    main()
