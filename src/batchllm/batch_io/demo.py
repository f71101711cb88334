"""`batchllm demo`: a tiny random model, a sample batch with shared prefixes, one run, the report."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, TextIO

from batchllm.config import EngineConfig, cache_dir

from .job import JobOptions, run_batch
from .planning import plan_file
from .progress import log

DEMO_KV_CACHE_MEMORY = 256 * 2**20
_WORDS = ("river stone garden market winter engine letter harbor music paper silver forest bridge "
          "window candle orchard lantern meadow valley signal library island canyon ribbon").split()
_GLUE = "the of and to a in is it that was for on are as with at be this from or by".split()


def ensure_model(shape: str = "tiny", stream: TextIO | None = None) -> Path:
    """The cached random llama model of `shape` (bfloat16), built on first use (atomically)."""
    from batchllm.testing import make_tiny_model

    path = cache_dir() / f"{shape}-llama"
    if (path / "config.json").exists():
        return path
    log(f"building the {shape} random model in {path} (once) ...", stream)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make_tiny_model(tmp, arch="llama", shape=shape, dtype="bfloat16")
    try:
        os.replace(tmp, path)
    except OSError:  # built concurrently by another process: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def sample_lines(seed: int = 0) -> list[str]:
    """48 lines: 6 documents x 7 questions (completions), 4 chats sharing system prompts, 2 bad lines."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(_WORDS if k % 3 == 0 else _GLUE) for k in range(n)).capitalize() + "."

    lines: list[dict[str, Any]] = []
    for d in range(6):
        doc = "\n".join(text(20) for _ in range(6))
        for q in range(7):
            lines.append({"custom_id": f"doc{d}-q{q}", "method": "POST", "url": "/v1/completions",
                          "body": {"model": "tiny", "prompt": f"Document {d}:\n{doc}\n\nQuestion: {text(8)}\nAnswer:",
                                   "max_tokens": 12, "temperature": 0}})
    for k, system in enumerate(["You are a careful assistant. " + text(40), "You answer in one line. " + text(40)]):
        for j in range(2):
            lines.append({"custom_id": f"chat{k}-{j}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"messages": [{"role": "system", "content": system},
                                                {"role": "user", "content": text(10)}],
                                   "max_completion_tokens": 12, "temperature": 0}})
    raw = [json.dumps(line) for line in lines]
    raw.insert(10, '{"custom_id": "broken", "method": "POST", "url": "/v1/completions", "body": {"prompt": "cut off')
    raw.append(json.dumps({"custom_id": "too-hot", "method": "POST", "url": "/v1/completions",
                           "body": {"prompt": "Hello", "temperature": -1}}))
    return raw


def run_demo(out_dir: Path, model: str | None = None, shape: str = "tiny", stream: TextIO | None = None,
             report_stream: TextIO | None = None, tty: bool | None = None) -> int:
    """Write the sample batch to `out_dir`, run it, print the report; returns the exit code."""
    out = report_stream or sys.stdout
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(model) if model else ensure_model(shape, stream)
    requests = out_dir / "requests.jsonl"
    requests.write_text("\n".join(sample_lines()) + "\n")
    engine = {"kv_cache_memory": DEMO_KV_CACHE_MEMORY}
    plan = plan_file(requests, EngineConfig.from_kwargs(str(model_path), **engine))
    print(f"batchllm demo: {plan.requests} requests in {requests} (random weights: the text is noise, "
          f"the numbers are the point)\n{plan.plan.summary()}\n", file=out, flush=True)
    results = out_dir / "results.jsonl"
    code = run_batch(JobOptions(
        input=requests, output=results, model=str(model_path), engine_kwargs=engine, overwrite=True,
        stats_json=out_dir / "stats.json", stream=stream, report_stream=out, tty=tty,
        resume_command=f"batchllm run-batch -i {requests} -o {results} --model {model_path} "
                       f"--kv-cache-memory {DEMO_KV_CACHE_MEMORY} --resume"))
    if code == 0:
        first = json.loads(results.read_text().splitlines()[0])
        print(f"\nA result line ({first['custom_id']}): "
              f"{json.dumps(first['response']['body']['choices'][0])[:160]}...", file=out)
        print(f"Stats JSON: {out_dir / 'stats.json'}\nRun your own file:\n    batchllm run-batch -i IN.jsonl "
              f"-o OUT.jsonl --model {model_path}", file=out, flush=True)
    return code
