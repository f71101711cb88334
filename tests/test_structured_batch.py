"""run-batch with structured outputs and the sampling fields of issue 20: `response_format`
lines produce valid JSON, a schema that cannot compile is one error record and the rest of the
file completes; penalties, logit_bias and chat logprobs in OpenAI's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from batchllm.cli import main
from batchllm.testing import make_tiny_model

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sentiment", "score"],
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "score": {"type": "integer", "minimum": 1, "maximum": 5}}}


def chat(cid: str, text: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": text}], "max_completion_tokens": 60, **body}}


def test_run_batch_structured(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_model(tmp_path / "m", shape="test", tie_word_embeddings=False)
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "strict": True, "schema": SCHEMA}}
    lines = [chat(f"s{i}", f"review {i}", response_format=fmt, temperature=0.9, seed=i) for i in range(4)]
    lines.append(chat("bad", "review", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}))
    lines.append(chat("obj", "anything", response_format={"type": "json_object"}, max_completion_tokens=200))
    lines.append(chat("text", "free", response_format={"type": "text"}, presence_penalty=0.5, frequency_penalty=0.3,
                      logit_bias={"7": 3, "9": -100}, logprobs=True, top_logprobs=2, max_completion_tokens=8))
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out.jsonl"
    code = main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(model), "--kv-cache-memory", "16MiB"])
    err = capsys.readouterr().err
    assert code == 0, err
    results = {r["custom_id"]: r["response"]["body"] for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(results) == ["obj", "s0", "s1", "s2", "s3", "text"]
    for i in range(4):
        choice = results[f"s{i}"]["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert results["obj"]["choices"][0]["message"]["content"].startswith("{")
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["custom_id"] == "bad"
    body = errors[0]["response"]["body"]["error"]
    assert body["param"] == "response_format" and "does not compile" in body["message"]
    assert body["message"].startswith("line 5: ")
    text = results["text"]["choices"][0]
    content = text["logprobs"]["content"]
    assert len(content) == results["text"]["usage"]["completion_tokens"] >= 1
    for step in content:
        assert set(step) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(step["top_logprobs"]) == 2 and step["logprob"] <= 0
        assert all(set(t) == {"token", "logprob", "bytes"} for t in step["top_logprobs"])
        assert step["token"] != "" or step["bytes"] is not None


def test_response_format_lines_parse() -> None:
    from batchllm.batch_io.requests import parse_object

    r = parse_object({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": -1.5},
                      "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}},
                      "repetition_penalty": 1.2, "include_stop_str_in_output": True}, 1)
    assert r.params.structured_outputs.json == SCHEMA and r.params.logit_bias == {5: -1.5}
    assert r.params.repetition_penalty == 1.2 and r.params.include_stop_str_in_output
    assert parse_object({"prompt": "x", "response_format": {"type": "text"}}, 1).params.structured_outputs is None
    assert parse_object({"prompt": "x", "response_format": {"type": "json_object"}},
                        1).params.structured_outputs.json_object
