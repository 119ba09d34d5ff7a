"""One city across many processes: the engine partitioned over torch.distributed.

``partition`` splits the contact graph (METIS via pymetis, or a household/area locality
heuristic), ``halo`` cuts each rank's shard and exchanges boundary agents' values with an
autograd-aware ``all_to_all`` (gloo on CPU, NCCL on GPU), ``runner.simulate`` runs the
unchanged engine on a rank's agents with uniforms keyed by global agent id (so 1, 2 or 3
ranks give identical events), ``launch`` joins torchrun's group or spawns local processes.
Start with ``torchrun --nproc-per-node P -m simulation.distributed`` or ``lpm simulate --procs P``.
"""

from simulation.distributed.halo import DistributedNeighbourSum, Shard, build_shard, halo_exchange
from simulation.distributed.partition import (
    METHODS,
    DistributedError,
    Partition,
    cut_stats,
    partition_graph,
)
from simulation.distributed.runner import PartitionedPopulation, prepare, simulate, sync_gradients

__all__ = [
    "METHODS",
    "DistributedError",
    "DistributedNeighbourSum",
    "Partition",
    "PartitionedPopulation",
    "Shard",
    "build_shard",
    "cut_stats",
    "halo_exchange",
    "partition_graph",
    "prepare",
    "simulate",
    "sync_gradients",
]
