"""`python -m batchllm ...` runs the `batchllm` command line (see batchllm.cli)."""

import sys

from batchllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
