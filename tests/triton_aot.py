"""Compiles every Triton kernel specialisation for sm_90 ahead of time, no GPU needed (run by
test_triton_aot.py in a subprocess without TRITON_INTERPRET: the kernels must be JIT functions).

Usage: python tests/triton_aot.py  -> prints one line per compiled specialisation. To check the
kernels against another triton (the GPU machine's 3.6, say) without touching the environment:
pip install --no-deps --target DIR triton==3.6.0, then PYTHONPATH=DIR:src python tests/triton_aot.py.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

try:
    import batchllm  # noqa: F401
except ImportError:  # package not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from batchllm.attention import triton_executor  # noqa: E402
from batchllm.kernels.triton.attend import attend_tiles  # noqa: E402
from batchllm.kernels.triton.merge import merge_partials  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
ELEM = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNELS = {"attend_tiles": attend_tiles, "merge_partials": merge_partials}
# (dtype, heads, kv heads, head dim, block size): the benchmarked Llama-3-8B shape in bf16, an
# fp32 engine at the test models' shape (head dim 16: tl.dot's smallest K), GQA 8:1 at head dim
# 64 with 4-token blocks. Not here, to keep the test short: fp16 (the bf16 code with another
# element type) and fp32 at head dim 128 (compiles, ~15 s a specialisation with ieee dots).
SHAPES = [(torch.bfloat16, 32, 8, 128, 16), (torch.float32, 4, 2, 16, 16), (torch.bfloat16, 8, 1, 64, 4)]


def signature(name: str, dtype: torch.dtype, constants: dict) -> dict[str, str]:
    """Argument types of one launch: tensors of `dtype` (q, k, v, and out where it is not the
    float32 partials), int32 index tensors, i32 scalars."""
    fn = KERNELS[name]
    el = ELEM[dtype]
    if name == "attend_tiles":
        out_el = "fp32" if constants["WRITE_LSE"] else el
        ptrs = {"q_ptr": el, "k_ptr": el, "v_ptr": el, "out_ptr": out_el, "lse_ptr": "fp32" if constants["WRITE_LSE"]
                else out_el}
    else:
        ptrs = {"part_ptr": "fp32", "part_lse_ptr": "fp32", "out_ptr": el}
    sig = {}
    for arg in fn.arg_names:
        if arg in constants:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = "*" + ptrs[arg]
        elif arg.startswith(("item_", "q_", "tables", "row_off")):
            sig[arg] = "*i32"
        elif arg == "scale_log2":
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return sig


def main() -> int:
    seen = set()
    for dtype, heads, kvh, d, bs in SHAPES:
        for name, constants in triton_executor.specialisations(dtype, heads, kvh, d, bs):
            key = (name, dtype, tuple(sorted(constants.items())))
            if key in seen:
                continue
            seen.add(key)
            t = time.perf_counter()
            src = triton.compiler.ASTSource(fn=KERNELS[name], signature=signature(name, dtype, constants),
                                            constexprs=constants)
            compiled = triton.compile(src, target=H100)
            assert compiled.asm.get("cubin"), name
            print(f"ok {name} {ELEM[dtype]} {constants} {time.perf_counter() - t:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
