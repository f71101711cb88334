"""Builds the scheduler of a policy (batchllm / fcfs / fcfs-lru / lpm) from its parts."""

from __future__ import annotations

from batchllm.config import EngineConfig
from batchllm.planner import Plan
from batchllm.scheduler.batch_scheduler import GroupPolicy
from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.groups import PlanQueue, build_groups
from batchllm.scheduler.queues import FcfsQueue, LpmQueue, WaitingQueue
from batchllm.scheduler.scheduler import CachePolicy, Policy, Scheduler
from batchllm.sequence import Sequence


def make_scheduler(config: EngineConfig, num_blocks: int, seqs: list[Sequence], plan: Plan | None,
                   max_context: int | None = None) -> Scheduler:
    """A scheduler loaded with `seqs` (in input order); `plan` is required by `batchllm`;
    `max_context`: the longest a sequence grows (the engine ends it there; default the pool).

    Each policy is one `Scheduler` (the step loop) built from a waiting queue and a `Policy`:
    - fcfs: `FcfsQueue` (input order), `CachePolicy` over a block manager without caching;
    - fcfs-lru: `FcfsQueue`, `CachePolicy` with the prefix cache (admissions start on cache hits);
    - lpm: `LpmQueue` (most cached blocks first), `CachePolicy` with the prefix cache;
    - batchllm: `PlanQueue` (plan order, group by group), `GroupPolicy` (group prefixes, KV rule).
    """
    caching = config.policy in ("fcfs-lru", "lpm")
    bm = BlockManager(num_blocks, config.block_size, enable_caching=caching)
    queue: WaitingQueue
    policy: Policy
    if config.policy == "batchllm":
        if plan is None:
            raise ValueError("the batchllm policy needs a plan")
        groups = build_groups(plan, seqs)
        policy = GroupPolicy(bm, groups, config.memory_centric, config.kv_threshold, max_context)
        queue = PlanQueue(groups)  # after the policy, which may unshare groups that cannot fit
    else:
        queue = LpmQueue(seqs, bm, config.lpm_window) if config.policy == "lpm" else FcfsQueue(seqs)
        policy = CachePolicy(bm)
    return Scheduler(bm, queue, policy, config.max_num_batched_tokens, config.effective_max_num_seqs())
