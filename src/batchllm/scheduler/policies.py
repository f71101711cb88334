"""Builds the scheduler of a policy: batchllm / fcfs / fcfs-lru / lpm."""

from __future__ import annotations

from batchllm.config import EngineConfig
from batchllm.planner import Plan
from batchllm.scheduler.block_manager import BlockManager
from batchllm.scheduler.queues import FcfsQueue, LpmQueue
from batchllm.scheduler.scheduler import Scheduler
from batchllm.sequence import Sequence


def make_scheduler(config: EngineConfig, num_blocks: int, seqs: list[Sequence], plan: Plan | None) -> Scheduler:
    """A scheduler loaded with `seqs` (in input order); `plan` is required by `batchllm`."""
    caching = config.policy in ("fcfs-lru", "lpm")
    bm = BlockManager(num_blocks, config.block_size, enable_caching=caching)
    max_seqs = config.effective_max_num_seqs()
    if config.policy == "lpm":
        queue = LpmQueue(bm, config.lpm_window)
    else:
        queue = FcfsQueue()
    sched = Scheduler(bm, queue, config.max_num_batched_tokens, max_seqs)
    for seq in seqs:
        sched.add(seq)
    return sched
