"""run-batch on Ray (issue 24): one local Ray cluster for the module (2 logical CPUs), a tiny
model, 64 short requests in 8 prefix groups of 8 plus one invalid line, 2 replicas.

Ray is the `ray` extra, not in `test`: without it these tests skip; CI installs it and runs
them in `.ci/ray`, which checks first that ray imports so they cannot skip there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]'; CI: .ci/ray)")

from batch_files import ENGINE, cli  # noqa: E402

from batchllm.batch_io.prepare import prepare  # noqa: E402
from batchllm.batch_io.requests import parse_file  # noqa: E402
from batchllm.batch_plan import plan_batch  # noqa: E402
from batchllm.config import EngineConfig  # noqa: E402
from batchllm.limits import limits_of_config  # noqa: E402
from batchllm.tokenizer import Tokenizer  # noqa: E402

FLAGS = [*ENGINE, "--dtype", "float32"]
GROUPS, MEMBERS = 8, 8


@pytest.fixture(scope="module")
def address() -> str:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 groups of 8 greedy requests sharing a 40-token prefix, then one line too long to run."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ray-batch") / "in.jsonl"
    lines = []
    for g in range(GROUPS):
        prefix = [rng.randrange(5, 1024) for _ in range(40)]
        for m in range(MEMBERS):
            ids = prefix + [rng.randrange(5, 1024) for _ in range(rng.randint(3, 8))]
            lines.append({"custom_id": f"g{g}m{m}", "prompt": ids, "max_tokens": 8, "temperature": 0})
    lines.insert(20, {"custom_id": "too-long", "prompt": [5] * 5000, "max_tokens": 4})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _texts(path: Path) -> dict[str, list[str]]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    ids = [r["custom_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a custom_id written twice"
    return {r["custom_id"]: [c["text"] for c in r["response"]["body"]["choices"]] for r in rows}


@pytest.fixture(scope="module")
def single(llama_dir: Path, batch: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The single-process run of the batch: (results, stats json)."""
    out = tmp_path_factory.mktemp("single") / "out.jsonl"
    from batchllm.cli import main

    assert main(["run-batch", "-i", str(batch), "-o", str(out), "--model", str(llama_dir), *FLAGS,
                 "--stats-json", str(out.with_suffix(".stats.json"))]) == 0
    return out, json.loads(out.with_suffix(".stats.json").read_text())


@pytest.fixture(scope="module")
def on_ray(address: str, llama_dir: Path, batch: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same batch on 2 replicas of the module's cluster: (results, stats json)."""
    out = tmp_path_factory.mktemp("ray") / "out.jsonl"
    from batchllm.cli import main

    assert main(["run-batch", "-i", str(batch), "-o", str(out), "--model", str(llama_dir), *FLAGS,
                 "--ray", address, "--replicas", "2", "--stats-json", str(out.with_suffix(".stats.json"))]) == 0
    return out, json.loads(out.with_suffix(".stats.json").read_text())


def test_outputs_equal_the_single_process_run(single: tuple[Path, dict], on_ray: tuple[Path, dict]) -> None:
    expected, got = _texts(single[0]), _texts(on_ray[0])
    assert len(expected) == GROUPS * MEMBERS and got == expected


def test_prefill_tokens_equal_the_single_process_plan(single: tuple[Path, dict], on_ray: tuple[Path, dict],
                                                      llama_dir: Path, batch: Path) -> None:
    """Each prefix computed once over all replicas: a group split over two replicas would
    compute its prefix twice and the sum would exceed the plan's."""
    cfg = EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory=16 << 20, dtype="float32")
    prepared, _ = prepare(parse_file(batch).requests, Tokenizer(llama_dir), limits_of_config(cfg), cfg.seed)
    plan = plan_batch(cfg, [p.prompt_ids[0] for p in prepared], [p.params[0] for p in prepared])
    stats = on_ray[1]
    per_replica = [r["computed_prefill_tokens"] for r in stats["replicas"]]
    assert len(per_replica) == 2 and all(n > 0 for n in per_replica)  # both replicas worked
    assert sum(per_replica) == stats["run"]["computed_prefill_tokens"] == plan.stats.planned_prefill_tokens
    assert single[1]["run"]["computed_prefill_tokens"] == plan.stats.planned_prefill_tokens
    assert stats["run"]["output_tokens"] == single[1]["run"]["output_tokens"]
    assert stats["run"]["num_requests"] == GROUPS * MEMBERS
    assert set(stats) == set(single[1]) | {"replicas"}  # today's shape plus the replicas list


