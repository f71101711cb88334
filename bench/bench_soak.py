"""Soak: 20,000 requests through `batchllm run-batch`, killed once (SIGKILL) part-way and
resumed; memory must stay flat.

The input mixes completions and chat lines (chat without max_tokens included), shared system
prompts and distinct ones, greedy and seeded sampled, plus a few invalid lines. The job runs as a
subprocess whose resident memory (VmRSS, /proc) is sampled every `--interval` seconds together
with the result lines written so far. At `--kill-at` of the requests it is SIGKILLed, then
resumed with --resume. Checks: the resume exits 0, every valid custom_id appears exactly once,
the manifest logs the killed run as "killed", and RSS does not grow with the requests done (the
report gives peak RSS per quarter of each phase; flat = the resume's peak in its second half
within `--tolerance` of its peak in the first half: the first samples of a phase include model
loading and the first touch of the KV pool, which is why the pool is small here).

    python bench/bench_soak.py [--requests 20000] [--kill-at 0.4] [--interval 1] [--max-tokens 8]

Writes bench/results/soak.json (the samples and the summary). Smoke run:
    python bench/bench_soak.py --requests 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, model_folder

WORDS = ("the of and to a in is it that was for on are as with his they at be this have from or one had by word "
         "but not what all were we when your can said there use an each which she do how their if will up").split()


def text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_input(path: Path, n: int, max_tokens: int, seed: int = 0) -> int:
    """n request lines (and n // 1000 invalid ones); returns the number of valid requests."""
    rng = random.Random(seed)
    systems = [text(rng, 60) for _ in range(20)]
    with path.open("w") as f:
        for i in range(n):
            sys_prompt = rng.choice(systems)
            if i % 3 == 0:
                body = {"messages": [{"role": "system", "content": sys_prompt},
                                     {"role": "user", "content": text(rng, rng.randint(5, 40))}]}
                if i % 6 != 0:
                    body["max_tokens"] = max_tokens
                else:
                    body["stop"] = [rng.choice(WORDS)]  # no max_tokens: a stop word or the end of the context
                url = "/v1/chat/completions"
            else:
                body = {"prompt": sys_prompt + " " + text(rng, rng.randint(5, 40)), "max_tokens": max_tokens}
                url = "/v1/completions"
            body["temperature"] = 0 if i % 4 else 0.8
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}) + "\n")
            if i % 1000 == 999:
                f.write("{not json\n")
    return n


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def lines(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def phase(cmd: list[str], out: Path, interval: float, kill_at: int | None, t0: float) -> tuple[dict, list[dict]]:
    """Run cmd, sampling RSS and results; SIGKILL it once `kill_at` results are written."""
    samples = []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    while proc.poll() is None:
        done, rss = lines(out), rss_kib(proc.pid)
        if rss is not None:
            samples.append(dict(t=round(time.monotonic() - t0, 2), rss_kib=rss, results=done))
        if kill_at is not None and done >= kill_at and not killed:
            proc.send_signal(signal.SIGKILL)
            killed = True
        time.sleep(interval)
    err = proc.stderr.read() if proc.stderr else ""
    return dict(returncode=proc.returncode, killed=killed, stderr_tail=err[-1500:]), samples


def quarters(samples: list[dict]) -> list[int]:
    """Peak RSS (KiB) in each quarter of a phase's samples."""
    if not samples:
        return []
    k = max(1, len(samples) // 4)
    return [max(s["rss_kib"] for s in samples[i:i + k]) for i in range(0, len(samples), k)][:4]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--kill-at", type=float, default=0.4, help="fraction of requests done when it is killed")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-cache-memory", default="256MiB")
    ap.add_argument("--max-model-len", type=int, default=384,
                    help="context; bounds the chat lines without max_tokens (the random model rarely stops)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed growth, first to last quarter")
    ap.add_argument("--keep", type=Path, default=None, help="keep the job's files in this folder")
    args = ap.parse_args()
    model = model_folder("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        inp, out = work / "in.jsonl", work / "out.jsonl"
        for p in work.glob("out*"):
            p.unlink()
        n = make_input(inp, args.requests, args.max_tokens)
        base = [sys.executable, "-m", "batchllm", "run-batch", "-i", str(inp), "-o", str(out), "--model", model,
                "--dtype", "bfloat16", "--log-interval", "10", "--max-model-len", str(args.max_model_len),
                "--kv-cache-memory", args.kv_cache_memory]
        t0 = time.monotonic()
        first, s1 = phase(base, out, args.interval, int(args.kill_at * n), t0)
        second, s2 = phase(base + ["--resume"], out, args.interval, None, t0)
        ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
        manifest = json.loads((work / "out.manifest.json").read_text())
    q1, q2 = quarters(s1), quarters(s2)
    half = len(s2) // 2
    flat = half > 0 and (max(s["rss_kib"] for s in s2[half:]) <= max(s["rss_kib"] for s in s2[:half])
                         * (1 + args.tolerance))
    summary = dict(requests=n, results=len(ids), unique=len(set(ids)), killed_first=first["killed"],
                   resume_exit=second["returncode"], run_statuses=[r.get("status") for r in manifest["runs"]],
                   peak_rss_mib_first=round(max((s["rss_kib"] for s in s1), default=0) / 1024, 1),
                   peak_rss_mib_resume=round(max((s["rss_kib"] for s in s2), default=0) / 1024, 1),
                   quarter_peaks_mib_first=[round(x / 1024, 1) for x in q1],
                   quarter_peaks_mib_resume=[round(x / 1024, 1) for x in q2], flat=flat,
                   seconds=round(time.monotonic() - t0, 1))
    ok = (summary["unique"] == summary["results"] == n and second["returncode"] == 0 and first["killed"]
          and summary["run_statuses"][:1] == ["killed"])
    summary["ok"] = ok
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(dict(summary=summary, first=first, resume=second,
                                                       samples_first=s1, samples_resume=s2), indent=2))
    print(json.dumps(summary, indent=2))
    if not ok:
        print("soak FAILED:", first["stderr_tail"][-600:], second["stderr_tail"][-600:], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
