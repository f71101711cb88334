"""How a run-batch job runs on Ray (`--ray`, `--replicas`, ...); no Ray import."""

from __future__ import annotations

from dataclasses import dataclass

LOCAL = "local"  # `--ray local`: start a Ray cluster on this machine for the job


@dataclass(frozen=True)
class RayOptions:
    """`address`: LOCAL, or an existing cluster's address ("auto", "host:port", "ray://...");
    CPUs per replica default to an equal share that leaves room (`resources.replica_resources`)."""

    address: str
    replicas: int = 1
    cpus_per_replica: float | None = None
    gpus_per_replica: float | None = None
