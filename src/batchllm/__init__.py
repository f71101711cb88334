"""batchllm: offline batch LLM inference with global prefix sharing.

`LLM` is imported on first use: it brings torch and the model code, which `batchllm --help`,
`batchllm plan` and the planner do not need.
"""

from typing import TYPE_CHECKING

from batchllm.openmp import prefer_passive_wait

prefer_passive_wait()  # before anything loads torch (and with it libgomp): see openmp.py

from batchllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RunStats
from batchllm.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from batchllm.llm import LLM

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics", "RunStats",
           "__version__"]


def __getattr__(name: str) -> object:
    if name == "LLM":
        from batchllm.llm import LLM

        return LLM
    raise AttributeError(f"module 'batchllm' has no attribute {name!r}")
