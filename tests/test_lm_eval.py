"""The lm-evaluation-harness model (issue 23): a local multiple-choice task through batchllm's
model and through lm-eval's own `hf` model on the same tiny model gives the same per-request
loglikelihoods (fp32, within 1e-4) and the same accuracy; rolling loglikelihoods and greedy
generation agree too. Offline: the task reads a JSONL file from tests/data (nothing is downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"

lm_eval = pytest.importorskip("lm_eval")  # the lm-eval extra; CI installs it in .ci/lm-eval (with lm-eval[hf])

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

DATA = Path(__file__).parent / "data" / "lm_eval_mc.jsonl"
TASK = "batchllm_tiny_mc"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    (d / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return d


@pytest.fixture(scope="module")
def models(llama_dir: Path):
    import batchllm.integrations.lm_eval  # noqa: F401  (registers "batchllm")
    from lm_eval.api.registry import get_model

    ours = get_model("batchllm").create_from_arg_string(f"pretrained={llama_dir},dtype=float32,num_kv_blocks=512",
                                                        {"batch_size": 1, "device": None})
    hf = get_model("hf").create_from_arg_string(f"pretrained={llama_dir},dtype=float32",
                                                {"batch_size": 4, "device": "cpu"})
    return ours, hf


def _evaluate(lm, task_dir: Path) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=2, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0)


def test_multiple_choice_task_matches_hf(models, task_dir: Path) -> None:
    ours, hf = models
    a, b = _evaluate(ours, task_dir), _evaluate(hf, task_dir)
    sa = sorted(a["samples"][TASK], key=lambda s: s["doc_id"])
    sb = sorted(b["samples"][TASK], key=lambda s: s["doc_id"])
    assert len(sa) == len(sb) == 12
    for x, y in zip(sa, sb):
        assert [r[0] for r in x["resps"]] and len(x["resps"]) == len(y["resps"]) == 4
        for (lx, gx), (ly, gy) in zip((r[0] for r in x["resps"]), (r[0] for r in y["resps"])):
            assert abs(float(lx) - float(ly)) < 1e-4 and bool(gx) == bool(gy)
    assert a["results"][TASK]["acc,none"] == b["results"][TASK]["acc,none"]


def test_registered_by_name_beside_builtin_models() -> None:
    import batchllm.integrations.lm_eval  # noqa: F401
    from lm_eval.api.registry import get_model

    assert get_model("batchllm").__name__ == "BatchLLMEval"
    assert get_model("hf") is not None  # lm-eval's own models stay available


def test_rolling_and_generation_match_hf(models) -> None:
    ours, hf = models
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world", "a"]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    for x, y in zip(ours.loglikelihood_rolling(reqs, disable_tqdm=True), hf.loglikelihood_rolling(reqs, disable_tqdm=True)):
        assert abs(x - y) < 1e-4
    gen = [Instance("generate_until", {}, (f"Question: {t}\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), i)
           for i, t in enumerate(["What is two plus two?", "Name a color."])]
    assert ours.generate_until(gen, disable_tqdm=True) == hf.generate_until(gen, disable_tqdm=True)
    # the chat-template hooks
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == ours.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert ours.chat_template(False) is None


def test_batchllm_eval_runs_lm_eval_command_line(llama_dir: Path, task_dir: Path, tmp_path: Path) -> None:
    """`batchllm eval ARGS` is lm-eval's command line with "batchllm" registered."""
    import json

    from batchllm.cli import main

    code = main(["eval", "--model", "batchllm", "--model_args", f"pretrained={llama_dir},dtype=float32,num_kv_blocks=512",
                 "--tasks", TASK, "--include_path", str(task_dir), "--limit", "4", "--output_path", str(tmp_path),
                 "--device", "cpu"])
    assert code == 0
    (result,) = tmp_path.rglob("results_*.json")
    assert json.loads(result.read_text())["results"][TASK]["acc,none"] >= 0
