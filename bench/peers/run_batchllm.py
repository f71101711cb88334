"""batchllm behind the peer-runner interface (run with the main environment's python).

    python bench/peers/run_batchllm.py SPEC.json OUT.json [--policy batchllm|fcfs|fcfs-lru|lpm]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import Result, base_parser, check_outputs, load_spec, timed, write_result  # noqa: E402

STATS = ("computed_prefill_tokens", "logical_prefill_tokens", "peak_kv_tokens", "steps", "tokens_per_step",
         "preemptions", "num_kv_blocks", "block_size", "prefix_shared_attention_steps", "saving")


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--policy", default="batchllm")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--attention", default=None, help="auto | reference | prefix-shared")
    args = ap.parse_args()
    spec = load_spec(args.spec)

    import batchllm  # first: it sets the OpenMP wait policy before torch loads libgomp (batchllm/openmp.py)
    from batchllm import LLM, SamplingParams
    import torch
    torch.set_num_threads(spec.threads)

    block = 16
    kwargs = dict(dtype=spec.dtype, num_kv_blocks=spec.kv_tokens // block, block_size=block, policy=args.policy)
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.attention is not None:
        kwargs["attention"] = args.attention

    llm, start_s = timed(lambda: LLM(spec.model, **kwargs))

    params = SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True)
    warm = [{"prompt_token_ids": p} for p in spec.warmup()]
    _, warmup_s = timed(lambda: warm and llm.generate(warm, params, use_tqdm=False))
    prompts = [{"prompt_token_ids": p} for p in spec.prompts]
    outs, batch_s = timed(lambda: llm.generate(prompts, params, use_tqdm=False))

    outputs = [list(o.outputs[0].token_ids) for o in outs]
    check_outputs(spec, outputs)
    s = llm.last_run_stats.to_dict()
    cfg = llm.config
    result = Result(
        engine=f"batchllm-{args.policy}", version=batchllm.__version__, start_s=start_s, warmup_s=warmup_s,
        batch_s=batch_s, outputs=outputs, prompt_tokens=spec.prompt_tokens,
        output_tokens=sum(len(o) for o in outputs),
        config=dict(policy=args.policy, dtype=spec.dtype, threads=spec.threads, block_size=block,
                    num_kv_blocks=s.get("num_kv_blocks"), kv_tokens=s.get("num_kv_blocks", 0) * block,
                    max_num_batched_tokens=cfg.max_num_batched_tokens,
                    max_num_seqs=cfg.effective_max_num_seqs(), attention=cfg.attention),
        notes=f"prefix saving {s['saving']:.1%}; peak KV {s['peak_kv_tokens']} tokens",
        stats={k: s[k] for k in STATS if k in s},
    )
    write_result(args.out, result)
    print(f"batchllm[{args.policy}]: start {start_s:.2f} s, warm-up {warmup_s:.2f} s, batch {batch_s:.2f} s "
          f"({result.output_tokens / batch_s:.0f} output tok/s)")


if __name__ == "__main__":
    main()
