"""`import batchllm` makes OpenMP threads sleep when they wait (openmp.py), before torch loads
libgomp, unless the user set a wait policy."""

from __future__ import annotations

import os
import subprocess
import sys

from batchllm.openmp import prefer_passive_wait

SHOW = "import batchllm, os, sys; print(os.environ.get('OMP_WAIT_POLICY')); print('torch' in sys.modules)"


def _run(env: dict[str, str]) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_import_sets_passive_before_torch() -> None:
    assert _run({}) == ["PASSIVE", "False"]


def test_a_users_setting_is_kept() -> None:
    assert _run({"OMP_WAIT_POLICY": "ACTIVE"})[0] == "ACTIVE"
    assert _run({"GOMP_SPINCOUNT": "1000"})[0] == "None"


def test_prefer_passive_wait() -> None:
    env: dict[str, str] = {}
    assert prefer_passive_wait(env) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert not prefer_passive_wait(env)
