"""Opening a job: refuse unusable paths, fresh vs --resume vs --overwrite, what is already done.

All of this runs before the model is loaded, so refusals (exit code 2) are immediate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from batchllm.config import EngineConfig
from batchllm.limits import limits_of_config

from .manifest import Manifest, model_fingerprint
from .prepare import paused_gc
from .progress import log
from .requests import ParsedFile, parse_file
from .writer import CorruptFileError, recover

THROUGHPUT_SETTINGS = ("block_size", "kv_cache_memory", "num_kv_blocks", "max_num_batched_tokens",
                       "max_num_seqs", "policy", "attention", "device", "gpu_memory_utilization")


class UsageError(Exception):
    """A refusal or bad argument: exit code 2, message printed as is."""


def sibling(out: Path, suffix: str) -> Path:
    """OUT.jsonl -> OUT<suffix> (e.g. results.jsonl -> results.errors.jsonl)."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + suffix)


STDOUT = Path("-")  # `-o -`: results (and, without --error-file, error records) go to stdout


@dataclass
class JobFiles:
    input: Path
    output: Path  # STDOUT for `-o -`
    errors: Path  # STDOUT when the output is and no error file is given
    manifest: Path | None  # None when the output is stdout: such a job cannot be resumed
    stats_json: Path | None = None

    @property
    def to_stdout(self) -> bool:
        return self.output == STDOUT


@dataclass
class OpenedJob:
    """A job ready to load the model: its config, parsed input, manifest and what is done."""

    cfg: EngineConfig
    parsed: ParsedFile
    manifest: Manifest  # the earlier run's when resuming, else this run's
    resumed: bool
    this_run: Manifest  # this run's identity and settings (written when fresh)
    done_ids: set[str] = field(default_factory=set)  # custom_ids in OUT
    done_lines: set[int] = field(default_factory=set)  # input lines in the error file

    def is_done(self, line: int, owned_id: str | None) -> bool:
        """A line is done if its error record is written, or the id it owns has a result."""
        return line in self.done_lines or (owned_id is not None and owned_id in self.done_ids)


def _check_paths(f: JobFiles, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse unusable paths; return the job's files that exist (OUT, error file, manifest)."""
    if not f.input.is_file():
        raise UsageError(f"input file {str(f.input)!r} does not exist")
    if f.to_stdout and resume:
        raise UsageError("--resume needs a results file: with -o - the results went to stdout")
    paths = {name: p for name, p in (("output", f.output), ("error file", f.errors), ("manifest", f.manifest))
             if p is not None and p != STDOUT}
    for name, p in paths.items():
        if p.resolve() == f.input.resolve():
            raise UsageError(f"the {name} path {str(p)!r} is the input file")
        if p.is_dir():
            raise UsageError(f"the {name} path {str(p)!r} is a directory")
        if not p.parent.is_dir():
            raise UsageError(f"the folder of the {name} path {str(p)!r} does not exist")
    if f.stats_json is not None and not f.stats_json.parent.is_dir():
        raise UsageError(f"the folder of --stats-json {str(f.stats_json)!r} does not exist")
    if not f.to_stdout and f.output.resolve() == f.errors.resolve():
        raise UsageError("the output and the error file must differ")
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    return [p for p in paths.values() if p.exists()]


def _done(f: JobFiles, stream: TextIO | None) -> tuple[set[str], set[int]]:
    """custom_ids completed in OUT and lines recorded in the error file (partial tails cut)."""
    try:
        results, cut_out = recover(f.output)
        errors, cut_err = recover(f.errors)
    except CorruptFileError as e:
        raise UsageError(f"cannot resume: {e}") from e
    for cut, p in ((cut_out, f.output), (cut_err, f.errors)):
        if cut:
            log(f"{p}: cut a partial last line ({cut} bytes) left by a crash", stream)
    return ({r["custom_id"] for r in results if isinstance(r.get("custom_id"), str)},
            {r["line"] for r in errors if isinstance(r.get("line"), int)})


def open_job(f: JobFiles, model: str, engine_kwargs: dict[str, Any], resume: bool, overwrite: bool,
             stream: TextIO | None = None) -> OpenedJob:
    """Check paths and settings, parse the input, and decide: fresh, overwrite or resume."""
    existing = _check_paths(f, resume, overwrite)
    try:
        cfg = EngineConfig.from_kwargs(model, **engine_kwargs)
        limits = limits_of_config(cfg)
    except (ValueError, TypeError, OSError) as e:  # ModelFolderError is a ValueError
        raise UsageError(str(e)) from e
    with paused_gc():
        parsed = parse_file(f.input)
    base = f.output.resolve().parent
    this = Manifest(
        input_path=os.path.relpath(f.input.resolve(), base), input_sha256=parsed.sha256,
        model_path=str(Path(model).resolve()), model_fingerprint=model_fingerprint(model),
        settings={"dtype": limits.dtype, "seed": cfg.seed, "max_model_len": limits.max_model_len},
        engine={k: getattr(cfg, k) for k in THROUGHPUT_SETTINGS}, error_file=os.path.relpath(f.errors.resolve(), base))
    if existing and overwrite:
        for p in existing:
            p.unlink()
        log(f"--overwrite: removed {', '.join(map(str, existing))}", stream)
    elif existing and not resume:
        raise UsageError(f"{', '.join(map(str, existing))} already exist(s); pass --resume to continue that job "
                         f"or --overwrite to start over")
    elif existing:
        if f.manifest is None or not f.manifest.exists():
            raise UsageError(f"cannot resume: {f.manifest} (the run manifest) is missing, so the input and model "
                             f"of the earlier run cannot be checked; use --overwrite to start over")
        try:
            old = Manifest.load(f.manifest)
        except ValueError as e:
            raise UsageError(str(e)) from e
        problems = old.mismatches(this, base)
        if problems:
            raise UsageError("cannot resume: " + "; ".join(problems) + ". Resume with the original input, model "
                             "and settings, or use --overwrite (or another -o) to start a new job")
        changed = [f"{k} {old.engine.get(k)!r} -> {this.engine[k]!r}" for k in THROUGHPUT_SETTINGS
                   if k in old.engine and old.engine[k] != this.engine[k]]
        if changed:
            log(f"resuming with changed throughput settings: {', '.join(changed)}", stream)
        done_ids, done_lines = _done(f, stream)
        return OpenedJob(cfg, parsed, old, True, this, done_ids, done_lines)
    elif resume:
        log("--resume: no earlier output found; starting a new job", stream)
    return OpenedJob(cfg, parsed, this, False, this)
