"""Batch jobs from files: OpenAI batch lines in, OpenAI-shaped results out, crash-safe resume.

requests (parse lines), prepare (tokenize, validate), schema (output records), writer
(append-only JSONL, crash recovery), manifest (what a resume must match), progress (bar, logs,
report), job (run-batch), planning (plan), demo.
"""
