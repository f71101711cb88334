"""run-batch as an OpenAI Batch API user meets it: logprob bytes, moved job folders, stdout,
empty and all-invalid inputs, progress and report wording, served model name, chat options."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchllm.batch_io.progress import Progress, Report
from batchllm.batch_io.requests import parse_object
from batchllm.batch_io.schema import RecordMaker
from batchllm.outputs import CompletionOutput, Logprob, RequestOutput, RunStats
from batchllm.testing import make_tiny_model
from batchllm.tokenizer import Tokenizer

from batch_files import ENGINE, cli, openai



@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "test", shape="test", tie_word_embeddings=False)




def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


GOOD = [openai(f"r{i}", {"prompt": f"the river and the stone {i}", "max_tokens": 3, "temperature": 0})
        for i in range(3)]


# ---- logprobs keep every byte ----------------------------------------------------------------

def _choice(tok: Tokenizer, text: str, chat: bool, cut: int | None = None) -> tuple[dict[str, Any], list[int]]:
    ids = tok.encode(text, add_special_tokens=False)
    lps = [{t: Logprob(-0.5, 1), 7: Logprob(-3.0, 2)} for t in ids]
    out_text = tok.decode(ids) if cut is None else tok.decode(ids)[:cut]
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1} if chat else \
        {"prompt": "x", "logprobs": 1}
    req = parse_object(openai("c", body, chat), 1)
    out = RequestOutput("0", None, [1], [CompletionOutput(0, out_text, ids, -1.0, lps, "length")])
    rec = RecordMaker("f" * 64, "m", tok).result(req, [out])
    return rec["response"]["body"]["choices"][0], ids


def test_logprobs_hold_each_tokens_raw_bytes(model: Path) -> None:
    tok = Tokenizer(model)
    text = "h\u00e9llo \u2603 \u65e5\u672c 1, 2"
    choice, ids = _choice(tok, text, chat=True)
    content = choice["logprobs"]["content"]
    assert len(content) == len(ids) > len(text.split())  # some characters are split over tokens
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8") == text
    assert any(c["token"].startswith("bytes:\\x") for c in content)  # a split character's piece
    assert "\ufffd" not in "".join(c["token"] for c in content)
    assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)
    # completions: the tokens join to the text and text_offset says where each starts
    choice, _ = _choice(tok, text, chat=False)
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] == text
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
    # a stop string cut from the text is cut from the tokens
    choice, _ = _choice(tok, text, chat=False, cut=4)
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"] == text[:4]


def test_token_bytes_of_sentencepiece_vocabularies() -> None:
    from batchllm.tokenizer import _token_bytes_rule

    rule = _token_bytes_rule({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}]})
    assert [rule(p) for p in ("<0xE2>", "\u2581hello", "<0xZZ>")] == [b"\xe2", b" hello", b"<0xZZ>"]
    assert _token_bytes_rule(None)("\u00e9") == "\u00e9".encode()


# ---- job files -------------------------------------------------------------------------------

def test_resume_a_moved_job_folder(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job"
    job.mkdir()
    inp = write(job / "in.jsonl", GOOD + ["{bad"])
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", job / "out.jsonl", "--model", model, *ENGINE)
    assert code == 0, err
    manifest = json.loads((job / "out.manifest.json").read_text())
    assert manifest["input"]["path"] == "in.jsonl" and manifest["error_file"] == "out.errors.jsonl"
    out = records(job / "out.jsonl")
    (job / "out.jsonl").write_text(json.dumps(out[0]) + "\n")  # as if cut short after one result
    moved = tmp_path / "elsewhere" / "job"
    moved.parent.mkdir()
    shutil.move(str(job), str(moved))
    code, _, err = cli(capsys, "run-batch", "-i", moved / "in.jsonl", "-o", moved / "out.jsonl", "--model", model,
                       *ENGINE, "--resume")
    assert code == 0, err
    assert sorted(r["custom_id"] for r in records(moved / "out.jsonl")) == ["r0", "r1", "r2"]
    assert len(records(moved / "out.errors.jsonl")) == 1


def test_output_to_stdout(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inp = write(tmp_path / "in.jsonl", GOOD + ["{bad"])
    code, out, err = cli(capsys, "run-batch", "-i", inp, "-o", "-", "--model", model, *ENGINE)
    assert code == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    assert sorted(r["custom_id"] for r in lines if r["response"]["status_code"] == 200) == ["r0", "r1", "r2"]
    assert [r["line"] for r in lines if r["response"]["status_code"] == 400] == [4]
    assert "batchllm run-batch: complete" in err and "results     stdout" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no file named "-", no manifest
    code, out, err = cli(capsys, "run-batch", "-i", inp, "-o", "-", "--model", model, *ENGINE,
                         "--error-file", tmp_path / "e.jsonl")
    assert code == 0 and len(out.splitlines()) == 3 and len(records(tmp_path / "e.jsonl")) == 1
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", "-", "--model", model, "--resume")
    assert code == 2 and "--resume needs a results file" in err


def test_empty_input_warns_and_loads_nothing(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write(tmp_path / "in.jsonl", ["", "  "])
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--model", model, *ENGINE)
    assert code == 0 and "holds no request" in err and "loading" not in err


def test_nothing_succeeded_exits_nonzero(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write(tmp_path / "in.jsonl", ["{bad", openai("x", {"prompt": "a", "max_tokens": 0})])
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--model", model, *ENGINE)
    assert code == 1 and "no request succeeded" in err
    assert len(records(tmp_path / "o.errors.jsonl")) == 2


def test_served_model_name(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write(tmp_path / "in.jsonl", GOOD[:1])
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "a.jsonl", "--model", model, *ENGINE)
    assert code == 0 and records(tmp_path / "a.jsonl")[0]["response"]["body"]["model"] == str(model)
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "b.jsonl", "--model", model, *ENGINE,
                       "--served-model-name", "my-model")
    assert code == 0 and records(tmp_path / "b.jsonl")[0]["response"]["body"]["model"] == "my-model"


def test_chat_template_options_in_the_body(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}, {"role": "assistant", "content": "ok so"}]
    r = parse_object(openai("c", {"messages": msgs, "chat_template_kwargs": {"enable_thinking": False},
                                  "add_generation_prompt": False, "continue_final_message": True}, chat=True), 1)
    assert r.template_options == {"enable_thinking": False, "add_generation_prompt": False,
                                  "continue_final_message": True}
    inp = write(tmp_path / "in.jsonl", [
        openai("plain", {"messages": msgs, "max_tokens": 2}, chat=True),
        openai("cont", {"messages": msgs, "max_tokens": 2, "add_generation_prompt": False,
                        "continue_final_message": True, "chat_template_kwargs": {"enable_thinking": False}}, chat=True),
        openai("bad1", {"messages": msgs, "chat_template_kwargs": ["x"]}, chat=True),
        openai("bad2", {"messages": msgs, "continue_final_message": True}, chat=True),
        openai("bad3", {"prompt": "x", "chat_template_kwargs": {}})])
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--model", model, *ENGINE)
    assert code == 0, err
    usage = {r["custom_id"]: r["response"]["body"]["usage"]["prompt_tokens"] for r in records(tmp_path / "o.jsonl")}
    tok = Tokenizer(model)
    assert usage["cont"] == len(tok.encode_chat(msgs, add_generation_prompt=False, continue_final_message=True))
    assert usage["plain"] == len(tok.encode_chat(msgs)) != usage["cont"]
    errors = {r["custom_id"]: r["response"]["body"]["error"] for r in records(tmp_path / "o.errors.jsonl")}
    assert "must be an object" in errors["bad1"]["message"]
    assert "needs add_generation_prompt=false" in errors["bad2"]["message"]
    assert "unrecognized request argument" in errors["bad3"]["message"]


# ---- progress and report ---------------------------------------------------------------------

def test_progress_counts_prefill_in_progress_and_has_an_eta() -> None:
    logs = io.StringIO()
    p = Progress(total=4, done_before=0, stream=logs, tty=False, log_interval=0.0)
    p.start -= 10  # ten seconds in, mid-prefill: no request finished yet
    p.tick(RunStats(computed_prefill_tokens=5000, tokens_per_step=[2048, 2048, 904], steps=3))
    line = logs.getvalue()
    assert "prefill 500 tok/s" in line and "prefix saving n/a" in line and "ETA n/a" in line
    p.request_done(100, 0)
    assert "ETA 30 s" in logs.getvalue().splitlines()[-1]


def test_report_of_a_run_where_nothing_ran() -> None:
    s = RunStats(num_requests=3, logical_prefill_tokens=300, policy="batchllm")  # failed before any step
    text = Report(status="failed", requests_in_file=3, ok=0, failed=0, ok_this_run=0, ok_before=0, failed_this_run=0,
                  remaining=3, total_time_s=1.0, load_time_s=0.5, run=s, message="engine failure: x").text()
    assert "100.0%" not in text and "0/0 blocks" not in text
    assert "prefix saving n/a" in text and "peak n/a" in text
    assert "n/a" in s.summary() and "100.0%" not in s.summary()



def test_readme_lists_every_request_field() -> None:
    """The README's table of request fields names exactly the fields the parser knows."""
    import re

    from batchllm.batch_io import requests as rq

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| field | completions | chat | notes |"):].split("\n\n")[0]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    known = {*rq._SAMPLING, *rq._CONVERTED, *rq._IGNORED, *rq._NEUTRAL, *rq._COMPLETIONS_ONLY, *rq._CHAT_TEMPLATE, "max_tokens",
             "max_completion_tokens", "logprobs", "top_logprobs", "best_of", "echo", "prompt", "messages"}
    assert listed == known
