"""Decode attention benchmark: reference vs prefix-shared paged attention on CPU.

G groups x m decoding members, each with a shared prefix of L tokens (rounded down to whole
blocks; the remainder joins the own part) and an own part of --own tokens. Tiny-model head
shapes by default (8 query heads, 2 KV heads, head_dim 64). Times one `forward` (one layer);
`prepare` runs once per step and is reported separately.

    python bench/bench_attention.py --rounds 3                  # G=4, m=16, L=1000, bf16 + fp32
    python bench/bench_attention.py --sweep --groups 1          # m x L grid behind MIN_SAVED_TOKENS
    python bench/bench_attention.py --rounds 3 --cold           # every call starts with its KV in memory

Warm (the default) repeats a call on the same KV, which then sits in the caches; `--cold` evicts
the caches before every timed call, as the engine's KV is: a layer's KV was last touched a whole
model pass ago, with the other layers' KV and all the weights read in between.

The dev machine has 2 cores shared with other jobs: each case first waits (up to --max-wait s)
for a quiet CPU, the two paths are timed interleaved, and the `stall` column reports the load
seen while measuring. Rows with a high stall (>~20%) are noise, not data.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hardware import gemm_gflops  # noqa: E402  (bench/, next to this script)

from batchllm.attention.cost import kv_bytes_read  # noqa: E402
from batchllm.attention.metadata import AttentionMetadata, build_metadata  # noqa: E402
from batchllm.attention.plan import Share, build_plan  # noqa: E402
from batchllm.attention.select import AUTO_SHARE, Mode, make_executor, plan_step, rows_per_prefix_read  # noqa: E402
from batchllm.attention.torch_executor import TorchExecutor  # noqa: E402
from batchllm.executor.malloc import keep_heap  # noqa: E402
from batchllm.kernels.cpu import load_cpu_kernels  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def decode_step(groups: int, members: int, prefix: int, own: int, bs: int) -> tuple[AttentionMetadata, int]:
    """Decode-only step metadata and the number of blocks the pool needs (block 0 = null)."""
    shared = prefix // bs * bs
    own_total = own + prefix - shared
    nxt, ql, ctx, bts, sl, gid = 1, [], [], [], [], []
    for g in range(groups):
        pre = list(range(nxt, nxt + shared // bs))
        nxt += len(pre)
        for _ in range(members):
            n_own = -(-own_total // bs)
            bts.append(pre + list(range(nxt, nxt + n_own)))
            nxt += n_own
            ql.append(1)
            ctx.append(shared + own_total)
            sl.append(shared)
            gid.append(g)
    meta = build_metadata(ql, ctx, bts, bs, torch.device("cpu"), shared_lens=sl, group_ids=gid)
    return meta, nxt


def calls_per_sample(fn: Callable[[], object], warmup: int, min_s: float) -> int:
    """Warm `fn` up and return how many calls make a sample of about `min_s` seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(1, int(min_s / max(best, 1e-6)))


def llc_bytes() -> int:
    """The last-level cache's size (Linux sysfs); 64 MiB where unknown."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError, IndexError):
        return 64 << 20


class Evictor:
    """Reads a buffer of twice the last-level cache, so whatever a call reads next comes from memory."""

    def __init__(self) -> None:
        self.buf = torch.ones(2 * llc_bytes() // 4)

    def __call__(self) -> None:
        self.buf.sum()


def paired_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, min_s: float,
                 before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each fn, `repeats` samples each, interleaved A B A B ...; `before`
    runs untimed ahead of every call (the cold mode's cache eviction).

    NOTE: interleaving puts both paths under the same background load (other engineers' jobs
    share the 2 cores), so the per-pair ratio is far steadier than either time alone.
    """
    inner = {n: calls_per_sample(f, warmup, min_s) for n, f in fns.items()}
    out: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            out[n].append(sample(f, inner[n], before))
    return out


def sample(fn: Callable[[], object], calls: int, before: Callable[[], object] | None) -> float:
    """Mean seconds of `calls` calls of fn; with `before`, each call is timed alone after it."""
    if before is None:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    total = 0.0
    for _ in range(calls):
        before()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / calls


def spread(xs: list[float]) -> float:
    """(p75 - p25) / median: the relative noise of a sample."""
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return (q[2] - q[0]) / q[1]


def cpu_stall_us() -> float:
    """Microseconds some task waited for a CPU (Linux PSI); NaN where unavailable."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return float("nan")


def wait_for_quiet(max_wait_s: float, threshold: float = 0.2, window_s: float = 0.5) -> None:
    """Sleep until a `window_s` window with CPU stall share below `threshold` (at most `max_wait_s`)."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        s0 = cpu_stall_us()
        time.sleep(window_s)
        if not (cpu_stall_us() - s0) / 1e6 / window_s >= threshold:  # NaN (no PSI) counts as quiet
            return


