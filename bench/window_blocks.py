"""Would freeing KV blocks that have left every window pay? Counts, no timings.

A tiny Mistral with sliding window W on every layer runs a shared-prefix workload (32 requests in
4 groups, 200-600-token shared stems plus 20-200 own tokens, 256 output tokens each) under the
batchllm policy. Each step it records the blocks its sequences hold and the blocks some row of
the step still sees on a windowed layer: the difference is what freeing could give back.

    python bench/window_blocks.py [--windows 4096,512,128]
"""

from __future__ import annotations

import argparse
import random
import tempfile

from batchllm import LLM, SamplingParams
from batchllm.testing import make_tiny_model

BLOCK = 16


def count(window: int) -> dict[str, float]:
    path = make_tiny_model(tempfile.mkdtemp(), "mistral", shape="test", sliding_window=window)
    rng = random.Random(0)
    stems = [[rng.randrange(5, 1000) for _ in range(rng.randint(200, 600))] for _ in range(4)]
    prompts = [stems[i % 4] + [rng.randrange(5, 1000) for _ in range(rng.randint(20, 200))] for i in range(32)]
    llm = LLM(str(path), dtype="float32", num_kv_blocks=4096, block_size=BLOCK, policy="batchllm")
    runner, held, seen = llm.engine.runner, [], []
    run = runner.run

    def counting(out):  # type: ignore[no-untyped-def]
        all_blocks, in_window = set(), set()
        for seq, n in zip(out.seqs, out.num_tokens):
            end = -(-(seq.num_computed_tokens + n) // BLOCK)
            first = max(0, seq.num_computed_tokens - window + 1) // BLOCK  # the step's first row sees from here
            all_blocks.update(seq.block_table[:end])
            in_window.update(seq.block_table[first:end])
        held.append(len(all_blocks))
        seen.append(len(in_window))
        return run(out)

    runner.run = counting  # type: ignore[method-assign]
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=256, ignore_eos=True), use_tqdm=False)
    return {"peak_held": max(held), "peak_in_window": max(seen), "mean_held": sum(held) / len(held),
            "mean_in_window": sum(seen) / len(seen), "steps": len(held)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", default="4096,512,128")
    for w in map(int, ap.parse_args().windows.split(",")):
        c = count(w)
        print(f"window {w:5d}: blocks held peak {c['peak_held']}, mean {c['mean_held']:.0f}; "
              f"inside a window peak {c['peak_in_window']}, mean {c['mean_in_window']:.0f} ({c['steps']} steps)")


if __name__ == "__main__":
    main()
