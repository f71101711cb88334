"""HF transformers behind the peer-runner interface: `generate` with left padding, SDPA, greedy.

    bench/.venvs/hf/bin/python bench/peers/run_hf.py SPEC.json OUT.json [--batch-size N]

No KV limit applies inside `generate`; the default batch size is what the spec's KV capacity holds
with padding (kv_tokens // (longest prompt + max_tokens)), at most 256. Prompts are sorted by length
before batching (less padding) and the outputs are returned in input order.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import Result, base_parser, check_outputs, load_spec, timed, write_result  # noqa: E402


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager)")
    ap.add_argument("--no-sort", action="store_true", help="batch in input order (more padding)")
    args = ap.parse_args()
    spec = load_spec(args.spec)

    import torch
    torch.set_num_threads(spec.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, spec.dtype)
    model, start_s = timed(lambda: AutoModelForCausalLM.from_pretrained(
        spec.model, dtype=dtype, attn_implementation=args.attn).eval())

    cfg = model.config
    pad_id = cfg.pad_token_id
    if pad_id is None:
        pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        eos = cfg.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) or 0
    longest = spec.max_prompt_len() + spec.max_tokens
    bs = args.batch_size or max(1, min(256, len(spec.prompts), spec.kv_tokens // longest))

    def run(prompts: list[list[int]]) -> list[list[int]]:
        order = list(range(len(prompts)))
        if not args.no_sort:
            order.sort(key=lambda i: len(prompts[i]))
        outs: list[list[int] | None] = [None] * len(prompts)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                p = prompts[i]
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            with torch.inference_mode():
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                     max_new_tokens=spec.max_tokens, min_new_tokens=spec.max_tokens,
                                     pad_token_id=pad_id, num_beams=1, temperature=None, top_p=None,
                                     top_k=None)
            for r, i in enumerate(idx):
                outs[i] = gen[r, width:].tolist()
        return outs  # type: ignore[return-value]

    _, warmup_s = timed(lambda: spec.warmup() and run(spec.warmup()))
    outputs, batch_s = timed(lambda: run(spec.prompts))
    check_outputs(spec, outputs)

    result = Result(
        engine="hf-transformers", version=transformers.__version__, start_s=start_s, warmup_s=warmup_s,
        batch_s=batch_s, outputs=outputs, prompt_tokens=spec.prompt_tokens,
        output_tokens=sum(len(o) for o in outputs),
        config=dict(batch_size=bs, attn_implementation=args.attn, dtype=spec.dtype, threads=spec.threads,
                    sorted_by_length=not args.no_sort, pad_token_id=pad_id, torch=torch.__version__,
                    padded_kv_tokens_per_batch=bs * longest),
        notes="generate() with left padding; no prefix reuse; min_new_tokens=max_new_tokens (ignore EOS)",
    )
    write_result(args.out, result)
    print(f"hf: start {start_s:.2f} s, warm-up {warmup_s:.2f} s, batch {batch_s:.2f} s "
          f"({result.output_tokens / batch_s:.0f} output tok/s), batch size {bs}")


if __name__ == "__main__":
    main()
