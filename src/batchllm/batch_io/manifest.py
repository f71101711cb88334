"""The run manifest written beside the output: what a resume must match.

Must match on resume (they change results): the input file (sha256), the model (fingerprint),
the effective dtype, seed and max_model_len, and the error file. The cap for chat requests
without max_tokens (`max_context`) is fixed by the first run and reused. Throughput settings
(KV memory, block size, batch limits, policy, ...) may change between runs; each run is logged.
The manifest is replaced atomically (write a temporary file, fsync, rename).

The input and error file paths are stored relative to the output's folder, so a job folder
moved or copied elsewhere resumes; the model path is stored as given (its fingerprint, not its
path, is compared).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchllm import __version__

RESULT_SETTINGS = ("dtype", "seed", "max_model_len")  # effective values; compared on resume
_SAMPLE_BYTES = 1 << 16
_SAMPLES = 16


def model_fingerprint(path: str | Path) -> str:
    """sha256 over the model folder's small files (config, tokenizer, templates) and, for each
    weight file (or the one GGUF file), its size, its header and 16 evenly spaced 64 KiB samples (cheap for
    any model size; catches regenerated or re-quantized weights)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        if f.suffix in (".json", ".jinja", ".txt", ".model"):
            h.update(f"{f.name}\0".encode() + f.read_bytes() + b"\0")
        elif f.suffix in (".safetensors", ".gguf"):
            size = f.stat().st_size
            h.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                # safetensors: the JSON header; GGUF (no header length): the first 16 MiB, which
                # hold its metadata (vocabulary included) for the models batchllm runs
                header_len = int.from_bytes(fh.read(8), "little") if f.suffix == ".safetensors" else 16 << 20
                h.update(fh.read(min(header_len, 64 << 20)))
                for k in range(_SAMPLES):
                    fh.seek(size * k // _SAMPLES)
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Manifest:
    """What was run: input, model, settings; `runs` logs each start/resume."""

    input_path: str
    input_sha256: str
    model_path: str
    model_fingerprint: str
    settings: dict[str, Any]  # RESULT_SETTINGS (must match) + max_context (reused by every resume)
    engine: dict[str, Any]  # throughput settings of the first run (later runs: see `runs`)
    error_file: str
    version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"batchllm_version": self.version, "created": self.created,
                "input": {"path": self.input_path, "sha256": self.input_sha256},
                "model": {"path": self.model_path, "fingerprint": self.model_fingerprint},
                "settings": self.settings, "engine": self.engine, "error_file": self.error_file,
                "runs": self.runs}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        return cls(input_path=d["input"]["path"], input_sha256=d["input"]["sha256"],
                   model_path=d["model"]["path"], model_fingerprint=d["model"]["fingerprint"],
                   settings=dict(d["settings"]), engine=dict(d.get("engine", {})), error_file=d["error_file"],
                   version=d.get("batchllm_version", "?"), created=d.get("created", "?"), runs=list(d.get("runs", [])))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read the run manifest {path}: {e}") from e

    def mismatches(self, other: Manifest, base: str | Path = ".") -> list[str]:
        """Why `other` (this run) may not resume the job this manifest describes; relative paths
        are taken from `base` (the output's folder)."""
        out = []
        if other.input_sha256 != self.input_sha256:
            out.append(f"the input file differs (sha256 {other.input_sha256[:12]}… now, "
                       f"{self.input_sha256[:12]}… when {self.input_path} was started)")
        if other.model_fingerprint != self.model_fingerprint:
            out.append(f"the model differs ({other.model_path} now, {self.model_path} before: config, "
                       f"tokenizer or weights changed)")
        for key in RESULT_SETTINGS:
            if key in self.settings and key in other.settings and self.settings[key] != other.settings[key]:
                out.append(f"{key} differs ({other.settings[key]!r} now, {self.settings[key]!r} before)")
        if (Path(base) / other.error_file).resolve() != (Path(base) / self.error_file).resolve():
            out.append(f"the error file differs ({other.error_file} now, {self.error_file} before)")
        return out
