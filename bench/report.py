"""REPORT.md and PNG plots from the peer benchmark's JSON (bench/run.py)."""

from __future__ import annotations

from pathlib import Path

PEERS = ("vllm", "llama.cpp", "hf")
# (workloads, peer, minimum batchllm speed-up) from the benchmark issue
TARGETS = [(("micro", "micro-long"), "vllm", 2.0), (("micro", "micro-long"), "llama.cpp", 3.0),
           (("micro", "micro-long"), "hf", 3.0), (("decode-heavy", "mixed"), "vllm", 1.3),
           (("no-sharing",), "vllm", 1.0)]
LIMIT_TARGET = ("micro", 0.70)


def _ok(r: dict) -> bool:
    return "error" not in r and r.get("batch_s", 0) > 0


def speedup(run: dict, peer: str) -> float | None:
    ours, theirs = run["results"].get("batchllm", {}), run["results"].get(peer, {})
    return theirs["batch_s"] / ours["batch_s"] if _ok(ours) and _ok(theirs) else None


def limit_fraction(run: dict, engine: str, peaks: dict) -> float | None:
    r = run["results"].get(engine, {})
    if not _ok(r):
        return None
    return run["unavoidable_gflop"] / peaks[run["shape"]]["gemm_gflops"] / r["batch_s"]


def _run_table(run: dict, peaks: dict) -> list[str]:
    rows = ["| engine | start s | batch s | tokens/s | output tok/s | batchllm speed-up | % of limit | "
            "agreement (first / tokens / sequences) | notes |", "|---|---|---|---|---|---|---|---|---|"]
    total = run["prompt_tokens"] + run["output_tokens"]
    for engine, r in run["results"].items():
        if not _ok(r):
            rows.append(f"| {engine} | | | | | | | | **no result**: {r.get('error', '?')[:200]} |")
            continue
        ratio = speedup(run, engine)
        a = r.get("agreement")
        agree = f"{a['first_token']:.0%} / {a['tokens']:.0%} / {a['sequences']:.0%}" if a else ""
        frac = limit_fraction(run, engine, peaks)
        speed = f"{ratio:.2f}x" if ratio else ""
        notes = r.get("notes", "").replace("|", "/").replace("\n", " ")[:160]
        rows.append(f"| {engine} | {r['start_s']:.1f} | {r['batch_s']:.2f} | {total / r['batch_s']:.0f} | "
                    f"{run['output_tokens'] / r['batch_s']:.0f} | {speed} | {frac:.1%} | {agree} | {notes} |")
    return rows


def _ours(run: dict) -> list[str]:
    lines = []
    for engine in ("batchllm", "batchllm-fcfs-lru"):
        s = run["results"].get(engine, {}).get("stats")
        if s:
            lines.append(f"- `{engine}`: computed prefill {s['computed_prefill_tokens']:,} of "
                         f"{s['logical_prefill_tokens']:,} logical tokens, peak KV {s['peak_kv_tokens']:,} tokens, "
                         f"{s['steps']} steps, {s['preemptions']} preemptions")
    return lines


def _targets(data: dict) -> list[str]:
    rows = ["| workload | shape | target | measured | met |", "|---|---|---|---|---|"]
    for run in data["runs"]:
        for names, peer, need in TARGETS:
            if run["workload"] in names:
                s = speedup(run, peer)
                got = f"{s:.2f}x" if s is not None else "no result" if peer in run["results"] else "not run"
                rows.append(f"| {run['workload']} | {run['shape']} | >= {need}x {peer} | {got} | "
                            f"{'yes' if s is not None and s >= need else '**no**'} |")
        if run["workload"] == LIMIT_TARGET[0]:
            f = limit_fraction(run, "batchllm", data["peaks"])
            rows.append(f"| {run['workload']} | {run['shape']} | >= {LIMIT_TARGET[1]:.0%} of limit | "
                        f"{'no result' if f is None else f'{f:.1%}'} | "
                        f"{'yes' if f is not None and f >= LIMIT_TARGET[1] else '**no**'} |")
    return rows


