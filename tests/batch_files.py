"""What the command-line tests share: the engine flags, a CLI call, an OpenAI batch line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchllm.cli import main

ENGINE = ["--kv-cache-memory", "16MiB"]  # a small pool: the tests' tiny model needs little


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run `batchllm *argv` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def openai(cid: str, body: dict[str, Any], chat: bool = False) -> dict[str, Any]:
    """One OpenAI Batch API line for the completions (or chat) endpoint."""
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions" if chat else "/v1/completions",
            "body": body}
