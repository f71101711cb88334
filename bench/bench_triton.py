"""The Triton attention kernels and the engine on one CUDA GPU (H100-class), in one run.

    cd REPO && PYTHONPATH=src python bench/bench_triton.py            # about 5-7 minutes
    PYTHONPATH=src python bench/bench_triton.py --skip-e2e           # kernels only, about a minute

Needs torch with CUDA, triton (3.6 or later) and, for the end-to-end part, transformers; no
network, no installs. Writes bench/results/triton-gpu.md and .json (partial results are written
after every part, so a run cut short still leaves what it measured). Parts:

1. versions and device;
2. kernels in bf16 at Llama-3-8B's attention shape (32 heads, 8 KV heads, head size 128, 16-token
   blocks), each against torch SDPA on contiguous K/V (what a dense engine would run), with their
   bandwidth and FLOP/s against the H100's ~3.35 TB/s and ~790 TFLOP/s (dense bf16), and their
   max error against the PyTorch executor: paged prefill, paged decode (many sequences, and few
   long ones: split KV), prefix-shared decode (16 members x 4K prefix) against the per-sequence
   Triton decode of the same queries;
3. end to end on a random Llama-3-8B-shaped model in bf16 (built here on the GPU, cached in
   BATCHLLM_CACHE or ~/.cache/batchllm): the micro workload (bench/workloads.py) under batchllm's
   `batchllm` and `fcfs-lru` policies and transformers' `generate`, each with its share of the
   workload's unavoidable FLOPs at peak (bench/hardware.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from common import CACHE, RESULTS  # noqa: E402

SMOKE = False  # --smoke: every code path on the CPU (triton's interpreter, a tiny model), no numbers
PEAK_TFLOPS = 790.0  # H100 SXM dense bf16
PEAK_TBPS = 3.35  # H100 SXM HBM3
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


def versions() -> dict:
    out = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    for name in ("triton", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
    except OSError:
        out["commit"] = None
    return out


def bench_ms(fn) -> float:
    """Median ms of `fn` (triton.testing.do_bench: warm-up, cache flush, CUDA events); once by
    the wall clock in a --smoke run (CPU, interpreter)."""
    if SMOKE:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free() -> None:
    """Give the last engine's weights and KV pool back before the next one loads its own."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# --- kernels -------------------------------------------------------------------------------------

