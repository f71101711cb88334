"""Triton attention kernels for CUDA (the `gpu` extra): imported only by `TritonExecutor`, so the
CPU path never imports triton.

- `attend.py`: `attend_tiles`, one launch over a flat work list of (query tile, KV range) items:
  paged prefill chunks, decode queries split over KV segments and group prefix tiles alike.
- `merge.py`: `merge_partials`, the log-sum-exp merge of a row's partial results.

Under `TRITON_INTERPRET=1` (set before this package is imported) they run on CPU tensors.
"""
