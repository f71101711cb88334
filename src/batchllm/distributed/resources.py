"""What each replica asks Ray for (CPUs or GPUs) and how many torch threads it runs; pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

# CPUs left to everything that is not a replica: with every CPU held by replicas, Ray Data's
# read and write tasks never get one and the job hangs (seen with Ray 2.60 on a 2-CPU node).
RESERVED_CPUS = 1.0
MIN_CPUS = 0.01  # Ray's resolution for fractional resources is 0.0001; this keeps numbers readable


class ResourceError(ValueError):
    """The replicas asked for cannot be placed on this cluster (a usage error)."""


@dataclass(frozen=True)
class ReplicaResources:
    """One replica's share: logical CPUs (may be fractional) and GPUs (0 on a CPU cluster)."""

    cpus: float
    gpus: float = 0.0

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for a replica: its whole CPUs, at least one."""
        return max(1, int(self.cpus))


def replica_resources(replicas: int, cluster_cpus: float, largest_node_cpus: float, cluster_gpus: float,
                      cpus: float | None = None, gpus: float | None = None) -> ReplicaResources:
    """Each of `replicas` replicas' resources. Default CPUs: the cluster's CPUs less
    RESERVED_CPUS, shared equally (rounded down to MIN_CPUS, at most one node's), so the
    replicas never hold every CPU; `gpus` asks for GPUs, which the cluster must have.
    ResourceError when the request cannot fit."""
    if replicas < 1:
        raise ResourceError(f"--replicas must be >= 1, got {replicas}")
    if gpus is not None:
        if gpus <= 0:
            raise ResourceError(f"--gpus-per-replica must be > 0, got {gpus}")
        if cluster_gpus <= 0:
            raise ResourceError("--gpus-per-replica: the Ray cluster has no GPU")
        if replicas * gpus > cluster_gpus:
            raise ResourceError(f"{replicas} replicas x {gpus} GPUs do not fit the cluster's {cluster_gpus:g} GPUs")
    if cpus is None:
        free = cluster_cpus - RESERVED_CPUS if cluster_cpus > RESERVED_CPUS else cluster_cpus / 2
        cpus = math.floor(min(free / replicas, largest_node_cpus) / MIN_CPUS) * MIN_CPUS
        if cpus < MIN_CPUS:
            raise ResourceError(f"{replicas} replicas do not fit the cluster's {cluster_cpus:g} CPUs")
        cpus = round(cpus, 2)
    elif cpus <= 0:
        raise ResourceError(f"--cpus-per-replica must be > 0, got {cpus}")
    elif replicas * cpus > cluster_cpus or cpus > largest_node_cpus:
        raise ResourceError(f"{replicas} replicas x {cpus:g} CPUs do not fit the cluster ({cluster_cpus:g} CPUs, "
                            f"at most {largest_node_cpus:g} on one node)")
    return ReplicaResources(cpus, gpus or 0.0)
