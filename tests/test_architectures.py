"""Architectures and rope types beyond Llama/Mistral/Qwen2/Qwen3 defaults (Phi3 with fused
weights, partial rotary and longrope; yarn; longrope on Llama; MoE; Gemma 2/3; sliding windows):
greedy fp32 equal to transformers token for token, and outputs unchanged by prefix sharing,
preemption and chunking."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from batchllm import LLM, SamplingParams
from batchllm.models.config import ModelConfig

NEW_TOKENS = 16


def _factors(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.uniform(1.0, 4.0), 3) for _ in range(n)]


def longrope(rot_dim: int, omax: int) -> dict[str, Any]:
    return {"rope_type": "longrope", "short_factor": _factors(rot_dim // 2, 1), "long_factor": _factors(rot_dim // 2, 2),
            "original_max_position_embeddings": omax}


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}  # crossed by the test prompts
# test shape: hidden 64, 4 heads -> head_dim 16; Phi3 with partial rotary 0.5 rotates 8 dims.
# longrope: transformers switches a whole sequence to the long factors once it passes
# original_max_position_embeddings ("Long-context rope" in models/config.py), so the oracle models keep
# it above every sequence here, and `test_longrope_tables_match_transformers` checks the long side.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "phi3-longrope": ("phi3", {"partial_rotary_factor": 0.5, "max_position_embeddings": 8192,
                               "original_max_position_embeddings": 4096, "rope_scaling": longrope(8, 4096)}),
    "phi3-plain": ("phi3", {}),
    "qwen2-yarn": ("qwen2", {"rope_scaling": YARN, "max_position_embeddings": 128}),
    "qwen3-yarn": ("qwen3", {"rope_scaling": {**YARN, "beta_fast": 16, "attention_factor": 1.3},
                             "max_position_embeddings": 128}),
    "llama-longrope": ("llama", {"max_position_embeddings": 512, "rope_scaling": longrope(16, 256)}),
    # dynamic NTK only departs from the default past max_position_embeddings, the engine's limit
    "qwen2-dynamic": ("qwen2", {"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}, "max_position_embeddings": 96}),
    # MoE: 4 experts, 2 per token; Mixtral always renormalises the top-k weights
    "mixtral": ("mixtral", {}),
    "qwen3-moe": ("qwen3_moe", {}),
    "qwen3-moe-no-renorm-dense-layer0": ("qwen3_moe", {"norm_topk_prob": False, "mlp_only_layers": [0]}),
    # Gemma: sliding window 8 (testing.py), so every prompt here crosses it; Gemma 2's caps as
    # released (50 / 30) and small ones that bind on a random model; Gemma 3 with 3 layers (two
    # sliding on their own rope base, one global with linear rope scaling) and tied embeddings
    "gemma2": ("gemma2", {}),
    "gemma2-tight-caps": ("gemma2", {"attn_logit_softcapping": 1.0, "final_logit_softcapping": 2.0}),
    "gemma3": ("gemma3", {}),
    "gemma3-3-layers-scaled-tied": ("gemma3", {"num_hidden_layers": 3, "tie_word_embeddings": True,
                                               "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    # windows on every layer (Mistral, Phi3) and from max_window_layers on (Qwen2)
    "mistral-window": ("mistral", {"sliding_window": 12}),
    "phi3-window": ("phi3", {"sliding_window": 10}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1}),
}
# wide enough that a group's members start inside it (their prefix shared on the windowed
# layers) and leave it while they decode
WIDE = {"mistral-window-40": ("mistral", {"sliding_window": 40}), "gemma2-window-40": ("gemma2", {"sliding_window": 40})}
# For the engine-only checks the switch is low, so sequences cross it.
CROSSING = {"phi3-longrope": ("phi3", {"partial_rotary_factor": 0.5, "max_position_embeddings": 256,
                                       "original_max_position_embeddings": 40, "rope_scaling": longrope(8, 40)})}


def greedy(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, **kw)


def token_ids(outs: list) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_matches_transformers(name: str, model_factory: Callable[..., Path],
                                     random_prompts: Callable[..., list[list[int]]]) -> None:
    import transformers
    arch, overrides = MODELS[name]
    path = model_factory(arch, **overrides)
    prompts = random_prompts(6, 5, 60, seed=11)
    llm = LLM(str(path), dtype="float32", num_kv_blocks=256)
    # both stop at the model's EOS ids (a random model emits them now and then)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, (p, out) in enumerate(zip(prompts, outs)):
        with torch.no_grad():
            r = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        assert list(out.outputs[0].token_ids) == r.sequences[0, len(p):].tolist(), f"{name}: prompt {i}"
        for ours, logits in zip(out.outputs[0].logprobs, r.logits):
            ref = torch.log_softmax(logits[0].float(), dim=-1)
            for tok, lp in ours.items():
                assert lp.logprob == pytest.approx(ref[tok].item(), abs=2e-4), (name, i, tok)


@pytest.mark.parametrize("name", list(MODELS) + [f"{n}-crossing" for n in CROSSING] + list(WIDE))
def test_sharing_preemption_and_chunks_leave_outputs_unchanged(name: str, model_factory: Callable[..., Path],
                                                               random_prompts: Callable[..., list[list[int]]]) -> None:
    arch, overrides = CROSSING[name.removesuffix("-crossing")] if name.endswith("-crossing") else \
        {**MODELS, **WIDE}[name]
    path = model_factory(arch, **overrides)
    stems = random_prompts(3, 25, 35, seed=21)
    prompts = [stems[i % 3] + tail for i, tail in enumerate(random_prompts(12, 2, 15, seed=22))]
    alone = LLM(str(path), dtype="float32", num_kv_blocks=512, policy="fcfs")
    ref = [token_ids(alone.generate([p], greedy(), use_tqdm=False))[0] for p in prompts[:4]]
    shared = LLM(str(path), dtype="float32", num_kv_blocks=512, policy="batchllm")
    full = token_ids(shared.generate(prompts, greedy(), use_tqdm=False))
    assert full[:4] == ref
    stats = shared.last_run_stats
    assert stats.computed_prefill_tokens < stats.logical_prefill_tokens
    small = LLM(str(path), dtype="float32", num_kv_blocks=8, policy="batchllm", memory_centric=False,
                max_num_batched_tokens=16)
    assert token_ids(small.generate(prompts, greedy(), use_tqdm=False)) == full
    assert small.last_run_stats.preemptions > 0 and max(small.last_run_stats.tokens_per_step) <= 16
    # every group prefix attended once per group where the plan allows (windowed layers: members
    # whose context fits the window), with small chunks
    forced = LLM(str(path), dtype="float32", num_kv_blocks=512, policy="batchllm", attention="prefix-shared",
                 max_num_batched_tokens=24)
    assert token_ids(forced.generate(prompts, greedy(), use_tqdm=False)) == full
    assert forced.last_run_stats.prefix_shared_attention_steps > 0


@pytest.mark.parametrize("name", list(WIDE))
def test_wide_windows_share_prefixes_and_match_transformers(name: str, model_factory: Callable[..., Path],
                                                            random_prompts: Callable[..., list[list[int]]]) -> None:
    """Group members that start inside the window share their prefix on the windowed layers and
    keep matching transformers after they leave it."""
    import transformers
    arch, overrides = WIDE[name]
    path = model_factory(arch, **overrides)
    stem = random_prompts(1, 24, 24, seed=31)[0]
    prompts = [stem + tail for tail in random_prompts(4, 2, 6, seed=32)]
    params = SamplingParams(temperature=0, max_tokens=24)  # both stop at the model's EOS ids
    llm = LLM(str(path), dtype="float32", num_kv_blocks=64, block_size=8, policy="batchllm", attention="prefix-shared")
    backend, windowed_groups = llm.engine.runner.backend, []
    prepare = backend.prepare

    def spy(meta: Any) -> Any:
        step = prepare(meta)
        windowed_groups.append(sum(len(p.groups) for w, p in step.plans.items() if w is not None))
        return step
    backend.prepare = spy  # type: ignore[method-assign]
    ours = token_ids(llm.generate(prompts, params, use_tqdm=False))
    assert max(windowed_groups) > 0 and windowed_groups[-1] == 0  # shared inside the window, not past it
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for p, got in zip(prompts, ours):
        with torch.no_grad():
            r = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert got == r[0, len(p):].tolist()


@pytest.mark.parametrize("arch,overrides", [("gemma2", {"sliding_window": 4096}), ("mistral", {"sliding_window": None}),
                                            ("gemma2", {"attn_logit_softcapping": None}),
                                            ("gemma2", {"final_logit_softcapping": None})])
def test_windows_and_caps_change_the_model(arch: str, overrides: dict[str, Any], model_factory: Callable[..., Path],
                                           random_prompts: Callable[..., list[list[int]]]) -> None:
    """The window and the soft-caps are not silently ignored: the same weights without them (or,
    for Mistral, with a window of 12) give other tokens or log-probs (the final cap is monotonic:
    it changes log-probs only)."""
    prompts = random_prompts(4, 30, 50, seed=6)
    base = MODELS["gemma2-tight-caps"][1] if arch == "gemma2" else {"sliding_window": 12}
    params = greedy(logprobs=1)

    def run(overrides: dict[str, Any]) -> list:
        llm = LLM(str(model_factory(arch, **overrides)), dtype="float32", num_kv_blocks=64)
        return [[(t, round(lp[t].logprob, 4)) for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                for o in llm.generate(prompts, params, use_tqdm=False)]
    assert run(base) != run({**base, **overrides})


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_longrope_tables_match_transformers(partial: float, model_factory: Callable[..., Path]) -> None:
    """Below the switch the short factors, from it on the long ones, each as transformers computes
    them (it picks one set per forward call, by the call's largest position), attention factor included."""
    import json

    import transformers

    from batchllm.models.llama import Rotary
    rot = int(16 * partial)
    path = model_factory("phi3", partial_rotary_factor=partial, max_position_embeddings=256,
                         original_max_position_embeddings=40, rope_scaling=longrope(rot, 40))
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    ours = Rotary(cfg, 256)
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    hf_rope = transformers.models.phi3.modeling_phi3.Phi3RotaryEmbedding(hf_cfg)
    x = torch.zeros(1, 1, 16)
    for positions in (torch.arange(0, 40), torch.arange(0, 200)):  # all below the switch; across it
        cos, sin = hf_rope(x, positions[None])
        rows = positions[positions < 40] if positions[-1] < 40 else positions[positions >= 40]
        assert torch.allclose(ours.cos[rows], cos[0, rows], atol=1e-6)
        half = rot // 2
        assert torch.allclose(ours.sin[rows, half:], sin[0, rows, half:], atol=1e-6)
        assert torch.allclose(-ours.sin[rows, :half], sin[0, rows, :half], atol=1e-6)


def test_yarn_and_longrope_change_the_model(model_factory: Callable[..., Path],
                                            random_prompts: Callable[..., list[list[int]]]) -> None:
    """The scaling is not silently ignored: same weights, different outputs."""
    prompts = random_prompts(4, 40, 60, seed=5)
    for arch, overrides in (MODELS["qwen2-yarn"], MODELS["llama-longrope"]):
        scaled = LLM(str(model_factory(arch, **overrides)), dtype="float32", num_kv_blocks=64)
        plain_overrides = {k: v for k, v in overrides.items() if k != "rope_scaling"}
        plain = LLM(str(model_factory(arch, **plain_overrides)), dtype="float32", num_kv_blocks=64)
        assert token_ids(scaled.generate(prompts, greedy(), use_tqdm=False)) != \
            token_ids(plain.generate(prompts, greedy(), use_tqdm=False)), arch


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_checkpoint_as_transformers_saves_it(arch: str, model_factory: Callable[..., Path], tmp_path: Path,
                                                 random_prompts: Callable[..., list[list[int]]]) -> None:
    """The Hub's per-expert matrices and transformers 5's stacked [experts, ...] tensors load alike."""
    import transformers
    path = model_factory(arch)
    transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    prompts = random_prompts(4, 5, 30, seed=9)
    ours = [token_ids(LLM(str(p), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False))
            for p in (path, tmp_path)]
    assert ours[0] == ours[1]
    assert LLM(str(path), dtype="float32", num_kv_blocks=8).engine.model_config.num_experts == 4


def test_moe_routes_each_token_to_its_top_k(model_factory: Callable[..., Path]) -> None:
    """The grouped computation equals a per-token sum over the token's k experts."""
    import torch.nn.functional as F
    llm = LLM(str(model_factory("qwen3_moe", norm_topk_prob=False)), dtype="float32", num_kv_blocks=8)
    moe = llm.engine.runner.model.layers[0].mlp
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    experts, weights = moe.route(x)
    assert experts.shape == (37, 2) and (weights.sum(-1) < 1).all()  # not renormalised
    want = torch.zeros_like(x)
    for t in range(37):
        for e, w in zip(experts[t].tolist(), weights[t]):
            gate, up = F.linear(x[t], moe.experts.gate_up_proj[e]).chunk(2)
            want[t] += w * F.linear(F.silu(gate) * up, moe.experts.down_proj[e])
    assert torch.allclose(moe(x), want, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "phi3", "gemma2", "gemma3"])
