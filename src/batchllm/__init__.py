"""batchllm: offline batch LLM inference with global prefix sharing."""

from batchllm.llm import LLM
from batchllm.outputs import CompletionOutput, RequestOutput, RunStats
from batchllm.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RunStats", "__version__"]
