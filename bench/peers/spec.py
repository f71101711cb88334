"""The interface shared by the peer runners (stdlib only: imported from every peer's venv).

A workload spec (JSON) is read by every runner:

    {"name": str, "model": "/abs/path/to/HF model folder", "prompts": [[token ids], ...],
     "max_tokens": int, "kv_tokens": int, "threads": 2, "dtype": "bfloat16", "warmup_prompts": int,
     "groups": [[prompt indices], ...]   (optional: prompts known to share a prefix)}

and each runner writes one result (JSON):

    {"engine": str, "version": str, "start_s": float, "warmup_s": float, "batch_s": float,
     "outputs": [[generated token ids] per prompt, in input order], "prompt_tokens": int,
     "output_tokens": int, "config": {...}, "notes": str, "stats": {...} (optional)}

start_s covers engine construction including model load/compile (and, for llama.cpp, the GGUF
conversion when it was not cached); batch_s is the timed full batch only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")


@dataclass
class Spec:
    name: str
    model: str
    prompts: list[list[int]]
    max_tokens: int
    kv_tokens: int
    threads: int = 2
    dtype: str = "bfloat16"
    warmup_prompts: int = 2
    groups: list[list[int]] | None = None
    path: str = ""  # where the spec was read from (not part of the file)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def warmup(self) -> list[list[int]]:
        """The warm-up prompts: the first `warmup_prompts` prompts of the batch."""
        return self.prompts[: max(0, self.warmup_prompts)]

    def model_config(self) -> dict[str, Any]:
        return json.loads((Path(self.model) / "config.json").read_text())

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """layers x kv heads x head dim x 2 (K and V) x bytes per element."""
        c = self.model_config()
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return c["num_hidden_layers"] * kv_heads * head_dim * 2 * bytes_per_elem

    def max_prompt_len(self) -> int:
        return max((len(p) for p in self.prompts), default=0)


@dataclass
class Result:
    engine: str
    version: str
    start_s: float = 0.0
    warmup_s: float = 0.0
    batch_s: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["stats"] is None:
            del d["stats"]
        return d


_SPEC_KEYS = {f for f in Spec.__dataclass_fields__ if f != "path"}


def load_spec(path: str | os.PathLike) -> Spec:
    data = json.loads(Path(path).read_text())
    unknown = set(data) - _SPEC_KEYS
    if unknown:
        print(f"spec: ignoring unknown keys {sorted(unknown)}", file=sys.stderr)
    spec = Spec(**{k: v for k, v in data.items() if k in _SPEC_KEYS}, path=str(Path(path).resolve()))
    spec.model = str(Path(spec.model).expanduser().resolve())
    if not spec.prompts or any(not p for p in spec.prompts):
        raise ValueError("spec: prompts must be non-empty lists of token ids")
    return spec


def write_spec(path: str | os.PathLike, spec: Spec | dict[str, Any]) -> None:
    d = asdict(spec) if isinstance(spec, Spec) else dict(spec)
    d.pop("path", None)
    if d.get("groups") is None:
        d.pop("groups", None)
    Path(path).write_text(json.dumps(d))


def write_result(path: str | os.PathLike, result: Result | dict[str, Any]) -> None:
    d = result.to_dict() if isinstance(result, Result) else dict(result)
    if d.get("outputs") and not d.get("output_tokens"):
        d["output_tokens"] = sum(len(o) for o in d["outputs"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(d))
    os.replace(tmp, path)


def load_result(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def base_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("spec", help="workload spec JSON")
    ap.add_argument("out", help="result JSON to write")
    return ap


def check_outputs(spec: Spec, outputs: list[list[int]]) -> None:
    """Every prompt must have exactly max_tokens generated tokens (ignore_eos)."""
    if len(outputs) != len(spec.prompts):
        raise RuntimeError(f"{len(outputs)} outputs for {len(spec.prompts)} prompts")
    bad = [i for i, o in enumerate(outputs) if len(o) != spec.max_tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} outputs are not {spec.max_tokens} tokens long (first: prompt {bad[0]})")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Call `fn`; return its result and the seconds it took (engine start, warm-up, batch)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