def test_bf16_runs_with_the_cpu_kernels_and_packed_weights(arch: str, model_factory: Callable[..., Path],
                                                           random_prompts: Callable[..., list[list[int]]]) -> None:
    """bf16 takes the C norm/activation passes (Gemma: its own norms and windowed attention in
    PyTorch) and packs the dense weights (experts stay plain); its greedy tokens mostly agree with
    fp32 (random weights make near-ties, so not all)."""
    path = model_factory(arch)
    prompts = random_prompts(6, 5, 30, seed=13)
    fp32 = token_ids(LLM(str(path), dtype="float32", num_kv_blocks=64).generate(prompts, greedy(), use_tqdm=False))
    llm = LLM(str(path), dtype="bfloat16", num_kv_blocks=64)
    bf16 = token_ids(llm.generate(prompts, greedy(), use_tqdm=False))
    first = sum(a[0] == b[0] for a, b in zip(fp32, bf16))
    assert first >= 4, (fp32, bf16)


@pytest.mark.parametrize("arch", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_gemma_config_defaults_as_transformers(arch: str) -> None:
    """A config.json that leaves the Gemma keys out gets transformers' defaults: layer types,
    window, soft-caps, query_pre_attn_scalar, rope bases, tied embeddings."""
    import transformers
    raw = dict(architectures=[arch], vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=7,
               num_attention_heads=2)
    hf = (transformers.Gemma2Config if arch.startswith("Gemma2") else transformers.Gemma3TextConfig)(**raw)
    ours = ModelConfig.from_hf(raw)
    assert ours.layer_windows == tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    assert ours.attn_logit_softcapping == (hf.attn_logit_softcapping if arch.startswith("Gemma2") else None)
    assert ours.final_logit_softcapping == hf.final_logit_softcapping
    assert ours.attn_scale == hf.query_pre_attn_scalar ** -0.5 and ours.tie_word_embeddings == hf.tie_word_embeddings
    if arch.startswith("Gemma3"):
        assert ours.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"]
        assert ours.local_rope_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    else:
        assert ours.rope_theta == hf.rope_parameters["rope_theta"]
