"""KV-read cost of an attention plan: what sharing a prefix saves, for the share decision and bench."""

from __future__ import annotations

from batchllm.attention.plan import AttentionPlan, Group


def prefix_reads(plan: AttentionPlan, group: Group, rows_per_read: int) -> int:
    """How often `group`'s prefix is read in one layer: once per `rows_per_read` of its members'
    query rows (an executor stacks that many rows on one pass over the prefix)."""
    rows = len(group.decodes) + sum(plan.prefills.num_rows[i] for i in group.prefills)
    return -(-rows // rows_per_read)


def saved_tokens(plan: AttentionPlan, rows_per_read: int) -> int:
    """KV tokens per layer that `plan` does not read compared with attending every query over its
    whole context: about (members - 1) x prefix per group."""
    return sum((g.num_members - prefix_reads(plan, g, rows_per_read)) * g.num_keys for g in plan.groups)


def kv_tokens(plan: AttentionPlan, rows_per_read: int) -> int:
    """KV tokens one layer reads under `plan` (real tokens: padding to the null block is not
    counted): every chunk's own keys, plus each group prefix `prefix_reads` times."""
    own = sum(plan.decodes.key_lens) + sum(plan.prefills.key_lens)
    return own + sum(prefix_reads(plan, g, rows_per_read) * g.num_keys for g in plan.groups)


def kv_bytes_read(plan: AttentionPlan, num_layers: int, bytes_per_token_per_layer: int, rows_per_read: int) -> int:
    """KV bytes one step reads under `plan` in `num_layers` layers; `bytes_per_token_per_layer` =
    2 * kv_heads * head_dim * element size."""
    return kv_tokens(plan, rows_per_read) * num_layers * bytes_per_token_per_layer