def plots(data: dict, out: Path, tag: str) -> list[str]:
    """Throughput bars and tokens-per-step series; returns the file names written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    runs = data["runs"]
    engines = sorted({e for r in runs for e in r["results"]}, key=lambda e: (e != "batchllm", e))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs)), 4))
    width = 0.8 / len(engines)
    for j, engine in enumerate(engines):
        ys = [(r["prompt_tokens"] + r["output_tokens"]) / r["results"][engine]["batch_s"]
              if _ok(r["results"].get(engine, {})) else 0 for r in runs]
        ax.bar([i + j * width for i in range(len(runs))], ys, width, label=engine)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))], [f"{r['workload']}\n{r['shape']}" for r in runs])
    ax.set_ylabel("tokens/s (prompt + output)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files = [f"{tag}-throughput.png"]
    fig.savefig(out / files[0], dpi=110)
    plt.close(fig)
    series = [r for r in runs if "stats" in r["results"].get("batchllm", {})]
    if series:
        fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.2 * len(series)), squeeze=False)
        for ax, r in zip(axes[:, 0], series):
            for engine in ("batchllm", "batchllm-fcfs-lru"):
                s = r["results"].get(engine, {}).get("stats")
                if s:
                    ax.plot(s["tokens_per_step"], label=engine, lw=0.8)
            ax.set_title(f"{r['workload']} ({r['shape']})", fontsize=9)
            ax.set_ylabel("tokens/step", fontsize=8)
            ax.legend(fontsize=7)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        files.append(f"{tag}-tokens-per-step.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    return files


def write_report(data: dict, out: Path, tag: str, profile: list[str] | None = None) -> Path:
    m, lines = data["machine"], []
    lines += [f"# batchllm against its peers ({'quick' if data['quick'] else 'full'} run)", "",
              f"Produced by `{data['command']}` on {data['date']}: {m['cpu']}, {m['cores']} cores, torch "
              f"{m['torch']}. Every engine runs the same random-weight model in bf16 on both cores, greedy with "
              "`ignore_eos` and fixed output lengths, with the same KV capacity in tokens where it has a knob; "
              "a warm-up run is excluded and engine start is reported separately. Throughput counts logical "
              "prompt tokens plus output tokens over the batch time. Agreement is greedy token agreement with "
              "batchllm (bf16 near-ties may differ late in a sequence; llama.cpp keeps an f16 KV cache).", "",
              "## Hardware limit", ""]
    for shape, p in data["peaks"].items():
        per = ", ".join(f"{k} {v:.0f}" for k, v in p["gemm_by_shape"].items())
        lines.append(f"- `{shape}`: bf16 GEMM peak **{p['gemm_gflops']:.0f} GFLOP/s** at M = 2048 ({per}); "
                     f"copy bandwidth {p['copy_gb_s']:.0f} GB/s; {p['threads']} threads.")
    lines += ["", "A workload's limit is its unavoidable FLOPs (each distinct prompt token once, each output token "
              "once, attention included) at the GEMM peak; `% of limit` is that time over the batch time.", ""]
    # NOTE: the targets are set for the full workloads; a quick run's small ones (batches of about a
    # second) only show that every engine runs.
    lines += ["## Targets", "", *(["Set for the full workloads (`python bench/run.py`); not judged on a quick run's "
                                   "small ones."] if data["quick"] else _targets(data)), ""]
    for run in data["runs"]:
        lines += [f"## {run['workload']} ({run['shape']})", "", f"{run['description']}; "
                  f"{run['prompt_tokens']:,} logical prompt tokens, {run['output_tokens']:,} output tokens, "
                  f"{run['unavoidable_gflop']:.0f} GFLOP unavoidable.", "", *_run_table(run, data["peaks"]), "",
                  *_ours(run), ""]
    if profile:
        lines += ["## Where batchllm's time goes", "", *profile, ""]
    files = plots(data, out, tag)
    if files:
        lines += ["## Plots", "", *[f"![{f}]({f})" for f in files], ""]
    else:
        lines += ["(No plots: matplotlib is not installed; `pip install matplotlib`.)", ""]
    path = out / ("REPORT.md" if not data["quick"] else "REPORT-quick.md")
    path.write_text("\n".join(lines))
    return path
