"""Batch jobs from files: OpenAI batch lines in, OpenAI-shaped results out, crash-safe resume.

requests (parse lines), prepare (tokenize, validate, seeds), schema (output records), writer
(append-only JSONL, crash recovery), manifest (what a resume must match), resume (refusals,
what is done), signals (SIGINT/SIGTERM), progress (bar, log lines, report), job (run-batch),
planning (plan), demo.
"""
