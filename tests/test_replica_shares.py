"""What each Ray replica asks for (distributed/resources.py) and how their statistics add up
(distributed/stats.py). Pure: no model, no Ray."""

from __future__ import annotations

import dataclasses

import pytest

from batchllm.distributed.resources import ResourceError, replica_resources
from batchllm.distributed.stats import after, over_replicas
from batchllm.outputs import RunStats


def test_default_cpus_leave_one_free() -> None:
    r = replica_resources(2, cluster_cpus=2, largest_node_cpus=2, cluster_gpus=0)
    assert (r.cpus, r.gpus, r.torch_threads) == (0.5, 0.0, 1)
    r = replica_resources(4, cluster_cpus=65, largest_node_cpus=16, cluster_gpus=0)
    assert (r.cpus, r.torch_threads) == (16, 16)  # at most one node's
    assert replica_resources(3, 2, 2, 0).cpus == 0.33  # rounded down: 3 x 0.33 < 1 CPU
    assert replica_resources(1, 1, 1, 0).cpus == 0.5  # a 1-CPU cluster keeps half free


def test_explicit_shares_must_fit() -> None:
    assert replica_resources(2, 8, 8, 0, cpus=2.5).torch_threads == 2
    with pytest.raises(ResourceError, match="do not fit"):
        replica_resources(2, 2, 2, 0, cpus=1.5)
    with pytest.raises(ResourceError, match="no GPU"):
        replica_resources(1, 8, 8, 0, gpus=1)
    with pytest.raises(ResourceError, match="do not fit"):
        replica_resources(3, 8, 8, 2, gpus=1)
    assert replica_resources(2, 8, 8, 2, gpus=1).gpus == 1
    with pytest.raises(ResourceError, match="--replicas"):
        replica_resources(0, 8, 8, 0)


def _stats(computed: int, peak: int, wall: float) -> RunStats:
    return RunStats(num_requests=2, logical_prefill_tokens=100, computed_prefill_tokens=computed, output_tokens=10,
                    steps=3, tokens_per_step=[1, 2, 3], peak_kv_blocks=peak, num_kv_blocks=64, block_size=16,
                    wall_time_s=wall, policy="batchllm")


def test_bins_of_one_replica_and_replicas_side_by_side() -> None:
    one = after(_stats(40, 5, 1.0), _stats(60, 9, 2.0))
    assert (one.computed_prefill_tokens, one.steps, one.peak_kv_blocks, one.num_kv_blocks) == (100, 6, 9, 64)
    assert (one.wall_time_s, one.tokens_per_step, one.block_size, one.policy) == (3.0, [1, 2, 3] * 2, 16, "batchllm")
    total = over_replicas([one, _stats(50, 4, 1.5)], wall_time_s=2.5)
    assert (total.computed_prefill_tokens, total.num_requests, total.output_tokens) == (150, 6, 30)
    assert (total.peak_kv_blocks, total.num_kv_blocks, total.wall_time_s, total.tokens_per_step) == (13, 128, 2.5, [])
    assert over_replicas([], 1.0).computed_prefill_tokens == 0
    # blocks in use at the end: a replica's last bin's; the replicas' together
    ends = [dataclasses.replace(_stats(1, 1, 1.0), kv_blocks_in_use_at_end=k) for k in (3, 7, 2)]
    assert after(ends[0], ends[1]).kv_blocks_in_use_at_end == 7
    assert over_replicas([after(ends[0], ends[1]), ends[2]], 1.0).kv_blocks_in_use_at_end == 9
