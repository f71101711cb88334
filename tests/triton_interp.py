"""The Triton executor under triton's interpreter, for tests on CPU tensors.

`triton.jit` decides at decoration time whether a kernel is interpreted, and triton reads the
variable again at launch (its lazily imported parts assert it), so TRITON_INTERPRET is set before
the first import of the kernel modules and stays set in this test process. Only triton reads it,
and nothing else here imports triton: the CPU engine tests never do (test_triton_executor checks
it), and the ahead-of-time test compiles in a subprocess without the variable.
"""

from __future__ import annotations

import importlib.util
import os
import sys

KERNEL_MODULES = ("batchllm.kernels.triton.attend", "batchllm.kernels.triton.merge",
                  "batchllm.attention.triton_executor")


def interpreted_executor_class():
    """`TritonExecutor` with interpreted kernels, or None where triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    fresh = not any(m in sys.modules for m in KERNEL_MODULES)
    os.environ["TRITON_INTERPRET"] = "1"
    from batchllm.attention import triton_executor

    assert triton_executor.INTERPRETED, f"the kernels were imported before, not interpreted (fresh: {fresh})"
    return triton_executor.TritonExecutor
