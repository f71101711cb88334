"""The `batchllm` command: run-batch, plan, demo, make-tiny-model (also `python -m batchllm`).

Exit codes: 0 success (invalid input lines are error records, not failures); 1 engine or
internal failure, or no request of the file succeeded; 2 usage error or refusal (OUT exists without --resume/--overwrite, resume
mismatch, bad flag); 130 interrupted by SIGINT/SIGTERM (finished results are kept; --resume).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchllm import __version__
from batchllm.batch_io.exit_codes import EXIT_FAILURE, EXIT_USAGE
from batchllm.config import ATTENTION_MODES, DEFAULT_MEMORY_UTILIZATION, DTYPE_ALIASES, POLICIES, EngineConfig, parse_size as _size


def parse_size(text: str) -> int:
    """Bytes from "2147483648", "2GiB", "512MiB", "1.5G", "4e9" (`config.parse_size` for argparse)."""
    try:
        return _size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (vLLM spellings; unset = engine default)")
    g.add_argument("--dtype", choices=tuple(DTYPE_ALIASES), metavar="DTYPE",
                   help="auto (the checkpoint's, default), float32 (float), bfloat16, float16 (half)")
    g.add_argument("--max-model-len", type=int, metavar="N", help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, metavar="N", help="running-sequence cap (default: policy's)")
    g.add_argument("--max-num-batched-tokens", type=int, metavar="N", help="tokens per step (default 2048)")
    g.add_argument("--block-size", type=int, metavar="N", help="KV block size in tokens (default 16)")
    g.add_argument("--seed", type=int, help="engine seed for unseeded sampled requests (default 0)")
    g.add_argument("--kv-cache-memory", type=parse_size, metavar="SIZE",
                   help="KV pool size, e.g. 4GiB (default: see --gpu-memory-utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, metavar="F",
                   help=f"without --kv-cache-memory: the share of the memory available at start that the engine "
                   f"may use, weights included; the KV pool gets the rest (default {DEFAULT_MEMORY_UTILIZATION})")
    g.add_argument("--num-kv-blocks", type=int, metavar="N",
                   help="KV pool size in blocks (overrides --kv-cache-memory)")
    g.add_argument("--policy", choices=POLICIES, help="scheduling policy (default batchllm)")
    g.add_argument("--attention", choices=ATTENTION_MODES, help="attention backend")
    g.add_argument("--device", help="torch device (default cpu)")


def _ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray (needs: pip install 'batchllm[ray]')")
    g.add_argument("--ray", metavar="ADDRESS", help="run on Ray replicas: 'local' starts a cluster on this machine, "
                   "else an existing cluster's address ('auto', HOST:PORT); the driver plans, each replica runs whole "
                   "prefix groups")
    g.add_argument("--replicas", type=int, metavar="N", help="engine replicas (with --ray; default 1)")
    each = g.add_mutually_exclusive_group()
    each.add_argument("--cpus-per-replica", type=float, metavar="C",
                      help="CPUs per replica, may be fractional; torch threads = max(1, int(C)) (default: the "
                      "cluster's CPUs less one, shared equally)")
    each.add_argument("--gpus-per-replica", type=float, metavar="G", help="GPUs per replica (sets --device cuda)")


def _ray_options(args: argparse.Namespace) -> Any:
    """`RayOptions` for --ray, None without it; ValueError for a bad combination."""
    extra = [f for f in ("replicas", "cpus_per_replica", "gpus_per_replica") if getattr(args, f) is not None]
    if args.ray is None:
        if extra:
            raise ValueError(f"--{extra[0].replace('_', '-')} needs --ray")
        return None
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    if importlib.util.find_spec("ray") is None:  # not imported here: --ray imports it where it runs
        raise ValueError("--ray needs Ray, which is not installed: pip install 'batchllm[ray]'")
    from batchllm.distributed.options import RayOptions

    return RayOptions(args.ray, args.replicas or 1, args.cpus_per_replica, args.gpus_per_replica)


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size", "seed",
             "kv_cache_memory", "gpu_memory_utilization", "num_kv_blocks", "policy", "attention", "device")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="batchllm", description="Offline batch LLM inference with global prefix sharing.",
                                 epilog="Start with: batchllm demo")
    ap.add_argument("--version", action="version", version=f"batchllm {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rb = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL) and write results as they finish",
                        description="Run every request of IN (OpenAI Batch API lines, or lines with just prompt/"
                        "messages) and append one OpenAI-shaped result line per request to OUT as it finishes. "
                        "Invalid lines become status-400 records in the error file; the rest runs. A manifest "
                        "(OUT.manifest.json) records the input hash, model and settings so --resume can check them. "
                        "Defaults: completions max_tokens 16 and temperature 1 (as OpenAI); chat without max_tokens "
                        "may use the rest of the context: min(max_model_len, KV pool) - prompt tokens.",
                        epilog="Exit codes: 0 done (even with invalid lines), 1 engine failure or no request "
                        "succeeded, 2 usage error or refusal, 130 interrupted (resume with --resume).")
    rb.add_argument("-i", "--input", required=True, type=Path, metavar="IN.jsonl")
    rb.add_argument("-o", "--output", required=True, type=Path, metavar="OUT.jsonl",
                    help="results file; - writes results (and error records, without --error-file) to stdout, "
                    "the report to stderr, and no manifest (no --resume)")
    rb.add_argument("--model", required=True, metavar="PATH", help="local Hugging Face model folder or GGUF file")
    rb.add_argument("--served-model-name", metavar="NAME", help="the results' model field (default: --model as given)")
    rb.add_argument("--error-file", type=Path, metavar="PATH", help="error records (default OUT.errors.jsonl)")
    mode = rb.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue a job: skip every request already in OUT or the error file")
    mode.add_argument("--overwrite", action="store_true", help="delete OUT, its error file and manifest first")
    rb.add_argument("--stats-json", type=Path, metavar="PATH", help="also write the final report as JSON")
    rb.add_argument("--log-interval", type=float, default=5.0, metavar="S",
                    help="seconds between progress lines when stderr is not a terminal (default 5)")
    _engine_flags(rb)
    _ray_flags(rb)

    pl = sub.add_parser("plan", help="tokenize and plan a batch file without running the model",
                        description="Parse and tokenize IN like run-batch (without loading weights), then print the "
                        "prefix-sharing plan: requests, logical vs planned prefill tokens, saving, the multi-level "
                        "optimum, groups and share degrees, and the expected KV need.")
    pl.add_argument("-i", "--input", required=True, type=Path, metavar="IN.jsonl")
    pl.add_argument("--model", required=True, metavar="PATH")
    pl.add_argument("--json", action="store_true", help="print the numbers as JSON")
    _engine_flags(pl)

    de = sub.add_parser("demo", help="run a sample batch on a small real model and print the report",
                        description="Download SmolLM2-135M-Instruct (93 MB, once) into the cache ($BATCHLLM_CACHE or "
                        "~/.cache/batchllm), write a sample batch of questions about short texts (the requests "
                        "share long prefixes; two lines are bad on purpose), run it and print the report and "
                        "some answers. Without the download it runs a tiny random-weight model instead.")
    de.add_argument("--out-dir", type=Path, help="where the files go (default: demo/ in the cache folder)")
    de.add_argument("--model", metavar="PATH", help="use this model (folder or GGUF file) instead")
    de.add_argument("--shape", choices=("tiny", "small", "test"), help="run a random-weight model of this shape instead (tiny, small, test)")

    # NOTE: listed for --help only: `main` hands everything after "eval" to lm-eval unparsed.
    sub.add_parser("eval", help="run lm-evaluation-harness's command line with the 'batchllm' model registered",
                   description="batchllm eval ARGS: lm-eval's own command line (`lm-eval ARGS`) with the "
                   "'batchllm' model registered, e.g. batchllm eval --model batchllm --model_args "
                   "pretrained=PATH,dtype=bfloat16 --tasks mmlu. Needs: pip install 'batchllm[lm-eval]'.")
    mk = sub.add_parser("make-tiny-model", help="write a small random Hugging Face-style model folder",
                        description="Write a loadable model folder with random weights (for tests and demos).")
    mk.add_argument("path", type=Path, metavar="PATH")
    mk.add_argument("--arch", choices=("llama", "qwen2", "mistral", "qwen3"), default="llama")
    mk.add_argument("--shape", choices=("tiny", "small", "test"), default="tiny",
                    help="tiny (8 layers x 512), small (16 x 1024) or test (2 x 64)")
    mk.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--force", action="store_true", help="write into PATH even if it is not empty")
    return ap


def _resume_command(argv: Sequence[str]) -> str:
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["batchllm", *args])


def _cmd_run_batch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from batchllm.batch_io.job import JobOptions, run_batch

    try:
        ray = _ray_options(args)
    except ValueError as e:
        return _usage(str(e), "run-batch")
    return run_batch(JobOptions(
        input=args.input, output=args.output, model=args.model, engine_kwargs=_engine_kwargs(args),
        error_file=args.error_file, resume=args.resume, overwrite=args.overwrite, stats_json=args.stats_json,
        resume_command=None if str(args.output) == "-" else _resume_command(argv), log_interval=args.log_interval,
        served_model_name=args.served_model_name, ray=ray))


def _cmd_plan(args: argparse.Namespace) -> int:
    from batchllm.batch_io.planning import plan_file

    if not args.input.is_file():
        return _usage(f"input file {str(args.input)!r} does not exist", "plan")
    try:
        cfg = EngineConfig.from_kwargs(args.model, **_engine_kwargs(args))
        report = plan_file(args.input, cfg)
    except (ValueError, TypeError, OSError) as e:  # bad settings or model folder
        return _usage(str(e), "plan")
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from batchllm.batch_io.demo import run_demo
    from batchllm.config import cache_dir

    if args.model and not Path(args.model).exists():
        return _usage(f"model {args.model!r} does not exist", "demo")
    return run_demo(args.out_dir or cache_dir() / "demo", args.model, args.shape)


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from batchllm.testing import make_tiny_model

    if args.path.exists() and (not args.path.is_dir() or any(args.path.iterdir())) and not args.force:
        return _usage(f"{args.path} exists and is not an empty folder (use --force to write into it)",
                      "make-tiny-model")
    path = make_tiny_model(args.path, arch=args.arch, shape=args.shape, dtype=args.dtype, seed=args.seed)
    size = sum(f.stat().st_size for f in path.iterdir())
    print(f"wrote a random {args.arch} model ({args.shape}, {args.dtype}, {size / 2**20:.1f} MiB) to {path}")
    return 0


def _cmd_eval(argv: Sequence[str]) -> int:
    """lm-eval's command line (it loads no outside models) after registering "batchllm" with it."""
    try:
        from batchllm.integrations.lm_eval import run_command_line
    except ImportError as e:
        return _usage(f"needs lm-evaluation-harness ({e}); install it with: pip install 'batchllm[lm-eval]'", "eval")
    run_command_line(argv)
    return 0


def _usage(message: str, command: str) -> int:
    print(f"batchllm {command}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `batchllm` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        return _cmd_eval(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run-batch":
            return _cmd_run_batch(args, argv)
        if args.command == "plan":
            return _cmd_plan(args)
        if args.command == "demo":
            return _cmd_demo(args)
        return _cmd_make_tiny_model(args)
    except KeyboardInterrupt:
        print("batchllm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `batchllm plan ... | head`
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
