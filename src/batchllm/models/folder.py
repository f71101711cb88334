"""What a Hugging Face model folder must hold, and its config.json (or a GGUF file's metadata)
read into a ModelConfig.

No torch import: `batchllm plan` and run-batch's checks read folders before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from batchllm.models import gguf_file
from batchllm.models.config import ModelConfig
from batchllm.models.gguf_file import check_gguf, is_gguf


class ModelFolderError(ValueError):
    """The model folder is missing a file or holds an unusable one."""


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder, from the index when there is one."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelFolderError(f"{path}: shard(s) named in the index are missing: {', '.join(missing)}")
        return files
    return sorted(path.glob("*.safetensors"))


def check_folder(path: Path) -> None:
    """Raise one ModelFolderError naming everything a model folder lacks."""
    if not path.is_dir():
        raise ModelFolderError(f"model folder {str(path)!r} does not exist (batchllm loads local folders only)")
    missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).exists()]
    if not (path / "model.safetensors.index.json").exists() and not list(path.glob("*.safetensors")):
        missing.append("*.safetensors weights")
    if missing:
        raise ModelFolderError(f"model folder {str(path)!r} lacks: {', '.join(missing)}")


def read_config(path: str | Path) -> ModelConfig:
    """The model's ModelConfig: from config.json, or from a GGUF file's metadata."""
    path = Path(path)
    if is_gguf(path):
        try:
            check_gguf(path)
        except ValueError as e:
            raise ModelFolderError(str(e)) from e
        return ModelConfig.from_hf(gguf_file.hf_config(path))
    check_folder(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    return ModelConfig.from_hf(raw)