def make_case(seqs: list[tuple[int, int, int, int]], dev: torch.device, gen: torch.Generator):
    """A step of sequences (query len, context len, shared prefix len, group id), each group's
    prefix blocks shared; returns the metadata, q and one layer's pool in bf16."""
    from batchllm.attention.metadata import build_metadata

    nxt, prefixes, tables = 1, {}, []
    for ql, ctx, shared, gid in seqs:
        if gid >= 0 and gid not in prefixes:
            prefixes[gid] = list(range(nxt, nxt + shared // BLOCK))
            nxt += shared // BLOCK
        own = -(-(ctx - shared) // BLOCK)
        tables.append((prefixes[gid] if gid >= 0 else []) + list(range(nxt, nxt + own)))
        nxt += own
    meta = build_metadata([s[0] for s in seqs], [s[1] for s in seqs], tables, BLOCK, dev,
                          shared_lens=[s[2] for s in seqs], group_ids=[s[3] for s in seqs])
    slots = nxt * BLOCK
    k = torch.randn(KV_HEADS, slots, HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
    v = torch.randn(KV_HEADS, slots, HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
    return meta, q, k, v


def sdpa_dense(seqs, dev, gen):
    """SDPA on contiguous per-sequence K/V (no paging, no sharing), sequences of equal shape
    batched: the dense baseline."""
    import torch.nn.functional as F

    ql, ctx = seqs[0][0], seqs[0][1]
    b = len(seqs)
    q = torch.randn(b, HEADS, ql, HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
    k = torch.randn(b, KV_HEADS, ctx, HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
    v = torch.randn(b, KV_HEADS, ctx, HEAD_DIM, generator=gen, device=dev).to(torch.bfloat16)
    causal = ql == ctx
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def attention_work(seqs) -> tuple[float, float]:
    """(FLOPs, unique KV bytes) of a step's attention: 4 * heads * d per (query, visible key)
    pair; each KV token read once per sequence (prefixes once per group when `shared`)."""
    pairs = sum(ql * (ctx - ql) + ql * (ql + 1) // 2 for ql, ctx, _, _ in seqs)
    flops = 4.0 * HEADS * HEAD_DIM * pairs
    kv_tokens = sum(ctx for _, ctx, _, _ in seqs)
    return flops, kv_tokens * 2 * KV_HEADS * HEAD_DIM * 2.0


def kernel_rows(dev: torch.device) -> list[dict]:
    from batchllm.attention.plan import Share, build_plan
    from batchllm.attention.torch_executor import TorchExecutor
    from batchllm.attention.triton_executor import TritonExecutor

    gen = torch.Generator(device=dev).manual_seed(0)
    scale = HEAD_DIM ** -0.5
    prefix = 4096
    members = [(1, prefix + 100, prefix, 0)] * 16
    if SMOKE:
        members = [(1, 80, 64, 0)] * 3
        cases = [("prefill", [(20, 20, 0, -1)] * 2, Share.NONE), ("decode", [(1, 70, 0, -1)] * 2, Share.NONE),
                 ("decode 16 members x 4K prefix, per sequence", members, Share.NONE),
                 ("decode 16 members x 4K prefix, prefix-shared", members, Share.DECODES)]
    else:  # name, sequences (q len, ctx, shared prefix, group), share
        cases = [
            ("prefill 4 x 2048 fresh (causal)", [(2048, 2048, 0, -1)] * 4, Share.NONE),
            ("prefill 8 x 512 chunk after 3584", [(512, 4096, 0, -1)] * 8, Share.NONE),
            ("decode 64 x 4096", [(1, 4096, 0, -1)] * 64, Share.NONE),
            ("decode 256 x 1100", [(1, 1100, 0, -1)] * 256, Share.NONE),
            ("decode 2 x 32768 (split KV)", [(1, 32768, 0, -1)] * 2, Share.NONE),
            ("decode 16 members x 4K prefix, per sequence", members, Share.NONE),
            ("decode 16 members x 4K prefix, prefix-shared", members, Share.DECODES),
            ("decode 16 groups x 16 members x 1K prefix, prefix-shared",
             [(1, 1100, 1024, g) for g in range(16) for _ in range(16)], Share.DECODES),
        ]
    rows = []
    for name, seqs, share in cases:
        row = dict(kernel=name)
        try:
            meta, q, k, v = make_case(seqs, dev, gen)
            plan = build_plan(meta, share)
            tex = TritonExecutor(dev, HEADS, KV_HEADS)
            prep = tex.prepare(plan)
            got = tex.run(q, k, v, prep, scale)
            ref = TorchExecutor(dev)
            want = ref.run(q, k, v, ref.prepare(build_plan(meta, Share.NONE)), scale)
            row["max_err_vs_torch"] = (got.float() - want.float()).abs().max().item()
            ms = bench_ms(lambda: tex.run(q, k, v, prep, scale))
            flops, kv_bytes = attention_work(seqs)
            if share is not Share.NONE:  # each group's prefix read once
                kv_bytes -= sum((g.num_members - 1) * g.num_keys for g in plan.groups) * 2 * KV_HEADS * HEAD_DIM * 2
            q_bytes = 2 * q.numel() * 2  # q read, out written
            row.update(triton_ms=ms, items=prep.work.num_items, block_m=prep.work.block_m, direct=prep.work.direct,
                       tflops=flops / ms / 1e9, tbps=(kv_bytes + q_bytes) / ms / 1e9)
            row["flops_share"] = row["tflops"] / PEAK_TFLOPS
            row["bw_share"] = row["tbps"] / PEAK_TBPS
            if len({(s[0], s[1]) for s in seqs}) == 1:
                row["sdpa_ms"] = bench_ms(sdpa_dense(seqs, dev, gen))
                row["speedup_vs_sdpa"] = row["sdpa_ms"] / ms
        except Exception as e:  # noqa: BLE001  (report and go on: one run, no second chance)
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        print(row, flush=True)
        rows.append(row)
    per_seq = next((r for r in rows if r["kernel"].endswith("4K prefix, per sequence")), {})
    shared = next((r for r in rows if r["kernel"].endswith("4K prefix, prefix-shared")), {})
    if "triton_ms" in per_seq and "triton_ms" in shared:
        shared["speedup_vs_per_sequence_triton"] = per_seq["triton_ms"] / shared["triton_ms"]  # target >= 5
    return rows


# --- end to end ----------------------------------------------------------------------------------

def model_folder(layers: int) -> str:
    """The random Llama-3-8B-shaped bf16 model (`layers` layers), weights drawn on the GPU."""
    import batchllm.testing as testing

    if SMOKE:
        return str(testing.make_tiny_model(CACHE / "bench-triton-smoke", shape="test", dtype="bfloat16"))
    path = CACHE / f"bench-llama3-8b-shape-{layers}l-bf16"
    if (path / "config.json").exists():
        return str(path)

    def gpu_random_weights(shapes, seed, dtype):  # same scales as testing._random_weights, ~100x faster
        gen = torch.Generator(device="cuda").manual_seed(seed)
        out = {}
        for name, shape in shapes.items():
            t = torch.randn(shape, generator=gen, device="cuda")
            t = t.mul_(0.1).add_(1.0) if "norm" in name else t if "embed_tokens" in name else t.mul_(
                0.02 if len(shape) == 1 else shape[-1] ** -0.5)
            out[name] = t.to(dtype).cpu()
        return out

    testing._random_weights = gpu_random_weights
    testing.make_tiny_model(path, arch="llama", shape="tiny", dtype="bfloat16", **{**LLAMA3_8B,
                                                                                  "num_hidden_layers": layers})
    return str(path)


def e2e_rows(model: str, quick: bool, deadline: float, kv_tokens: int) -> tuple[list[dict], dict]:
    from hardware import unavoidable_flops
    from workloads import micro

    wl = micro(quick)
    if SMOKE:
        wl.prompts, wl.max_tokens = [[5 + t % 1000 for t in p[:40]] for p in wl.prompts[:4]], 3  # test vocab
    cfg = json.loads((Path(model) / "config.json").read_text())
    limit_flops = unavoidable_flops(cfg, wl.prompts, wl.max_tokens)
    info = dict(workload=wl.description, unavoidable_tflop=limit_flops / 1e12,
                limit_s=limit_flops / (PEAK_TFLOPS * 1e12))
    rows = []
    for policy in ("batchllm", "fcfs-lru"):
        if time.monotonic() > deadline:
            rows.append(dict(engine=f"batchllm {policy}", error="skipped: out of time"))
            continue
        rows.append(run_batchllm(model, wl, policy, kv_tokens, limit_flops))
        free()
    if time.monotonic() > deadline:
        rows.append(dict(engine="transformers generate", error="skipped: out of time"))
    else:
        rows.append(run_hf(model, wl, limit_flops))
    by = {r["engine"]: r for r in rows}
    a, b = by.get("batchllm batchllm", {}), by.get("batchllm fcfs-lru", {})
    if "batch_s" in a and "batch_s" in b:
        info["batchllm_vs_fcfs_lru"] = b["batch_s"] / a["batch_s"]  # target >= 3
    return rows, info


def run_batchllm(model: str, wl, policy: str, kv_tokens: int, limit_flops: float) -> dict:
    row: dict = dict(engine=f"batchllm {policy}")
    try:
        from batchllm import LLM, SamplingParams

        t = time.perf_counter()
        llm = LLM(model, dtype="bfloat16", device=DEVICE, policy=policy, block_size=BLOCK,
                  num_kv_blocks=kv_tokens // BLOCK, max_num_batched_tokens=8192, cpu_kernels=False)
        row["start_s"] = time.perf_counter() - t
        row["executor"] = llm.engine.runner.backend.executor.kind.value
        params = SamplingParams(temperature=0, max_tokens=wl.max_tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in wl.prompts[:2]], params, use_tqdm=False)  # warm-up
        sync()
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=False)
        sync()
        row["batch_s"] = time.perf_counter() - t
        row["output_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
        stats = llm.last_run_stats.to_dict()
        row.update({k: stats[k] for k in ("steps", "saving", "prefix_shared_attention_steps") if k in stats})
        del llm
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    if "batch_s" in row:
        row["share_of_limit"] = limit_flops / (PEAK_TFLOPS * 1e12) / row["batch_s"]
    print(row, flush=True)
    return row


def run_hf(model: str, wl, limit_flops: float, batch: int = 64) -> dict:
    row: dict = dict(engine="transformers generate", batch_size=batch)
    try:
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").to(
            DEVICE).eval()
        row["start_s"] = time.perf_counter() - t
        pad = 4  # the tiny models' pad id

        def run(prompts):
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            n = 0
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[r, width - len(prompts[i]):] = 1
                with torch.inference_mode():
                    gen = hf.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), do_sample=False,
                                      max_new_tokens=wl.max_tokens, min_new_tokens=wl.max_tokens, pad_token_id=pad)
                n += (gen.shape[1] - width) * len(idx)
            return n

        run(wl.prompts[:2])
        sync()
        t = time.perf_counter()
        row["output_tokens"] = run(wl.prompts)
        sync()
        row["batch_s"] = time.perf_counter() - t
        row["share_of_limit"] = limit_flops / (PEAK_TFLOPS * 1e12) / row["batch_s"]
        del hf
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    print(row, flush=True)
    return row


# --- report --------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def write(result: dict, name: str) -> Path:
    """bench/results/<name>.md and .json (a --smoke run's go to the temp directory)."""
    out = Path(tempfile.gettempdir()) if SMOKE else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    md = [f"# Triton kernels and end to end on {result['versions'].get('device')}", "",
          f"Arguments: `{json.dumps(result['args'])}`.", "",
          "Written by `bench/bench_triton.py`. Peaks assumed: "
          f"{PEAK_TFLOPS:.0f} TFLOP/s bf16 dense, {PEAK_TBPS} TB/s.", "", "## Versions", "",
          table([result["versions"]]), "", "## Kernels (bf16, 32 heads, 8 KV heads, head size 128)", "",
          table(result.get("kernels", [])), ""]
    if result.get("e2e"):
        md += ["## End to end: micro workload, random Llama-3-8B-shaped model, bf16", "",
               "```", json.dumps(result.get("e2e_info", {}), indent=2), "```", "", table(result["e2e"]), ""]
    (out / f"{name}.md").write_text("\n".join(md))
    return out / name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-e2e", action="store_true", help="kernels only")
    ap.add_argument("--quick", action="store_true", help="the quick micro workload (4 groups x 8)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-8B-shaped model")
    ap.add_argument("--kv-tokens", type=int, default=65536, help="batchllm's KV pool, tokens")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what starts after this many seconds")
    ap.add_argument("--name", default="triton-gpu", help="results file name under bench/results/")
    ap.add_argument("--smoke", action="store_true", help="check every code path on the CPU (interpreter, tiny "
                    "shapes); writes <name>-smoke, measures nothing")
    args = ap.parse_args()
    start = time.monotonic()
    global SMOKE, DEVICE
    if args.smoke:
        SMOKE, DEVICE, args.name = True, "cpu", args.name + "-smoke"
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (--smoke checks it on the CPU)", file=sys.stderr)
        return 2
    random.seed(0)
    dev = torch.device(DEVICE)
    result: dict = dict(versions=versions(), args=vars(args))
    print(result["versions"], flush=True)
    result["kernels"] = kernel_rows(dev)
    write(result, args.name)
    if not args.skip_e2e:
        try:
            t = time.perf_counter()
            model = model_folder(args.layers)
            result["model_build_s"] = time.perf_counter() - t
            result["e2e"], result["e2e_info"] = e2e_rows(model, args.quick, start + args.budget_s, args.kv_tokens)
        except Exception as e:  # noqa: BLE001
            result["e2e_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    result["total_s"] = time.monotonic() - start
    path = write(result, args.name)
    print(f"wrote {path}.md/.json in {result['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