def test_every_group_is_in_one_bin(address: str, llama_dir: Path, batch: Path) -> None:
    """The bins the driver sends (a bin runs on one replica) hold each prefix group whole."""
    from batchllm.distributed.options import RayOptions
    from batchllm.distributed.ray_runner import RayRunner

    cfg = EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory=16 << 20, dtype="float32")
    prepared, _ = prepare(parse_file(batch).requests, Tokenizer(llama_dir), limits_of_config(cfg), cfg.seed)
    runner = RayRunner(str(llama_dir), {}, RayOptions(address, replicas=2))
    runner.cfg, runner.actors = cfg, [None, None]  # planning needs no replica
    bins = runner.plan(prepared)
    where = {prepared[i].request.custom_id: b for b, x in enumerate(bins) for i in x.requests}
    assert len(where) == GROUPS * MEMBERS and len(bins) == GROUPS
    for g in range(GROUPS):
        assert len({where[f"g{g}m{m}"] for m in range(MEMBERS)}) == 1


def test_an_invalid_line_is_an_error_record(on_ray: tuple[Path, dict]) -> None:
    out = on_ray[0]
    errors = [json.loads(x) for x in out.with_name("out.errors.jsonl").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert "max_model_len" in errors[0]["response"]["body"]["error"]["message"]
    assert (on_ray[1]["ok"], on_ray[1]["failed"]) == (GROUPS * MEMBERS, 1)


def _start_and_wait(argv: list[str], out: Path) -> subprocess.Popen:
    """Start `batchllm *argv` and return once it has written a result (or ended)."""
    proc = subprocess.Popen([sys.executable, "-m", "batchllm", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "BATCHLLM_TEST_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().strip():
            break
        time.sleep(0.01)
    return proc


def _resume_and_compare(argv: list[str], out: Path, single: Path, runs: list[str]) -> None:
    from batchllm.cli import main

    assert main([*argv, "--resume"]) == 0
    assert _texts(out) == _texts(single)  # every custom_id once, the uninterrupted run's outputs
    manifest = json.loads(out.with_name("out.manifest.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == runs


def _argv(batch: Path, out: Path, model: Path, address: str) -> list[str]:
    return ["run-batch", "-i", str(batch), "-o", str(out), "--model", str(model), *FLAGS,
            "--ray", address, "--replicas", "2", "--cpus-per-replica", "0.5"]


def test_kill_the_driver_then_resume(address: str, llama_dir: Path, batch: Path, single: tuple[Path, dict],
                                     tmp_path: Path) -> None:
    """kill -9 of the driver after some results are written; --resume runs only the rest, and
    the union is the uninterrupted run, every custom_id once."""
    out = tmp_path / "out.jsonl"
    argv = _argv(batch, out, llama_dir, address)
    proc = _start_and_wait(argv, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(out.read_text().splitlines())
    assert 0 < written < GROUPS * MEMBERS, f"{written} results when killed: the test needs a part-way kill"
    _resume_and_compare(argv, out, single[0], ["killed", "complete"])


def test_sigint_stops_the_replicas_then_resume(address: str, llama_dir: Path, batch: Path,
                                                single: tuple[Path, dict], tmp_path: Path) -> None:
    """SIGINT part-way: the replicas end their bins after the current step, what finished is
    written, exit 130 with the resume command; the resume completes the batch."""
    out = tmp_path / "out.jsonl"
    argv = _argv(batch, out, llama_dir, address)
    proc = _start_and_wait(argv, out)
    proc.send_signal(signal.SIGINT)
    report, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, report[-2000:]
    assert "interrupted by SIGINT" in report and "--resume" in report
    assert len(out.read_text().splitlines()) < GROUPS * MEMBERS
    _resume_and_compare(argv, out, single[0], ["interrupted", "complete"])


def _replica_pids() -> list[int]:
    """Processes of live batchllm replica actors (Ray titles them "ray::Replica...")."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::Replica"):
                pids.append(int(d.name))
        except OSError:
            continue
    return sorted(pids)


def test_a_replica_dies_the_job_fails_with_the_resume_hint(address: str, llama_dir: Path, batch: Path,
                                                           single: tuple[Path, dict], tmp_path: Path) -> None:
    """kill -9 of one replica part-way: the driver writes what the other finished, exits 1 naming
    --resume, and the resume completes the batch."""
    out = tmp_path / "out.jsonl"
    argv = _argv(batch, out, llama_dir, address)
    proc = _start_and_wait(argv, out)
    pids = _replica_pids()
    assert len(pids) == 2 and proc.poll() is None
    os.kill(pids[0], signal.SIGKILL)
    report, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, report[-2000:]
    assert "replica 1 died" in report or "replica 0 died" in report
    assert "after fixing the cause resume with" in report and "--resume" in report
    assert len(out.read_text().splitlines()) < GROUPS * MEMBERS
    _resume_and_compare(argv, out, single[0], ["failed", "complete"])


def test_usage_errors(address: str, llama_dir: Path, batch: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["run-batch", "-i", batch, "-o", tmp_path / "o.jsonl", "--model", llama_dir, *FLAGS]
    code, _, err = cli(capsys, *base, "--ray", address, "--replicas", "0")
    assert code == 2 and "--replicas must be >= 1" in err
    code, _, err = cli(capsys, *base, "--replicas", "2")
    assert code == 2 and "needs --ray" in err
    code, _, err = cli(capsys, *base, "--ray", address, "--gpus-per-replica", "1")
    assert code == 2 and "no GPU" in err
    code, _, err = cli(capsys, *base, "--ray", address, "--replicas", "2", "--cpus-per-replica", "4")
    assert code == 2 and "do not fit" in err
    assert not (tmp_path / "o.jsonl").exists()
    # a refusal of the Ray settings comes before --overwrite touches an earlier job's files
    (tmp_path / "o.jsonl").write_text("earlier results\n")
    code, _, err = cli(capsys, *base, "--overwrite", "--ray", address, "--replicas", "2", "--cpus-per-replica", "4")
    assert code == 2 and "do not fit" in err
    assert (tmp_path / "o.jsonl").read_text() == "earlier results\n"


def test_build_processor_isolates_a_bad_row(address: str, llama_dir: Path) -> None:
    """Rows with token-id prompts (numpy arrays once in a Dataset) in 3 groups, one row with an
    invalid sampling parameter: that row gets an error, the others LLM.generate's text."""
    from batchllm import LLM, SamplingParams
    from batchllm.ray import ProcessorConfig, build_processor

    rng = random.Random(3)
    prompts = []
    for _ in range(3):
        prefix = [rng.randrange(5, 1024) for _ in range(40)]
        prompts += [prefix + [rng.randrange(5, 1024) for _ in range(rng.randint(2, 6))] for _ in range(4)]
    rows = [{"prompt": p, "sampling_params": {"max_tokens": 6}} for p in prompts]
    rows.insert(5, {"prompt": prompts[0], "sampling_params": {"max_tokens": 6, "temperature": -1.0}})
    engine = {"kv_cache_memory": 16 << 20, "dtype": "float32"}
    processor = build_processor(ProcessorConfig(str(llama_dir), engine, {"temperature": 0}, replicas=2))
    out = processor(ray.data.from_items(rows)).take_all()
    expected = LLM(str(llama_dir), **engine).generate(prompts, SamplingParams(temperature=0, max_tokens=6),
                                                        use_tqdm=False)
    assert [r["error"] is None for r in out] == [i != 5 for i in range(len(rows))]
    assert "temperature" in out[5]["error"] and out[5]["generated_text"] is None
    good = [r for i, r in enumerate(out) if i != 5]
    assert [list(r["prompt"]) for r in good] == prompts  # input columns kept, input order
    assert [r["generated_text"] for r in good] == [e.outputs[0].text for e in expected]
    assert [r["num_generated_tokens"] for r in good] == [len(e.outputs[0].token_ids) for e in expected]
    assert sum(s.computed_prefill_tokens for s in processor.last_run_stats) == \
        LLM(str(llama_dir), **engine).plan(prompts, SamplingParams(max_tokens=6)).stats.planned_prefill_tokens


def test_build_processor_samples_what_one_llm_samples(address: str, llama_dir: Path) -> None:
    """Eight copies of one sampled prompt, split between bins (one group larger than a replica's
    share): seeds are fixed over the whole batch on the driver, so the rows get LLM.generate's
    eight different samples, not the same draws in every bin."""
    from batchllm import LLM, SamplingParams
    from batchllm.ray import ProcessorConfig, build_processor

    prompt = list(range(7, 47))
    params = {"temperature": 1.0, "max_tokens": 30, "ignore_eos": True}
    engine = {"kv_cache_memory": 16 << 20, "dtype": "float32"}
    processor = build_processor(ProcessorConfig(str(llama_dir), engine, params, replicas=2))
    out = processor(ray.data.from_items([{"prompt": prompt}] * 8)).take_all()
    assert len(processor.last_run_stats) >= 2  # the group was split between bins
    expected = LLM(str(llama_dir), **engine).generate([prompt] * 8, SamplingParams(**params), use_tqdm=False)
    assert [list(r["generated_token_ids"]) for r in out] == [e.outputs[0].token_ids for e in expected]
    assert len({tuple(e.outputs[0].token_ids) for e in expected}) == 8



def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _single_run(batch: Path, out: Path, model: Path) -> None:
    from batchllm.cli import main

    assert main(["run-batch", "-i", str(batch), "-o", str(out), "--model", str(model), *FLAGS]) == 0


def test_results_stream_within_a_bin(address: str, llama_dir: Path, tmp_path: Path) -> None:
    """One replica, one bin (a single prefix group) whose short requests finish long before its
    long ones: their results are in OUT while the bin still runs, so a kill -9 of the driver
    then keeps them, and --resume runs only the rest."""
    from batchllm.distributed.options import RayOptions
    from batchllm.distributed.ray_runner import RayRunner

    rng = random.Random(5)
    prefix = [rng.randrange(5, 1024) for _ in range(40)]
    lines = [{"custom_id": f"r{m}", "prompt": prefix + [rng.randrange(5, 1024) for _ in range(4)], "temperature": 0,
              "max_tokens": 2 if m % 2 else 200, "ignore_eos": True} for m in range(8)]
    batch = _write(tmp_path / "in.jsonl", lines)
    cfg = EngineConfig.from_kwargs(str(llama_dir), kv_cache_memory=16 << 20, dtype="float32")
    prepared, _ = prepare(parse_file(batch).requests, Tokenizer(llama_dir), limits_of_config(cfg), cfg.seed)
    runner = RayRunner(str(llama_dir), {}, RayOptions(address, replicas=1))
    runner.cfg, runner.actors = cfg, [None]
    assert len(runner.plan(prepared)) == 1  # the whole batch is one bin

    single = tmp_path / "single.jsonl"
    _single_run(batch, single, llama_dir)
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", "-i", str(batch), "-o", str(out), "--model", str(llama_dir), *FLAGS,
            "--ray", address, "--replicas", "1", "--cpus-per-replica", "0.5"]
    proc = _start_and_wait(argv, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = _texts(out)  # every line whole and valid, each custom_id once
    assert 0 < len(written) < len(lines), f"{len(written)} results when killed: the bin's results did not stream"
    assert all(lines[int(cid[1:])]["max_tokens"] == 2 for cid in written)  # the short ones
    _resume_and_compare(argv, out, single, ["killed", "complete"])


def test_a_constraint_that_does_not_compile_is_the_same_error_record(address: str, llama_dir: Path,
                                                                     tmp_path: Path) -> None:
    """A json_schema that does not compile: on Ray the same error record (code, param, message)
    as in one process; the other requests complete with the same outputs."""
    rng = random.Random(6)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}
    lines = [{"custom_id": f"ok{m}", "prompt": [rng.randrange(5, 1024) for _ in range(12)], "max_tokens": 4,
              "temperature": 0} for m in range(3)]
    lines.insert(1, {"custom_id": "bad", "prompt": [7, 8, 9], "max_tokens": 4, "response_format": bad})
    batch = _write(tmp_path / "in.jsonl", lines)
    single, ray_out = tmp_path / "single" / "out.jsonl", tmp_path / "ray" / "out.jsonl"
    single.parent.mkdir()
    ray_out.parent.mkdir()
    _single_run(batch, single, llama_dir)
    from batchllm.cli import main

    assert main(["run-batch", "-i", str(batch), "-o", str(ray_out), "--model", str(llama_dir), *FLAGS,
                 "--ray", address, "--replicas", "1", "--cpus-per-replica", "0.5"]) == 0

    def errors(out: Path) -> list[tuple[str, dict]]:
        rows = [json.loads(x) for x in out.with_name("out.errors.jsonl").read_text().splitlines()]
        return [(r["custom_id"], r["response"]["body"]["error"]) for r in rows]

    expected = errors(single)
    assert [(cid, e["code"], e["param"]) for cid, e in expected] == [("bad", "invalid_value", "response_format")]
    assert errors(ray_out) == expected
    assert _texts(ray_out) == _texts(single) and len(_texts(single)) == 3
