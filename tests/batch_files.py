"""What the command-line tests share: the engine flags, a CLI call, an OpenAI batch line, a plan
run with torch unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
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


def plan_without_torch(model: Path, tmp_path: Path) -> None:
    """`batchllm plan --json` on a 2-line file for `model` (a folder or a GGUF file) succeeds in a
    process where torch cannot be imported, and reports both requests."""
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"prompt": "the same long start, then a", "max_tokens": 4}\n'
                     '{"prompt": "the same long start, then b", "max_tokens": 4}\n')
    code = ("import sys; sys.modules['torch'] = None\nfrom batchllm.cli import main\n"
            f"sys.exit(main(['plan', '-i', {str(batch)!r}, '--model', {str(model)!r}, '--json']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert (report["requests"], report["invalid"], report["plan"]["logical_prefill_tokens"] > 0) == (2, 0, True)
