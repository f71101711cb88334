"""Run statistics of several engine runs added up; pure (RunStats only)."""

from __future__ import annotations

import dataclasses

from batchllm.outputs import RunStats

# Fields that describe a pool, not work done: within one replica the same pool serves every bin.
_POOL = ("peak_kv_blocks", "num_kv_blocks")
_SAME = ("block_size", "policy")
# A state at the end of a run: one replica's is its last bin's.
_AT_END = ("kv_blocks_in_use_at_end",)


def _add(a: RunStats, b: RunStats, pool_summed: bool, in_sequence: bool) -> RunStats:
    out = RunStats()
    for f in dataclasses.fields(RunStats):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "tokens_per_step":
            value = x + y
        elif f.name in _SAME:
            value = x or y
        elif f.name in _AT_END and in_sequence:
            value = y
        elif f.name in _POOL and not pool_summed:
            value = max(x, y)
        else:
            value = x + y
        setattr(out, f.name, value)
    return out


def after(a: RunStats, b: RunStats) -> RunStats:
    """One replica's statistics over two runs one after the other (bins): work, steps and
    times summed, the KV peak and pool the larger of the two, the state at the end `b`'s."""
    return _add(a, b, pool_summed=False, in_sequence=True)


def over_replicas(per_replica: list[RunStats], wall_time_s: float) -> RunStats:
    """The job's totals over replicas that ran side by side: every counter summed, KV pools and
    peaks too (the cluster's), steps per step dropped; wall time is the caller's (the driver's)."""
    total = RunStats()
    for s in per_replica:
        total = _add(total, s, pool_summed=True, in_sequence=False)
    total.tokens_per_step = []
    total.wall_time_s = wall_time_s
    return total
