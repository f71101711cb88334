"""Builds the scheduler of a policy: batchllm / fcfs / fcfs-lru / lpm."""

from __future__ import annotations

from batchllm.config import EngineConfig
from batchllm.planner import Plan
from batchllm.scheduler.batch_scheduler import BatchScheduler
from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.queues import FcfsQueue, LpmQueue
from batchllm.scheduler.scheduler import Scheduler
from batchllm.sequence import Sequence


def make_scheduler(config: EngineConfig, num_blocks: int, seqs: list[Sequence], plan: Plan | None) -> Scheduler:
    """A scheduler loaded with `seqs` (in input order); `plan` is required by `batchllm`."""
    caching = config.policy in ("fcfs-lru", "lpm")
    bm = BlockManager(num_blocks, config.block_size, enable_caching=caching)
    max_seqs = config.effective_max_num_seqs()
    if config.policy == "batchllm":
        if plan is None:
            raise ValueError("the batchllm policy needs a plan")
        return BatchScheduler(bm, plan, seqs, config.max_num_batched_tokens, max_seqs,
                              config.memory_centric, config.kv_threshold)
    queue = LpmQueue(bm, config.lpm_window) if config.policy == "lpm" else FcfsQueue()
    sched = Scheduler(bm, queue, config.max_num_batched_tokens, max_seqs)
    for seq in seqs:
        sched.add(seq)
    return sched
