"""Slowdown beside a busy neighbour: each engine alone, then while one other process keeps one
core busy (a spin loop pinned to CPU 0, as `taskset -c 0 yes > /dev/null`).

Issue #19's case: 96 distinct 401-token prompts, 40 output tokens (greedy, ignore_eos), tiny
model, bf16, 2 threads. Each run is its own process through the peer-runner interface
(bench/peers/: run_batchllm.py with this environment's python, run_vllm.py from
bench/.venvs/vllm when installed, skipped otherwise). `--env NAME=VALUE` runs batchllm once more
per setting to find where the time goes: GOMP_SPINCOUNT=300000 is libgomp's default when no
wait policy is set (what batchllm ran with before it chose passive waiting, batchllm/openmp.py),
OMP_WAIT_POLICY=ACTIVE spins without end.

    python bench/bench_contention.py [--quick] [--repeats 3] [--engines batchllm,vllm]
        [--env GOMP_SPINCOUNT=300000 --env OMP_WAIT_POLICY=ACTIVE]

Writes bench/results/contention.json: per engine and setting, the batch seconds alone and busy
(each repeat), the median ratio, and the conditions (CPUs, load average before each run).
Run it on an otherwise idle machine: another process's load is exactly what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, model_folder, random_tokens

BENCH = Path(__file__).resolve().parent
PEERS = BENCH / "peers"
PYTHONS = {"batchllm": sys.executable, "vllm": str(BENCH / ".venvs" / "vllm" / "bin" / "python")}
SCRIPTS = {"batchllm": "run_batchllm.py", "vllm": "run_vllm.py"}


def busy_neighbour(cpu: int) -> subprocess.Popen[bytes]:
    """A process spinning on `cpu` (pinned) until killed."""
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def run_once(engine: str, spec: Path, env: dict[str, str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        load = os.getloadavg()[0]
        proc = subprocess.run([PYTHONS[engine], str(PEERS / SCRIPTS[engine]), str(spec), str(out)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
        if proc.returncode != 0 or not out.exists():
            return dict(error=f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-800:]}", load_before=load)
        r = json.loads(out.read_text())
        return dict(batch_s=r["batch_s"], load_before=load)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 prompts of 201 tokens, 16 outputs (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="batchllm,vllm")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="an extra batchllm setting to measure (repeatable; each alone)")
    ap.add_argument("--busy-cpu", type=int, default=0, help="the CPU the neighbour spins on")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args()
    n, length, out_tokens = (24, 201, 16) if args.quick else (96, 401, 40)
    rng = random.Random(0)
    prompts = [random_tokens(rng, length) for _ in range(n)]
    spec_d = dict(name="contention", model=model_folder("tiny"), prompts=prompts, max_tokens=out_tokens,
                  kv_tokens=65_536, threads=2, dtype="bfloat16", warmup_prompts=2, groups=[])
    settings: list[tuple[str, str, dict[str, str]]] = []
    for engine in args.engines.split(","):
        if not Path(PYTHONS[engine]).exists():
            print(f"{engine}: not installed ({PYTHONS[engine]} missing: run bench/setup_peers.sh); skipped")
            continue
        settings.append((engine, "default", {}))
        if engine == "batchllm":
            for kv in args.env:
                name, _, value = kv.partition("=")
                settings.append((engine, kv, {name: value}))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(spec_d))
        for engine, label, env in settings:
            alone, busy = [], []
            for _ in range(args.repeats):
                alone.append(run_once(engine, spec, env, args.timeout))
                neighbour = busy_neighbour(args.busy_cpu)
                try:
                    time.sleep(0.5)
                    busy.append(run_once(engine, spec, env, args.timeout))
                finally:
                    neighbour.kill()
                    neighbour.wait()
            ok = [(a["batch_s"], b["batch_s"]) for a, b in zip(alone, busy) if "batch_s" in a and "batch_s" in b]
            ratio = statistics.median(b / a for a, b in ok) if ok else None
            rows.append(dict(engine=engine, setting=label, alone=alone, busy=busy, median_ratio=ratio))
            print(f"{engine:9s} {label:28s} alone {[round(a, 2) for a, _ in ok]} busy {[round(b, 2) for _, b in ok]} "
                  f"-> x{ratio:.2f}" if ratio else f"{engine} {label}: failed {alone + busy}", flush=True)
    path = RESULTS / "contention.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(workload=dict(prompts=n, prompt_tokens=length, max_tokens=out_tokens),
                                    cpus=os.cpu_count(), affinity=sorted(os.sched_getaffinity(0)),
                                    busy_cpu=args.busy_cpu, quick=args.quick, rows=rows), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
