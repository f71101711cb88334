"""llama.cpp (llama-cpp-python, low-level API) behind the peer-runner interface.

    bench/.venvs/llamacpp/bin/python bench/peers/run_llamacpp.py SPEC.json OUT.json
        [--n-seq-max N] [--n-batch N] [--n-ubatch N] [--no-prefix-reuse] [--kv-type f16|bf16|f32]
        [--flash-attn auto|on|off]

The HF folder is converted once to a GGUF by to_gguf.py (cached in ~/.cache/batchllm/gguf; the
conversion time counts in start_s when it happens). Generation is batched by hand: one sequence id
per prompt in a context with per-sequence KV (kv_unified=False, n_seq_max parallel sequences, each
with n_ctx / n_seq_max cells), greedy argmax over llama_get_logits_ith.

KV capacity: n_seq_max = kv_tokens // (longest prompt + max_tokens), so the tokens the sequences can
occupy fit in kv_tokens (llama.cpp pads each sequence's cells to a multiple of 256; the allocated
n_ctx is reported in config). Sequences run in waves of n_seq_max.

Prefix reuse: prompts sharing a prefix (the spec's "groups", else clusters of the lexicographically
sorted prompts whose common prefix is at least --min-prefix tokens) are placed in the same wave; the
prefix is prefilled once into one sequence and copied to the others with llama_memory_seq_cp (a copy
of the KV data: per-sequence KV cannot share cells), then only the suffixes are prefilled.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec import Result, Spec, base_parser, check_outputs, load_spec, timed, write_result  # noqa: E402

KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30}
FLASH = {"auto": -1, "off": 0, "on": 1}


# ---- prefix groups -------------------------------------------------------------------------------
def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_groups(spec: Spec, min_prefix: int) -> list[tuple[list[int], int]]:
    """[(prompt indices, shared prefix length)], covering every prompt once; singletons get 0."""
    prompts = spec.prompts
    if spec.groups:
        seen: set[int] = set()
        out = []
        for g in spec.groups:
            g = [i for i in g if i not in seen]
            seen.update(g)
            if g:
                pre = min((_lcp(prompts[g[0]], prompts[i]) for i in g[1:]), default=0)
                out.append((g, pre))
        out += [([i], 0) for i in range(len(prompts)) if i not in seen]
    else:
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        out, cur, pre = [], [order[0]], 0
        for i in order[1:]:
            l = _lcp(prompts[cur[0]], prompts[i])
            new_pre = l if len(cur) == 1 else min(pre, l)
            if l >= min_prefix and new_pre >= min_prefix:
                cur.append(i)
                pre = new_pre
            else:
                out.append((cur, pre if len(cur) > 1 else 0))
                cur, pre = [i], 0
        out.append((cur, pre if len(cur) > 1 else 0))
        out.sort(key=lambda g: min(g[0]))  # input order of the groups' first members
    # at least the last token of every member is computed per sequence (it gives the first logits)
    return [(g, min([pre] + [len(prompts[i]) - 1 for i in g]) if len(g) > 1 else 0) for g, pre in out]


def _prefill_cost(prompts: list[list[int]], wave: list[tuple[int, int, int]]) -> int:
    """Prompt tokens computed for a wave: a prefix shared by 2+ members of the wave is computed once."""
    by_group: dict[int, list[tuple[int, int]]] = {}
    for i, pre, gi in wave:
        by_group.setdefault(gi, []).append((i, pre))
    cost = 0
    for members in by_group.values():
        pre = members[0][1] if len(members) > 1 else 0
        cost += pre + sum(len(prompts[i]) - pre for i, _ in members)
    return cost


def plan_waves(prompts: list[list[int]], groups: list[tuple[list[int], int]], slots: int,
               prefix_reuse: bool) -> list[list[tuple[int, int, int]]]:
    """Waves of at most `slots` sequences, each entry (prompt index, shared prefix length, group id).
    Two candidates: groups laid out contiguously and cut every `slots` sequences, and groups packed
    first-fit-decreasing (split only when larger than a wave); the one with fewer waves (then fewer
    computed prompt tokens) wins."""
    items = [[(i, pre if prefix_reuse else 0, gi) for i in g] for gi, (g, pre) in enumerate(groups)]
    flat = [x for g in items for x in g]
    contiguous = [flat[k:k + slots] for k in range(0, len(flat), slots)]
    packed: list[list[tuple[int, int, int]]] = []
    for g in sorted(items, key=len, reverse=True):
        while len(g) > slots:
            packed.append(g[:slots])
            g = g[slots:]
        for w in packed:
            if len(w) + len(g) <= slots:
                w.extend(g)
                break
        else:
            packed.append(list(g))

    def key(plan: list[list[tuple[int, int, int]]]) -> tuple[int, int]:
        return len(plan), sum(_prefill_cost(prompts, w) for w in plan)

    return min((contiguous, packed), key=key)


# ---- llama.cpp -----------------------------------------------------------------------------------
class Engine:
    def __init__(self, gguf_path: str, n_seq_max: int, n_ctx_seq: int, n_batch: int, n_ubatch: int,
                 threads: int, kv_type: str, flash_attn: str, verbose: bool) -> None:
        import llama_cpp as L
        import numpy as np

        self.L, self.np = L, np
        self._log_level = 0
        self.log: list[str] = []

        def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line's level
                self._log_level = level
            s = text.decode(errors="replace")
            self.log.append(s)
            if verbose or self._log_level >= 3:
                sys.stderr.write(s)

        self._log_cb = L.llama_log_callback(on_log)
        L.llama_log_set(self._log_cb, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(gguf_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = -(-n_ctx_seq // 256) * 256 * n_seq_max  # llama.cpp pads each sequence's cells to 256
        cp.n_seq_max = n_seq_max
        cp.n_batch = n_batch
        cp.n_ubatch = n_ubatch
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = False
        cp.type_k = cp.type_v = KV_TYPES[kv_type]
        cp.flash_attn_type = FLASH[flash_attn]
        cp.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the context")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.n_seq_max = n_seq_max
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_ctx_seq = L.llama_n_ctx_seq(self.ctx)
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.tok = np.ctypeslib.as_array(self.batch.token, shape=(n_batch,))
        self.pos = np.ctypeslib.as_array(self.batch.pos, shape=(n_batch,))
        self.nsq = np.ctypeslib.as_array(self.batch.n_seq_id, shape=(n_batch,))
        self.lgt = np.ctypeslib.as_array(self.batch.logits, shape=(n_batch,))
        self.seq_ptrs = [self.batch.seq_id[i] for i in range(n_batch)]
        self.computed_tokens = 0
        self.system_info = L.llama_print_system_info().decode(errors="replace").strip()

    def flash_attn_resolved(self) -> str:
        text = "".join(self.log)
        if "Flash Attention enabled" in text:
            return "enabled"
        if "Flash Attention disabled" in text or "flash_attn = disabled" in text:
            return "disabled"
        return "unknown"

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _argmax(self, i: int) -> int:
        p = self.L.llama_get_logits_ith(self.ctx, i)
        return int(self.np.ctypeslib.as_array(p, shape=(self.n_vocab,)).argmax())

    def decode(self, items: list[tuple[int, list[int], int, bool]]) -> dict[int, int]:
        """items: (seq id, tokens, first position, want next-token of the last token), seq ids ascending.
        Returns {seq id: greedy next token} for the items that want it."""
        out: dict[int, int] = {}
        n = 0
        pending: list[tuple[int, int]] = []  # (batch index, seq)

        def flush() -> None:
            nonlocal n, pending
            if n == 0:
                return
            self.batch.n_tokens = n
            rc = self.L.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} (no KV slot or error)")
            self.computed_tokens += n
            for bi, seq in pending:
                out[seq] = self._argmax(bi)
            n, pending = 0, []

        for seq, toks, p0, want in items:
            k = 0
            while k < len(toks):
                take = min(len(toks) - k, self.n_batch - n)
                self.tok[n:n + take] = toks[k:k + take]
                self.pos[n:n + take] = range(p0 + k, p0 + k + take)
                self.nsq[n:n + take] = 1
                self.lgt[n:n + take] = 0
                for j in range(n, n + take):
                    self.seq_ptrs[j][0] = seq
                k += take
                n += take
                if k == len(toks) and want:
                    self.lgt[n - 1] = 1
                    pending.append((n - 1, seq))
                if n == self.n_batch:
                    flush()
        flush()
        return out

    def generate(self, prompts: list[list[int]], groups: list[tuple[list[int], int]], max_tokens: int,
                 prefix_reuse: bool) -> tuple[list[list[int]], dict]:
        L = self.L
        outputs: list[list[int]] = [[] for _ in prompts]
        stats = dict(waves=0, shared_prefixes=0, copied_prefix_tokens=0)
        self.computed_tokens = 0
        for wave in plan_waves(prompts, groups, self.n_seq_max, prefix_reuse):
            stats["waves"] += 1
            L.llama_memory_clear(self.mem, True)
            # 1. each group's shared prefix, once, into the sequence of its first member in this wave
            first: dict[int, int] = {}
            members: dict[int, list[int]] = {}
            for slot, (i, pre, gi) in enumerate(wave):
                if pre > 0:
                    members.setdefault(gi, []).append(slot)
                    first.setdefault(gi, slot)
            shared = {gi for gi, m in members.items() if len(m) > 1}
            self.decode([(first[gi], prompts[wave[first[gi]][0]][:wave[first[gi]][1]], 0, False)
                         for gi in sorted(shared, key=lambda g: first[g])])
            for gi in shared:
                stats["shared_prefixes"] += 1
                for slot in members[gi][1:]:
                    L.llama_memory_seq_cp(self.mem, first[gi], slot, -1, -1)
                    stats["copied_prefix_tokens"] += wave[slot][1]
            # 2. suffixes (whole prompts where nothing is shared); the last token gives the first output
            start = [(wave[s][1] if wave[s][2] in shared else 0) for s in range(len(wave))]
            nxt = self.decode([(s, prompts[wave[s][0]][start[s]:], start[s], True) for s in range(len(wave))])
            for s in range(len(wave)):
                outputs[wave[s][0]].append(nxt[s])
            # 3. decode
            for t in range(1, max_tokens):
                nxt = self.decode([(s, [outputs[wave[s][0]][-1]], len(prompts[wave[s][0]]) + t - 1, True)
                                   for s in range(len(wave))])
                for s in range(len(wave)):
                    outputs[wave[s][0]].append(nxt[s])
        stats["computed_tokens"] = self.computed_tokens
        return outputs, stats


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--n-seq-max", type=int, default=None, help="parallel sequences (default: from kv_tokens)")
    ap.add_argument("--n-batch", type=int, default=2048)
    ap.add_argument("--n-ubatch", type=int, default=512)
    ap.add_argument("--no-prefix-reuse", action="store_true")
    ap.add_argument("--min-prefix", type=int, default=32, help="shortest prefix worth sharing (tokens)")
    ap.add_argument("--kv-type", default="f16", choices=sorted(KV_TYPES))
    ap.add_argument("--flash-attn", default="auto", choices=sorted(FLASH))
    ap.add_argument("--gguf", default=None, help="use this GGUF instead of converting spec.model")
    ap.add_argument("--verbose", action="store_true", help="print llama.cpp's log")
    args = ap.parse_args()
    spec = load_spec(args.spec)

    t0 = time.perf_counter()
    from to_gguf import cached_gguf
    import llama_cpp

    conv_s = 0.0
    converted = False
    if args.gguf:
        gguf_path = Path(args.gguf)
    else:
        gguf_path, converted = cached_gguf(spec.model, spec.dtype)
        conv_s = time.perf_counter() - t0
    need = spec.max_prompt_len() + spec.max_tokens
    n_seq_max = args.n_seq_max or max(1, min(len(spec.prompts), 256, spec.kv_tokens // need))
    eng = Engine(str(gguf_path), n_seq_max, need, args.n_batch, args.n_ubatch, spec.threads, args.kv_type,
                 args.flash_attn, args.verbose)
    start_s = time.perf_counter() - t0
    if eng.n_ctx_seq < need:
        raise RuntimeError(f"n_ctx_seq {eng.n_ctx_seq} < longest prompt + max_tokens {need}")

    groups = prefix_groups(spec, args.min_prefix)
    reuse = not args.no_prefix_reuse

    def warm_up() -> None:
        if spec.warmup():
            wspec = Spec(**{**spec.__dict__, "prompts": spec.warmup(), "groups": None})
            eng.generate(wspec.prompts, prefix_groups(wspec, args.min_prefix), spec.max_tokens, reuse)

    _, warmup_s = timed(warm_up)
    (outputs, st), batch_s = timed(lambda: eng.generate(spec.prompts, groups, spec.max_tokens, reuse))
    check_outputs(spec, outputs)

    n_shared = sum(1 for g, pre in groups if len(g) > 1 and pre > 0)
    decode_tokens = len(spec.prompts) * (spec.max_tokens - 1)
    prefill_computed = st["computed_tokens"] - decode_tokens
    used = "used" if reuse and st["shared_prefixes"] else "not used"
    result = Result(
        engine="llama.cpp", version=f"llama-cpp-python {llama_cpp.__version__}", start_s=start_s,
        warmup_s=warmup_s, batch_s=batch_s, outputs=outputs, prompt_tokens=spec.prompt_tokens,
        output_tokens=sum(len(o) for o in outputs),
        config=dict(n_seq_max=eng.n_seq_max, n_ctx=eng.n_ctx, n_ctx_seq=eng.n_ctx_seq,
                    kv_tokens_usable=eng.n_seq_max * need, n_batch=args.n_batch, n_ubatch=args.n_ubatch,
                    kv_unified=False, kv_type=args.kv_type, flash_attn=f"{args.flash_attn} ({eng.flash_attn_resolved()})", threads=spec.threads,
                    weights=spec.dtype, gguf=str(gguf_path), gguf_converted_now=converted,
                    gguf_convert_s=conv_s if converted else 0.0, prefix_reuse=reuse,
                    prefix_groups=n_shared, min_prefix=args.min_prefix, waves=st["waves"],
                    computed_prefill_tokens=prefill_computed, logical_prefill_tokens=spec.prompt_tokens,
                    shared_prefix_prefills=st["shared_prefixes"], copied_prefix_tokens=st["copied_prefix_tokens"],
                    system_info=eng.system_info),
        notes=(f"prefix reuse {used} ({st['shared_prefixes']} shared prefills via llama_memory_seq_cp, "
               f"{n_shared} prefix groups); waves of {eng.n_seq_max} sequences; KV {args.kv_type}"),
    )
    write_result(args.out, result)
    print(f"llama.cpp: start {start_s:.2f} s, warm-up {warmup_s:.2f} s, batch {batch_s:.2f} s "
          f"({result.output_tokens / batch_s:.0f} output tok/s), n_seq_max {eng.n_seq_max}, "
          f"prefill computed {prefill_computed}/{spec.prompt_tokens}")
    eng.close()


if __name__ == "__main__":
    main()
