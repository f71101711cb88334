"""Unit tests of batchllm.batch_io: parsing, preparation, output schema, writer, manifest."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from batchllm.batch_io.manifest import Manifest, model_fingerprint
from batchllm.batch_io.planning import plan_file
from batchllm.batch_io.prepare import prepare, units_of
from batchllm.batch_io.requests import BatchRequest, ErrorRecord, parse_file, parse_line
from batchllm.batch_io.schema import RecordMaker
from batchllm.batch_io.writer import CorruptFileError, JsonlWriter, recover
from batchllm.cli import parse_size
from batchllm.config import EngineConfig
import batchllm.limits as batchllm_limits
from batchllm.limits import Limits, limits_of_config
from batchllm.llm import LLM
from batchllm.models.loader import DTYPES
from batchllm.outputs import CompletionOutput, RequestOutput
from batchllm.planner import build_plan
from batchllm.sampling_params import SamplingParams
from batchllm.seeding import prompt_seeds
from batchllm.testing import make_tiny_model
from batchllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "test", shape="test", tie_word_embeddings=False)


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def req(body: dict, url: str = "/v1/completions", cid: str = "a") -> bytes:
    return line({"custom_id": cid, "method": "POST", "url": url, "body": body})


def parsed(raw: bytes, n: int = 1) -> BatchRequest:
    item = parse_line(raw, n)
    assert isinstance(item, BatchRequest), item
    return item


def error(raw: bytes, n: int = 1) -> ErrorRecord:
    item = parse_line(raw, n)
    assert isinstance(item, ErrorRecord), item
    return item


# ---- input forms -----------------------------------------------------------------------------
def test_openai_completions_forms() -> None:
    r = parsed(req({"model": "x", "prompt": "Hi", "max_tokens": 5, "temperature": 0, "top_p": 0.5, "top_k": 3,
                    "n": 2, "stop": "\n", "seed": 7, "logprobs": 2, "user": "u", "presence_penalty": 0}))
    assert (r.custom_id, r.endpoint, r.prompts, r.line) == ("a", "completions", ("Hi",), 1)
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.n, p.stop_list, p.seed, p.logprobs) == \
        (5, 0, 0.5, 3, 2, ["\n"], 7, 2)
    assert parsed(req({"prompt": [1, 2, 3]})).prompts == ((1, 2, 3),)
    assert parsed(req({"prompt": ["a", "b"]})).prompts == ("a", "b")
    assert parsed(req({"prompt": [[1, 2], [3]]})).prompts == ((1, 2), (3,))
    d = parsed(req({"prompt": "x"})).params  # OpenAI defaults
    assert (d.max_tokens, d.temperature, d.n, d.logprobs) == (16, 1.0, 1, None)
    assert parsed(req({"prompt": "x", "max_completion_tokens": 9})).params.max_tokens == 9
    assert parsed(req({"prompt": "x", "temperature": None, "stop": None})).params.temperature == 1.0


def test_openai_chat_forms() -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]
    r = parsed(req({"messages": msgs, "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3,
                    "min_tokens": 2, "ignore_eos": True}, "/v1/chat/completions"))
    assert r.endpoint == "chat" and r.max_tokens_given
    assert [m["content"] for m in r.messages] == ["Be brief.", "a\nb", ""]
    assert (r.params.max_tokens, r.params.logprobs, r.params.min_tokens, r.params.ignore_eos) == (4, 3, 2, True)
    r = parsed(req({"messages": msgs[:1]}, "/v1/chat/completions"))
    assert not r.max_tokens_given and r.params.logprobs is None
    assert parsed(req({"messages": msgs[:1], "logprobs": True}, "/v1/chat/completions")).params.logprobs == 0


def test_convenience_forms() -> None:
    r = parsed(line({"prompt": "hello", "max_tokens": 3}), 7)
    assert (r.custom_id, r.endpoint, r.params.max_tokens) == ("7", "completions", 3)
    r = parsed(line({"messages": [{"role": "user", "content": "hi"}], "custom_id": "c"}), 8)
    assert (r.custom_id, r.endpoint) == ("c", "chat")


def test_file_lines_blank_bom_crlf_and_duplicates(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + req({"prompt": "a"}, cid="x") + b"\r\n\n   \n" + line({"prompt": "b"}) + b"\n"
                  + req({"prompt": "c"}, cid="x") + b"\n" + b"{oops\n" + req({"prompt": "d"}, cid="4"))
    p = parse_file(f)
    assert [i.line for i in p.items] == [1, 4, 5, 6, 7]
    assert [type(i).__name__ for i in p.items] == ["BatchRequest", "BatchRequest", "ErrorRecord", "ErrorRecord",
                                                   "ErrorRecord"]
    dup = p.items[2]
    assert dup.code == "duplicate_custom_id" and dup.custom_id == "x" and not dup.owns_id
    assert "line 1" in dup.message
    assert p.items[3].code == "invalid_json" and p.items[3].custom_id is None
    assert p.items[4].code == "duplicate_custom_id" and "line 4" in p.items[4].message  # "4" = line 4's id
    assert p.num_lines == 7 and len(p.sha256) == 64 and p.num_bytes == f.stat().st_size


# ---- every error kind ------------------------------------------------------------------------
@pytest.mark.parametrize("raw, code, words", [
    (b"{not json", "invalid_json", "not valid JSON"),
    (b"\xff\xfe{}", "invalid_json", "UTF-8"),
    (b"[1, 2]", "invalid_request", "JSON object"),
    (line({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), "missing_field", "custom_id"),
    (line({"custom_id": "a", "url": "/v1/completions", "body": {}}), "missing_field", "method"),
    (line({"custom_id": "a", "method": "POST", "url": "/v1/completions"}), "missing_field", "body"),
    (line({"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}), "invalid_request",
     "custom_id must be"),
    (line({"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}}), "invalid_request",
     "POST"),
    (req({"input": "x"}, "/v1/embeddings"), "unsupported_url", "/v1/embeddings"),
    (line({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}), "invalid_request",
     "body must be"),
    (line({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}),
     "invalid_request", "extra"),
    (req({"max_tokens": 3}), "missing_field", "body.prompt is required"),
    (req({"prompt": "x"}, "/v1/chat/completions"), "missing_field", "body.messages is required"),
    (req({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "/v1/chat/completions"),
     "invalid_request", "unrecognized request argument supplied: body.prompt"),
    (req({"prompt": "x", "max_token": 3}), "invalid_request", "max_token"),
    (req({"prompt": "x", "presence_penalty": 5}), "invalid_value", "presence_penalty must be in [-2, 2]"),
    (req({"prompt": "x", "logit_bias": {"x": 1}}), "invalid_request", "logit_bias must map"),
    (req({"prompt": "x", "response_format": {"type": "xml"}}), "invalid_request", "response_format must be"),
    (req({"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "a"}}, "/v1/chat/completions"),
     "unsupported", "audio"),
    (req({"prompt": "x", "echo": "yes"}), "invalid_request", "echo must be true or false"),
    (req({"prompt": "x", "best_of": 3}), "unsupported", "best_of"),
    (req({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "/v1/chat/completions"),
     "unsupported", "tools"),
    (req({"prompt": "x", "temperature": -1}), "invalid_value", "temperature must be >= 0"),
    (req({"prompt": "x", "temperature": "hot"}), "invalid_value", "temperature"),
    (req({"prompt": "x", "n": 0}), "invalid_value", "n must be"),
    (req({"prompt": "x", "max_tokens": 0}), "invalid_value", "max_tokens must be"),
    (req({"prompt": "x", "top_p": 2}), "invalid_value", "top_p"),
    (req({"prompt": "x", "top_k": -5}), "invalid_value", "top_k"),
    (req({"prompt": "x", "min_tokens": 9, "max_tokens": 3}), "invalid_value", "min_tokens"),
    (req({"prompt": "x", "stop": 5}), "invalid_request", "stop must be"),
    (req({"prompt": "x", "stop_token_ids": "1"}), "invalid_request", "stop_token_ids"),
    (req({"prompt": "x", "ignore_eos": 1}), "invalid_request", "ignore_eos"),
    (req({"prompt": "x", "logprobs": 50}), "invalid_request", "logprobs must be"),
    (req({"prompt": "x", "max_tokens": 3, "max_completion_tokens": 4}), "invalid_request", "disagree"),
    (req({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "/v1/chat/completions"),
     "invalid_request", "needs logprobs"),
    (req({"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, "/v1/chat/completions"),
     "invalid_request", "true or false"),
    (req({"prompt": []}), "invalid_request", "must not be empty"),
    (req({"prompt": [1, "a"]}), "invalid_request", "prompt must be"),
    (req({"prompt": 42}), "invalid_request", "prompt must be"),
    (req({"messages": []}, "/v1/chat/completions"), "invalid_request", "non-empty list"),
    (req({"messages": ["hi"]}, "/v1/chat/completions"), "invalid_request", "role and content"),
    (req({"messages": [{"content": "x"}]}, "/v1/chat/completions"), "invalid_request", "role"),
    (req({"messages": [{"role": "user", "content": 3}]}, "/v1/chat/completions"), "invalid_request", "content"),
    (req({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "/v1/chat/completions"), "unsupported", "image_url"),
    (line({"prompt": "x", "messages": []}), "missing_field", "exactly one"),
    (line({"hello": "x"}), "missing_field", "exactly one"),
])
def test_error_kinds(raw: bytes, code: str, words: str) -> None:
    e = error(raw, 3)
    assert e.code == code, e
    assert words in e.message and e.message.startswith("line 3: "), e.message
    assert e.line == 3


def test_error_keeps_custom_id_and_param() -> None:
    e = error(req({"prompt": "x", "temperature": -1}, cid="mine"))
    assert (e.custom_id, e.param) == ("mine", "body.temperature")
    assert error(line({"prompt": "x", "top_p": 9}), 12).custom_id == "12"
    assert error(b"nope", 2).custom_id is None


# ---- tokenization, validation, caps, seeds -----------------------------------------------------
def test_prepare_matches_tokenizer_and_validates(model: Path) -> None:
    tok = Tokenizer(model)
    limits = Limits(dtype="float32", vocab_size=tok.vocab_size, max_model_len=64, num_kv_blocks=3, block_size=16,
                    kv_bytes_per_token=512)  # a pool of 48 tokens
    chat = [{"role": "user", "content": "hello there"}]
    reqs = [
        parsed(req({"prompt": "hello world", "max_tokens": 4}), 1),
        parsed(req({"messages": chat}, "/v1/chat/completions"), 2),
        parsed(req({"prompt": "word " * 80}), 3),  # longer than max_model_len
        parsed(req({"prompt": [5, 99999]}), 4),  # token id out of vocab
        parsed(req({"prompt": [5] * 50}), 5),  # longer than the KV pool, shorter than max_model_len
        parsed(req({"messages": [{"role": "user", "content": "hello " * 8}], "min_tokens": 40},
                   "/v1/chat/completions"), 6),  # too little room left for min_tokens
        parsed(req({"prompt": ["a b", "c"], "max_tokens": 2, "n": 2}), 7),
        parsed(req({"prompt": "hello", "max_tokens": 60}), 8),  # capped at the pool when it runs, not an error
        parsed(req({"prompt": "hello", "logit_bias": {str(tok.vocab_size): 5}}), 9),  # a bias beyond the vocabulary
    ]
    prepared, errors = prepare(reqs, tok, limits, engine_seed=0)
    assert [p.request.line for p in prepared] == [1, 2, 7, 8]
    assert [(e.line, e.code) for e in errors] == [(3, "invalid_prompt"), (4, "invalid_prompt"),
                                                  (5, "invalid_prompt"), (6, "invalid_value"), (9, "invalid_prompt")]
    assert "max_model_len is 64" in errors[0].message and "[0, " in errors[1].message
    assert "KV pool holds 48" in errors[2].message and "min_tokens" in errors[3].message
    assert f"token ids below {tok.vocab_size}" in errors[4].message
    assert prepared[0].prompt_ids == [tok.encode("hello world")]
    assert prepared[1].prompt_ids == [tok.encode_chat(chat)]
    # chat without max_tokens: the rest of min(max_model_len, KV pool)
    assert prepared[1].params[0].max_tokens == 48 - len(tok.encode_chat(chat))
    assert [u.request for u in units_of(prepared)] == [0, 1, 2, 2, 3]


def test_prepare_seeds_are_stable_per_prompt(model: Path) -> None:
    tok = Tokenizer(model)
    limits = Limits("float32", tok.vocab_size, 4096, 256, 16, 512)
    reqs = [parsed(req({"prompt": "same", "temperature": 0.7}), 1),
            parsed(req({"prompt": "same", "temperature": 0.7}), 2),
            parsed(req({"prompt": "other", "temperature": 0}), 3), parsed(req({"prompt": "x", "seed": 5}), 4)]
    prepared, _ = prepare(reqs, tok, limits, engine_seed=0)
    seeds = [p.params[0].seed for p in prepared]
    assert seeds[0] is not None and seeds[1] is not None and seeds[0] != seeds[1]
    assert seeds[2] is None and seeds[3] == 5
    again, _ = prepare(reqs, tok, limits, engine_seed=0)
    assert [p.params[0].seed for p in again] == seeds
    other, _ = prepare(reqs, tok, limits, engine_seed=1)
    assert other[0].params[0].seed != seeds[0]


def test_limits_of_config(model: Path) -> None:
    lim = limits_of_config(EngineConfig.from_kwargs(str(model), num_kv_blocks=10, block_size=8))
    assert (lim.vocab_size, lim.max_model_len, lim.kv_pool_tokens) == (1024, 4096, 80)
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        limits_of_config(EngineConfig.from_kwargs(str(model), max_model_len=10**6))
    with pytest.raises(ValueError, match="holds no block"):
        limits_of_config(EngineConfig.from_kwargs(str(model), kv_cache_memory=100))



# ---- one source with the core: limits, seeds, plans ------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(num_kv_blocks=10, block_size=8), dict(kv_cache_memory=2**20),
                                    dict(kv_cache_memory=3 * 2**20 + 5, block_size=4, dtype="bfloat16"),
                                    dict(num_kv_blocks=16, max_model_len=100, dtype="float16")])
def test_limits_of_config_are_the_engines(model: Path, kwargs: dict) -> None:
    lim = limits_of_config(EngineConfig.from_kwargs(str(model), **kwargs))
    e = LLM(str(model), **kwargs).engine
    assert e.limits == lim
    assert (e.dtype, e.max_model_len, e.num_blocks, e.kv_bytes_per_token) == \
        (DTYPES[lim.dtype], lim.max_model_len, lim.num_kv_blocks, lim.kv_bytes_per_token)


def _generator_seeds(seqs: list) -> list[int | None]:
    return [None if s.generator is None else s.generator.initial_seed() for s in seqs]


def test_run_batch_seeds_are_the_ones_llm_draws_from(model: Path) -> None:
    """prepare writes seeds into unseeded sampled requests; LLM then seeds every sample's
    generator as it would have from the engine seed, for the whole file and for any tail of it."""
    llm = LLM(str(model), num_kv_blocks=64, seed=3)
    hot = {"temperature": 0.8, "max_tokens": 3}
    reqs = [parsed(req({"prompt": "same", **hot}), 1), parsed(req({"prompt": "cold", "temperature": 0}), 2),
            parsed(req({"prompt": "same", **hot, "n": 2}), 3), parsed(req({"prompt": ["x y", "same"], **hot}), 4),
            parsed(req({"prompt": "same", **hot, "seed": 9}), 5), parsed(req({"prompt": [5, 6, 7], **hot}), 6)]
    prepared, errors = prepare(reqs, llm.tokenizer, llm.engine.limits, engine_seed=3)
    assert errors == [] and len(prepared) == len(reqs)
    units = units_of(prepared)
    ids = [prepared[u.request].prompt_ids[u.index] for u in units]
    written = [prepared[u.request].params[u.index] for u in units]
    given = [prepared[u.request].request.params for u in units]  # as in the file
    def seqs(ids: list[list[int]], params: list[SamplingParams]) -> list:
        return llm._make_seqs(ids, params, prompt_seeds(ids, params, llm.config.seed))

    want = _generator_seeds(seqs(ids, given))
    assert _generator_seeds(seqs(ids, written)) == want
    assert want[1] is None and len({s for s in want if s is not None}) == len(want) - 1
    # a resumed job runs only the prompts after the first three (four sequences: n=2 on the third)
    assert _generator_seeds(seqs(ids[3:], written[3:])) == want[4:]


def test_plan_file_is_llm_plan(model: Path, tmp_path: Path) -> None:
    """`batchllm plan` and LLM plan the same prompts identically, sequence numbering included."""
    doc = list(range(3, 40))
    lines = [{"prompt": doc + [k], "max_tokens": 2 + k % 4, "n": 1 + k % 3} for k in range(7)]
    lines += [{"prompt": [[9] * 20 + [k] for k in range(3)], "max_tokens": 5}, {"prompt": [1, 2], "temperature": -1}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    kwargs = dict(block_size=4, num_kv_blocks=64)
    report = plan_file(path, EngineConfig.from_kwargs(str(model), **kwargs))
    prompts = [x["prompt"] for x in lines[:7]] + lines[7]["prompt"]
    params = [SamplingParams(max_tokens=x["max_tokens"], n=x["n"]) for x in lines[:7]]
    params += [SamplingParams(max_tokens=5)] * 3
    llm = LLM(str(model), **kwargs)
    want = llm.plan([{"prompt_token_ids": p} for p in prompts], params)
    assert report.plan == want and (report.sequences, report.invalid) == (sum(p.n for p in params), 1)
    assert want.stats.num_shared_groups >= 2
    # the plan's sequence i is the engine's sequence i (what the per-sequence formula gave)
    seqs = llm._make_seqs(prompts, params, [None] * len(prompts))
    assert want == build_plan([s.token_ids for s in seqs], block_size=4,
                              expected_output_tokens=[s.params.max_tokens for s in seqs])



def test_plan_path_and_the_shared_rules_import_without_torch() -> None:
    """`batchllm plan` (and run-batch until it loads the model) needs no torch at import time;
    the package's __init__ is bypassed, as it imports the LLM facade."""
    code = (
        "import sys, types\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch imported at module level')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"pkg = types.ModuleType('batchllm'); pkg.__path__ = [{str(Path(batchllm_limits.__file__).parent)!r}]\n"
        "pkg.__version__ = '0'; sys.modules['batchllm'] = pkg\n"
        "import batchllm.batch_io.planning, batchllm.batch_io.job, batchllm.limits, batchllm.seeding\n"
        "import batchllm.batch_plan, batchllm.kernels.signatures\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- output schema ---------------------------------------------------------------------------
def _out(ids: list[int], cached: int, outs: list[CompletionOutput]) -> RequestOutput:
    return RequestOutput("0", None, ids, outs, num_cached_tokens=cached)


def test_completion_record_schema(model: Path) -> None:
    r = parsed(req({"prompt": ["a", "b"], "n": 2, "logprobs": 1}, cid="c1"), 4)
    lp = [{7: -0.1, 8: -2.0}, {9: -0.5}]
    outs = [_out([1, 2, 3], 2, [CompletionOutput(1, "yy", [7, 9], -0.6, lp, "length"),
                                 CompletionOutput(0, "xx", [7, 9], -0.6, lp, "stop", "\n")]),
            _out([4, 5], 0, [CompletionOutput(0, "z", [7], -0.1, lp[:1], "stop"),
                             CompletionOutput(1, "w", [8], -2.0, [{8: -2.0, 7: -0.1}], "length")])]
    rec = RecordMaker("f" * 64, "m", Tokenizer(model), "fp_x").result(r, outs)
    assert set(rec) == {"id", "custom_id", "response", "error"} and rec["error"] is None
    assert rec["custom_id"] == "c1" and rec["id"].startswith("batch_req_")
    resp = rec["response"]
    assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
    body = resp["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "m"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["xx", "yy", "z", "w"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length", "stop", "length"]
    assert body["choices"][0]["stop_reason"] == "\n"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    logprobs = body["choices"][0]["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert logprobs["token_logprobs"] == [-0.1, -0.5] and len(logprobs["top_logprobs"][0]) == 2
    assert logprobs["text_offset"][0] == 0
    json.dumps(rec)  # serialisable
    again = RecordMaker("f" * 64, "m", Tokenizer(model)).result(r, outs)
    assert again["id"] == rec["id"] and again["response"]["request_id"] == resp["request_id"]


def test_chat_record_schema(model: Path) -> None:
    r = parsed(req({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1},
                   "/v1/chat/completions"), 2)
    outs = [_out([1, 2], 0, [CompletionOutput(0, "hi", [7], -0.1, [{7: -0.1, 8: -2.0}], "stop")])]
    body = RecordMaker("0" * 64, "m", Tokenizer(model)).result(r, outs)["response"]["body"]
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    content = choice["logprobs"]["content"]
    assert content[0]["logprob"] == -0.1 and len(content[0]["top_logprobs"]) == 1
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_error_record_schema() -> None:
    e = ErrorRecord(9, "id9", "line 9: bad", "invalid_value", "body.top_p")
    rec = RecordMaker("0" * 64, "m", None).error(e)
    assert rec["custom_id"] == "id9" and rec["line"] == 9 and rec["error"] is None
    assert rec["response"]["status_code"] == 400
    assert rec["response"]["body"]["error"] == {"message": "line 9: bad", "type": "invalid_request_error",
                                                "param": "body.top_p", "code": "invalid_value"}


# ---- writer and recovery ---------------------------------------------------------------------
def test_writer_appends_whole_lines(tmp_path: Path) -> None:
    p = tmp_path / "o.jsonl"
    with JsonlWriter(p, fsync_interval=0.0) as w:
        w.write({"a": "é"})
        w.write({"b": 2})
    with JsonlWriter(p) as w:
        w.write({"c": 3})
    assert p.read_text(encoding="utf-8").splitlines() == ['{"a":"é"}', '{"b":2}', '{"c":3}']
    assert recover(p) == ([{"a": "é"}, {"b": 2}, {"c": 3}], 0)


def test_recover_cuts_partial_tail_only(tmp_path: Path) -> None:
    p = tmp_path / "o.jsonl"
    p.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    assert recover(p) == ([{"a": 1}, {"b": 2}], 5)
    assert p.read_bytes() == b'{"a":1}\n{"b":2}\n'
    p.write_bytes(b'{"a":1}\n{"b":2}')  # complete JSON but no newline: still a partial write
    assert recover(p, truncate=False) == ([{"a": 1}], 7)
    p.write_bytes(b'{"a":1}\n\x00\x00\x00\n')  # garbage tail (e.g. after power loss)
    assert recover(p)[0] == [{"a": 1}] and p.read_bytes() == b'{"a":1}\n'
    p.write_bytes(b'{"a":1}\n{broken\n{"c":3}\n')
    with pytest.raises(CorruptFileError, match="line 2"):
        recover(p)
    assert recover(tmp_path / "missing.jsonl") == ([], 0)


# ---- manifest --------------------------------------------------------------------------------
def _manifest(**kw: object) -> Manifest:
    base = dict(input_path="/in", input_sha256="a" * 64, model_path="/m", model_fingerprint="b" * 64,
                settings={"dtype": "float32", "seed": 0, "max_model_len": 4096, "max_context": 4096},
                engine={"block_size": 16}, error_file="/o.errors.jsonl")
    base.update(kw)
    return Manifest(**base)  # type: ignore[arg-type]


def test_manifest_roundtrip_and_mismatches(tmp_path: Path) -> None:
    m = _manifest()
    m.runs.append({"status": "complete"})
    m.save(tmp_path / "x.json")
    back = Manifest.load(tmp_path / "x.json")
    assert back.to_dict() == m.to_dict()
    assert m.mismatches(_manifest(engine={"block_size": 32}, model_path="/elsewhere")) == []
    assert "input file differs" in m.mismatches(_manifest(input_sha256="c" * 64))[0]
    assert "model differs" in m.mismatches(_manifest(model_fingerprint="c" * 64))[0]
    assert "seed differs" in m.mismatches(_manifest(settings={**m.settings, "seed": 1}))[0]
    assert "dtype differs" in m.mismatches(_manifest(settings={**m.settings, "dtype": "bfloat16"}))[0]
    assert "error file differs" in m.mismatches(_manifest(error_file="/other"))[0]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read the run manifest"):
        Manifest.load(tmp_path / "bad.json")


def test_model_fingerprint_sees_weights_and_config(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", shape="test", seed=0)
    b = make_tiny_model(tmp_path / "b", shape="test", seed=0)
    c = make_tiny_model(tmp_path / "c", shape="test", seed=1)
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    cfg = json.loads((b / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (b / "config.json").write_text(json.dumps(cfg))
    assert model_fingerprint(a) != model_fingerprint(b)


def test_parse_size() -> None:
    assert parse_size("2GiB") == 2 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("4e9") == 4 * 10**9 and parse_size("1.5G") == 1_500_000_000 and parse_size("100") == 100
    for bad in ("", "x", "2 parsecs", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
