"""`batchllm demo`: a real model (SmolLM2-135M-Instruct, downloaded once) answering questions about
a few short texts, a batch whose requests share long prefixes, one run, the report.

`--shape NAME` (or a failed download) runs a random-weight model instead: the text is noise there,
the numbers are the point.
"""

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
FALLBACK_SHAPE = "tiny"  # the random model run when the real one cannot be downloaded
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


# The real model's batch: questions about short texts (each text is the system prompt its questions
# share), a few plain questions (sharing the chat template's default system prompt), two bad lines.
_TEXTS = {
    "moon": "The Moon is Earth's only natural satellite. It is about 384,000 kilometres away and its "
            "diameter is about a quarter of Earth's. The same side of the Moon always faces Earth. "
            "Twelve astronauts walked on the Moon between 1969 and 1972, during the Apollo programme.",
    "bees": "Honey bees live in colonies of tens of thousands of workers, one queen and a few hundred "
            "drones. Workers collect nectar and pollen from flowers and turn the nectar into honey, "
            "which the colony eats in winter. A worker tells the others where food is by dancing.",
    "python": "Python is a programming language created by Guido van Rossum and first released in "
              "1991. It is known for its readable syntax, in which indentation marks blocks of code. "
              "Python is widely used for web development, data analysis and machine learning.",
    "rivers": "The Nile and the Amazon are the two longest rivers in the world, each more than 6,000 "
              "kilometres long. The Amazon carries far more water than any other river: about a fifth "
              "of all the fresh water that flows into the oceans comes from it.",
}
_QUESTIONS = {
    "moon": ["How far away is the Moon?", "How many people have walked on the Moon?",
             "Which side of the Moon do we see?", "Summarise the text in one sentence."],
    "bees": ["What do worker bees collect?", "Why do bees make honey?", "How many queens does a colony have?",
             "Summarise the text in one sentence."],
    "python": ["Who created Python?", "When was Python first released?", "What is Python used for?",
               "Summarise the text in one sentence."],
    "rivers": ["Which are the two longest rivers?", "Which river carries the most water?",
               "How long is the Nile?", "Summarise the text in one sentence."],
}
_PLAIN = ["What is the capital of France?", "Name three primary colors.", "Give me a tip for sleeping well.",
          "Write a haiku about the sea."]


def real_lines() -> list[str]:
    """22 lines: 4 texts x 4 questions and 4 plain questions as chat requests, and 2 bad lines."""
    lines: list[dict[str, Any]] = []
    for name, text in _TEXTS.items():
        system = f"Answer the question about this text briefly.\n\nText: {text}"
        for k, q in enumerate(_QUESTIONS[name]):
            lines.append({"custom_id": f"{name}-q{k}", "method": "POST", "url": "/v1/chat/completions",
                          "body": {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                                   "max_completion_tokens": 48, "temperature": 0}})
    for k, q in enumerate(_PLAIN):
        lines.append({"custom_id": f"plain-{k}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": q}], "max_completion_tokens": 48,
                               "temperature": 0}})
    raw = [json.dumps(line) for line in lines]
    raw.insert(5, '{"custom_id": "broken", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [')
    raw.append(json.dumps({"custom_id": "too-hot", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": "Hello"}], "temperature": -1}}))
    return raw


def _pick_model(model: str | None, shape: str | None, stream: TextIO | None) -> tuple[Path, bool]:
    """(model path, real?): the given model, the random one of `shape`, else the real one (downloaded
    on first use), falling back to the random FALLBACK_SHAPE model when that fails."""
    from batchllm.models.smollm2 import ensure_smollm2

    if model:
        return Path(model), True
    if shape:
        return ensure_model(shape, stream), False
    try:
        return ensure_smollm2(log=lambda msg: log(msg, stream)), True
    except RuntimeError as e:
        log(f"could not get the real model ({e}); running the {FALLBACK_SHAPE} random-weight model instead "
            "(its text is noise)", stream)
        return ensure_model(FALLBACK_SHAPE, stream), False


def run_demo(out_dir: Path, model: str | None = None, shape: str | None = None, stream: TextIO | None = None,
             report_stream: TextIO | None = None, tty: bool | None = None) -> int:
    """Write the sample batch to `out_dir`, run it, print the report; returns the exit code."""
    out = report_stream or sys.stdout
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, real = _pick_model(model, shape, stream)
    requests = out_dir / "requests.jsonl"
    requests.write_text("\n".join(real_lines() if real else sample_lines()) + "\n")
    engine = {"kv_cache_memory": DEMO_KV_CACHE_MEMORY}
    plan = plan_file(requests, EngineConfig.from_kwargs(str(model_path), **engine))
    about = f"model {model_path.name}" if real else "random weights: the text is noise, the numbers are the point"
    print(f"batchllm demo: {plan.requests} requests in {requests} ({about})\n{plan.plan.summary()}\n",
          file=out, flush=True)
    results = out_dir / "results.jsonl"
    code = run_batch(JobOptions(
        input=requests, output=results, model=str(model_path), engine_kwargs=engine, overwrite=True,
        stats_json=out_dir / "stats.json", stream=stream, report_stream=out, tty=tty,
        resume_command=f"batchllm run-batch -i {requests} -o {results} --model {model_path} "
                       f"--kv-cache-memory {DEMO_KV_CACHE_MEMORY} --resume"))
    if code == 0:
        records = [json.loads(line) for line in results.read_text().splitlines()]
        if real:
            asked = {}
            for line in requests.read_text().splitlines():
                try:
                    d = json.loads(line)
                    asked[d["custom_id"]] = d["body"]["messages"][-1]["content"]
                except (ValueError, KeyError, IndexError):  # the bad lines
                    pass
            print("\nSome answers:", file=out)
            for r in records[:: max(1, len(records) // 6)][:6]:
                answer = r["response"]["body"]["choices"][0]["message"]["content"].strip().replace("\n", " ")
                print(f"  {r['custom_id']}: {asked.get(r['custom_id'], '')}\n    -> {answer[:200]}", file=out)
        else:
            print(f"\nA result line ({records[0]['custom_id']}): "
                  f"{json.dumps(records[0]['response']['body']['choices'][0])[:160]}...", file=out)
        print(f"Stats JSON: {out_dir / 'stats.json'}\nRun your own file:\n    batchllm run-batch -i IN.jsonl "
              f"-o OUT.jsonl --model {model_path}", file=out, flush=True)
    return code
