"""Load a model's weights: a Hugging Face folder's safetensors (one file or sharded) or a GGUF file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from batchllm.models import gguf_file
from batchllm.models.config import ModelConfig
from batchllm.models.folder import ModelFolderError, weight_files
from batchllm.models.llama import CausalLM, Rotary, local_rope_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_EXPERT = re.compile(r"\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
                "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", 0), "down_proj": ("down_proj", 0)}


def _hf_to_ours(name: str) -> tuple[str, Any]:
    """Map a checkpoint tensor name to (our parameter name, part key within a fused weight):
    an int for q/k/v and gate/up, (expert, part) for one expert's matrix, None for a whole tensor."""
    name = name.removeprefix("model.").replace(".block_sparse_moe.gate.", ".mlp.gate.")
    m = _EXPERT.search(name)
    if m:
        ours, part = _EXPERT_PART[m.group(2)]
        return name[:m.start()] + f".mlp.experts.{ours}", (int(m.group(1)), part)
    for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        if f".self_attn.{proj}." in name:
            return name.replace(proj, "qkv_proj"), part
    for part, proj in enumerate(("gate_proj", "up_proj")):
        if f".mlp.{proj}." in name:
            return name.replace(proj, "gate_up_proj"), part
    return name, None


def _assemble(name: str, got: dict[Any, torch.Tensor], experts: int) -> torch.Tensor | None:
    """The parameter from its checkpoint parts; None when parts are missing."""
    if None in got:  # whole in the checkpoint (fused q/k/v of Phi3, 3-D experts as transformers 5 saves them)
        return got[None] if len(got) == 1 else None
    if ".experts." in name:  # one [2I, H] or [H, I] matrix per expert, stacked
        per = 2 if name.endswith("gate_up_proj") else 1
        if len(got) != experts * per:
            return None
        return torch.stack([torch.cat([got[(e, j)] for j in range(per)], dim=0) for e in range(experts)])
    n_parts = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 1
    if len(got) != n_parts:
        return None
    return torch.cat([got[i] for i in sorted(got)], dim=0)


def _checkpoint_tensors(path: Path, wanted: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for the checkpoint tensors whose parameter is in `wanted`."""
    if gguf_file.is_gguf(path):
        for key, tensor in gguf_file.tensors(path):
            if _hf_to_ours(key)[0] in wanted:
                yield key, tensor
        return
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if _hf_to_ours(key)[0] in wanted:
                    yield key, f.get_tensor(key)


def load_model(path: str | Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, pack_weights: bool = False) -> CausalLM:
    """Build the model on `device` in `dtype` with the folder's weights; every parameter must be
    found. `pack_weights`: pack the linear weights for oneDNN where possible (`CausalLM.pack_linear_weights`)."""
    path = Path(path)
    with torch.device("meta"):
        model = CausalLM(cfg, max_positions=1)
    wanted = dict(model.named_parameters())
    if cfg.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)
    parts: dict[str, dict[Any, torch.Tensor]] = {}
    for key, tensor in _checkpoint_tensors(path, set(wanted)):
        ours, part = _hf_to_ours(key)
        parts.setdefault(ours, {})[part] = tensor.to(dtype)
    state, missing = {}, []
    for name, param in wanted.items():
        t = _assemble(name, parts.get(name, {}), cfg.num_experts)
        if t is None:
            missing.append(name)
            continue
        if t.shape != param.shape:
            raise ModelFolderError(f"{path}: weight {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        state[name] = t.to(device=device, dtype=dtype)
    if missing:
        raise ModelFolderError(f"{path}: checkpoint lacks weights for: {', '.join(missing[:8])}"
                               + (f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = Rotary(cfg, max_positions).to(device)
    if cfg.local_rope_theta is not None:
        model.local_rotary = Rotary(local_rope_config(cfg), max_positions).to(device)
    if pack_weights:
        model.pack_linear_weights()
    return model.eval()
