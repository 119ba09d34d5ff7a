"""Process groups: join one started by ``torchrun``, or spawn P local processes (tests, bench).

``init_from_env`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``) and picks NCCL on CUDA, gloo on CPU. ``spawn_local(fn, P, *args)`` runs
``fn(rank, world, *args)`` in P fresh processes joined over gloo on 127.0.0.1 and returns
their results in rank order; a failing rank raises :class:`DistributedError` naming it.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simulation.distributed.partition import DistributedError

__all__ = ["free_port", "init_from_env", "spawn_local"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"not started by torchrun (missing {', '.join(missing)}); use "
            "`torchrun --nproc-per-node P -m simulation.distributed ...` or `lpm simulate --procs P`"
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _worker(rank: int, world: int, port: int, threads: int, fn, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report to the parent, which raises it with the rank's name
        results.put((rank, "error", traceback.format_exc()))
        raise


def spawn_local(
    fn: Callable[..., Any], world: int, *args: Any, threads: int = 1, timeout: float = 600.0
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` local processes over gloo; results by rank.

    ``fn`` must be importable (module level); results travel back by pickling.
    """
    if world < 1:
        raise DistributedError("world size must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, threads, fn, args, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failed = True
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=timeout)
            except queue.Empty:
                raise DistributedError(f"ranks {sorted(set(range(world)) - set(out))} gave no "
                                       f"result within {timeout:.0f} s") from None
            if status == "error":
                raise DistributedError(f"rank {rank} failed:\n{value}")
            out[rank] = value
        failed = False
    finally:
        for p in procs:  # after a failure the others may wait in a collective: stop them
            p.join(timeout=1 if failed else 30)
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world)]
