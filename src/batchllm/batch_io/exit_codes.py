"""Exit codes of the `batchllm` command, shared by the CLI and the run-batch job (no heavy imports)."""

EXIT_OK = 0
EXIT_FAILURE = 1  # engine or internal failure
EXIT_USAGE = 2  # usage error or refusal
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM; finished results are kept
