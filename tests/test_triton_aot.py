"""Every Triton kernel specialisation compiles for sm_90 (H100) ahead of time, without a GPU:
what the interpreter lets through (tl.dot shapes, types the GPU lowering rejects) fails here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_specialisation_compiles_for_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    # its own process: the kernels must be JIT functions (the interpreted tests set TRITON_INTERPRET)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_aot.py")], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("ok attend_tiles") for line in lines) == 12, proc.stdout
    assert sum(line.startswith("ok merge_partials") for line in lines) == 3, proc.stdout