def decode_flops(meta: AttentionMetadata, heads: int, d: int) -> int:
    """Multiply-add FLOPs of a decode step's attention, one layer: every query head of every
    sequence against each of its keys, for the scores and again for the values. Sharing a prefix
    changes what is read, never this count."""
    return 4 * heads * d * sum(meta.context_lens)


def run_case(groups: int, members: int, prefix: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    meta, nblocks = decode_step(groups, members, prefix, args.own, args.block_size)
    gen = torch.Generator().manual_seed(0)
    kvh, d = args.kv_heads, args.head_dim
    k = torch.randn(kvh, nblocks * args.block_size, d, generator=gen).to(dtype)
    v = torch.randn(kvh, nblocks * args.block_size, d, generator=gen).to(dtype)
    q = torch.randn(meta.num_tokens, args.heads, d, generator=gen).to(dtype)
    bpt = 2 * kvh * d * k.element_size()  # K and V bytes per token per layer
    # NOTE: ref and ps run as the engine runs them (with the C kernels unless --no-kernels);
    # ref_pt is the all-PyTorch reference, timed too so both baselines stay visible.
    kernels = None if args.no_kernels else load_cpu_kernels()
    executor = make_executor(torch.device("cpu"), dtype, d, kernels)
    share = AUTO_SHARE[executor.kind][0]
    row = {"G": groups, "m": members, "L": prefix, "dtype": str(dtype).removeprefix("torch."),
           "cache": "cold" if args.cold else "warm", "auto": "prefix-shared" if plan_step(meta, Mode.AUTO, executor.kind).prefix_shared else "reference"}
    plans = {"ref": build_plan(meta, Share.NONE), "ps": build_plan(meta, share)}
    runs = {"ref": executor, "ps": executor}
    if kernels is not None:
        plans["ref_pt"], runs["ref_pt"] = plans["ref"], TorchExecutor(torch.device("cpu"))
    preps = {n: ex.prepare(plans[n]) for n, ex in runs.items()}
    fwd = {n: (lambda ex=ex, p=preps[n]: ex.run(q, k, v, p, d ** -0.5)) for n, ex in runs.items()}
    # NOTE: a step's prepare cost: building its plan and the executor's index tensors.
    prep_t = paired_times({n: (lambda ex=ex, s=plans[n].share: ex.prepare(build_plan(meta, s))) for n, ex in runs.items()},
                          5, 1, 0.005)
    wait_for_quiet(args.max_wait)
    stall0, t0 = cpu_stall_us(), time.perf_counter()
    # NOTE: cold: the queries are touched after the eviction, since in the engine they were just
    # computed; only the KV comes from memory.
    before = (lambda: (args.evict(), q.sum())) if args.cold else None
    times = paired_times(fwd, args.repeats, args.warmup, args.sample_s, before)
    # NOTE: share of the time other tasks waited for a core while we measured: a load indicator.
    row["stall"] = (cpu_stall_us() - stall0) / 1e6 / (time.perf_counter() - t0)
    for n in runs:
        row[f"{n}_prep_ms"] = statistics.median(prep_t[n]) * 1e3
        row[f"{n}_ms"] = statistics.median(times[n]) * 1e3
        row[f"{n}_MB"] = kv_bytes_read(plans[n], 1, bpt, rows_per_prefix_read(plans[n].share)) / 1e6
        row[f"{n}_GBs"] = row[f"{n}_MB"] / row[f"{n}_ms"]  # MB/ms == GB/s
    flops = decode_flops(meta, args.heads, d)
    for n in runs:
        row[f"{n}_GFs"] = flops / row[f"{n}_ms"] / 1e6
    # NOTE: both paths do the same multiply-adds, so no path can beat the step's FLOPs at the
    # machine's matrix-product peak: `ceiling` is the largest speed-up over ref that is possible.
    peak = args.bf16_peak if dtype == torch.bfloat16 else float("nan")
    row["peak_GFs"] = peak / 1e9
    row["ceiling"] = row["ref_ms"] / (flops / peak * 1e3)
    ratios = [r / p for r, p in zip(times["ref"], times["ps"])]
    row["speedup"] = statistics.median(ratios)  # median of paired ratios (robust to load bursts)
    row["vs_pt"] = statistics.median(r / p for r, p in zip(times.get("ref_pt", times["ref"]), times["ps"]))
    row["kernels"] = "C" if kernels is not None else "torch"
    row["spread"] = max(spread(times["ref"]), spread(times["ps"]))
    row["max_err"] = float((fwd["ref"]().float() - fwd["ps"]().float()).abs().max())
    return row


COLS = [("G", "{:>3}"), ("m", "{:>3}"), ("L", "{:>5}"), ("dtype", "{:>8}"), ("cache", "{:>5}"), ("kernels", "{:>7}"),
        ("ref_ms", "{:>8.3f}"), ("ps_ms", "{:>8.3f}"), ("speedup", "{:>7.2f}"), ("vs_pt", "{:>6.2f}"), ("ref_MB", "{:>8.2f}"), ("ps_MB", "{:>7.2f}"),
        ("ref_GBs", "{:>7.1f}"), ("ps_GBs", "{:>7.1f}"), ("ref_GFs", "{:>7.0f}"), ("ps_GFs", "{:>6.0f}"),
        ("peak_GFs", "{:>8.0f}"), ("ceiling", "{:>7.2f}"), ("ref_prep_ms", "{:>11.3f}"),
        ("ps_prep_ms", "{:>10.3f}"), ("auto", "{:>13}"), ("max_err", "{:>8.1e}"),
        ("spread", "{:>6.0%}"), ("stall", "{:>6.0%}"), ("sp_min", "{:>6.2f}"), ("sp_max", "{:>6.2f}")]


def print_row(r: dict, header: bool = False) -> None:
    if header:
        print(" ".join(f"{c:>{len(f.format(r[c]))}}" for c, f in COLS))
    print(" ".join(f.format(r[c]) for c, f in COLS), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--members", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--own", type=int, default=100)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sample-s", type=float, default=0.01, help="seconds per timing sample")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="m in {1,2,4,8,16,32} x L in {64,256,1000}")
    ap.add_argument("--max-wait", type=float, default=20.0,
                    help="seconds to wait for a quiet CPU (other jobs) before each case")
    ap.add_argument("--rounds", type=int, default=1, help="run all cases this many times; report medians")
    ap.add_argument("--no-kernels", action="store_true", help="time the all-PyTorch backends (no C kernels)")
    ap.add_argument("--cold", action="store_true",
                    help="evict the caches before every timed call (the engine's case) instead of timing warm repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_heap()  # NOTE: the engine's CPU allocator setting; without it gathers page-fault (2-4x slower)
    dtypes = [DTYPES[s] for s in args.dtypes.split(",")]
    args.evict = Evictor() if args.cold else None
    # NOTE: the ceiling of any attention path built, like the kernels, on the bf16 dot-product
    # instruction: the best bf16 GEMM (the tiny model's gate/up projection, a square 2,048). No fp32
    # counterpart: torch's fp32 GEMM reaches less here than the C kernels' fp32 loops.
    args.bf16_peak = max(gemm_gflops(2048, 512, 2816), gemm_gflops(2048, 2048, 2048)) * 1e9
    if args.sweep:
        cases = [(args.groups, m, L, dt) for dt in dtypes for L in (64, 256, 1000) for m in (1, 2, 4, 8, 16, 32)]
    else:
        cases = [(args.groups, args.members, args.prefix, dt) for dt in dtypes]
    print(f"# decode, {'cold: caches evicted before every call' if args.cold else 'warm'}, heads={args.heads} kv_heads={args.kv_heads} d={args.head_dim} own={args.own} "
          f"block={args.block_size} threads={args.threads}; ms per forward (one layer), median of "
          f"{args.repeats} interleaved samples; speedup = median of paired ref/ps ratios; vs_pt = the same "
          f"against the all-PyTorch reference; MB = KV bytes "
          f"read per layer-step; GB/s = MB / time; GF/s = attention GFLOP/s (both paths do the same "
          f"multiply-adds); peak_GFs = this machine's bf16 matrix-product GFLOP/s; ceiling = the largest "
          f"speedup over ref any bf16 path could reach (ref time / the FLOPs at that peak); spread = worst (p75-p25)/median of the two (noise); "
          f"stall = share of time other tasks waited for a core (load); sp_min/max = speedup range "
          f"over {args.rounds} round(s), each field is the median over rounds")
    # NOTE: rounds go over the whole case list, so a burst of background load hits one round of a
    # case, not all of them; the median over rounds then drops it.
    results: list[list[dict]] = [[] for _ in cases]
    for rnd in range(args.rounds):
        for n, (g, m, L, dt) in enumerate(cases):
            results[n].append(run_case(g, m, L, dt, args))
            if args.rounds > 1:
                print(f"# round {rnd + 1}/{args.rounds} case {n + 1}/{len(cases)}", file=sys.stderr, flush=True)
            else:
                print_row(summarize(results[n]), header=n == 0)
    if args.rounds > 1:
        for n, rs in enumerate(results):
            print_row(summarize(rs), header=n == 0)


def summarize(rows: list[dict]) -> dict:
    """Median over rounds of every numeric field, plus the speedup's range."""
    out = dict(rows[0])
    for key, val in rows[0].items():
        if isinstance(val, float):
            out[key] = statistics.median(r[key] for r in rows)
    out["sp_min"] = min(r["speedup"] for r in rows)
    out["sp_max"] = max(r["speedup"] for r in rows)
    return out


if __name__ == "__main__":
    main()
