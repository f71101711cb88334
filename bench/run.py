"""The peer benchmark: batchllm against vLLM (CPU build), llama.cpp and HF transformers on this
machine, one command, side by side, plus the machine's own limit.

    bash bench/setup_peers.sh            # once: one virtual environment per peer
    python bench/run.py --quick          # minutes: the tiny model on small versions of 3 workloads
    python bench/run.py                  # the full run (about an hour)

Writes bench/results/REPORT.md, bench/results/peers[-quick].json and PNG plots. Every engine runs
as its own process through the runner interface of bench/peers/spec.py; a peer whose virtual
environment is missing or whose run fails is reported as such, never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import RESULTS, model_folder
from hardware import measure_peak, unavoidable_flops
from report import write_report
from workloads import WORKLOADS

BENCH = Path(__file__).resolve().parent
VENVS = BENCH / ".venvs"

# engine name -> (python, runner script, extra arguments)
ENGINES = {
    "batchllm": (sys.executable, "run_batchllm.py", ["--policy", "batchllm"]),
    "batchllm-fcfs-lru": (sys.executable, "run_batchllm.py", ["--policy", "fcfs-lru"]),
    "vllm": (str(VENVS / "vllm" / "bin" / "python"), "run_vllm.py", []),
    "llama.cpp": (str(VENVS / "llamacpp" / "bin" / "python"), "run_llamacpp.py", []),
    "hf": (str(VENVS / "hf" / "bin" / "python"), "run_hf.py", []),
}
QUICK_WORKLOADS = "micro,decode-heavy,no-sharing"


def run_engine(engine: str, spec_path: Path, out_path: Path, timeout: float) -> dict:
    """Run one engine on one spec in its own process; return its result or an error record."""
    python, script, extra = ENGINES[engine]
    if not Path(python).exists():
        return dict(engine=engine, error=f"not installed ({python} missing: run bench/setup_peers.sh)")
    cmd = [python, str(BENCH / "peers" / script), str(spec_path), str(out_path), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(engine=engine, error=f"timed out after {timeout:.0f} s")
    log = (proc.stdout + proc.stderr)[-3000:]
    (out_path.parent / (out_path.stem + ".log")).write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not out_path.exists():
        return dict(engine=engine, error=f"exit {proc.returncode}: {log[-600:]}")
    result = json.loads(out_path.read_text())
    result["engine"] = engine
    result["process_s"] = time.perf_counter() - t0
    return result


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """Greedy agreement of a peer with batchllm: first tokens, all positions, whole sequences."""
    pairs = list(zip(ours, theirs))
    positions = sum(len(a) for a, _ in pairs) or 1
    return dict(first_token=sum(a[:1] == b[:1] for a, b in pairs) / len(pairs),
                tokens=sum(x == y for a, b in pairs for x, y in zip(a, b)) / positions,
                sequences=sum(a == b for a, b in pairs) / len(pairs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, small workloads (minutes)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--workloads", default=None, help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--shapes", default=None, help="model shapes (default tiny,small; --quick: tiny)")
    ap.add_argument("--small-workloads", default="micro",
                    help="workloads also run on the small shape (the full set takes hours there)")
    ap.add_argument("--small-engines", default="batchllm,vllm,llama.cpp,hf",
                    help="engines run on the small shape (our fcfs-lru baseline alone takes ~10 min there)")
    ap.add_argument("--merge", action="store_true",
                    help="keep what this invocation does not repeat: other workloads from the previous "
                         "report, other engines' last results on the same workload spec (marked as earlier "
                         "runs; `--engines ''` only rebuilds the report)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per engine run")
    ap.add_argument("--profile", default="micro,no-sharing",
                    help="workloads (tiny shape) whose batchllm time is broken down by bench/profile_engine.py")
    args = ap.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    if not engines and not args.merge:
        ap.error("no engines to run: `--engines ''` only rebuilds a report with --merge")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    shapes = (args.shapes or ("tiny" if args.quick else "tiny,small")).split(",")
    names = (args.workloads or (QUICK_WORKLOADS if args.quick else ",".join(WORKLOADS))).split(",")
    tag = "peers-quick" if args.quick else "peers"
    raw = RESULTS / tag
    raw.mkdir(parents=True, exist_ok=True)

    runs, peaks = [], {}
    for shape in shapes:
        model = model_folder(shape)
        cfg = json.loads((Path(model) / "config.json").read_text())
        if engines:  # NOTE: a report-only merge keeps the peak measured with the runs it reports
            peaks[shape] = measure_peak(cfg, args.threads).to_dict()
            print(f"[{shape}] bf16 GEMM peak {peaks[shape]['gemm_gflops']:.0f} GFLOP/s, copy "
                  f"{peaks[shape]['copy_gb_s']:.0f} GB/s", flush=True)
        for name in names:
            if shape != "tiny" and name not in args.small_workloads.split(","):
                continue
            wl = WORKLOADS[name](args.quick)
            spec_path = raw / f"{shape}-{name}.spec.json"
            spec_path.write_text(json.dumps(wl.spec(model, args.threads)))
            flops = unavoidable_flops(cfg, wl.prompts, wl.max_tokens)
            results = {}
            for engine in [e for e in engines if shape == "tiny" or e in args.small_engines.split(",")]:
                r = run_engine(engine, spec_path, raw / f"{shape}-{name}-{engine}.json", args.timeout)
                results[engine] = r
                msg = r.get("error") or f"start {r['start_s']:.1f} s, batch {r['batch_s']:.2f} s"
                print(f"[{shape}] {name:13s} {engine:18s} {msg}", flush=True)
            for engine in ENGINES if args.merge else ():
                earlier = raw / f"{shape}-{name}-{engine}.json"
                if engine not in results and earlier.exists():  # same seeded spec, an earlier invocation
                    r = json.loads(earlier.read_text())
                    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(earlier.stat().st_mtime))
                    results[engine] = dict(r, engine=engine, notes=f"earlier invocation ({when}); {r.get('notes', '')}")
            ours = results.get("batchllm", {}).get("outputs")
            for engine, r in results.items():
                if ours is not None and "outputs" in r:
                    r["agreement"] = agreement(ours, r["outputs"])
                r.pop("outputs", None)
            runs.append(dict(shape=shape, workload=name, description=wl.description,
                             requests=len(wl.prompts), prompt_tokens=sum(map(len, wl.prompts)),
                             output_tokens=len(wl.prompts) * wl.max_tokens, kv_tokens=wl.kv_tokens,
                             unavoidable_gflop=flops / 1e9, results=results))
    data = dict(quick=args.quick, date=time.strftime("%Y-%m-%d %H:%M"), machine=machine(),
                command=" ".join(["python bench/run.py", *sys.argv[1:]]), peaks=peaks, runs=runs)
    profile = []
    for name in [n for n in args.profile.split(",") if n in names and "tiny" in shapes]:
        out = raw / f"tiny-{name}-profile.json"
        cmd = [sys.executable, str(BENCH / "profile_engine.py"), str(raw / f"tiny-{name}.spec.json"), "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        profile += (proc.stdout.strip().splitlines() if proc.returncode == 0
                    else [f"profile of {name} failed: {proc.stderr[-400:]}"]) + [""]
    data["profile"] = profile
    if args.merge and (RESULTS / f"{tag}.json").exists():
        old = json.loads((RESULTS / f"{tag}.json").read_text())
        done = {(r["shape"], r["workload"]) for r in runs}
        order = {n: i for i, n in enumerate(WORKLOADS)}
        data["runs"] = sorted([r for r in old["runs"] if (r["shape"], r["workload"]) not in done] + runs,
                              key=lambda r: (r["shape"] != "tiny", order[r["workload"]]))
        data["peaks"] = {**old["peaks"], **peaks}
        data["profile"] = profile or old.get("profile", [])
        data["command"] = f"{old['command']}; then {data['command']}"
    (RESULTS / f"{tag}.json").write_text(json.dumps(data, indent=1))
    print(f"report: {write_report(data, RESULTS, tag, data['profile'])}")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version())


if __name__ == "__main__":
    main()
