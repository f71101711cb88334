"""batchllm: offline batch LLM inference with global prefix sharing."""
