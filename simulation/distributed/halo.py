"""Rank-local graph shard and the halo exchange (autograd-aware ``all_to_all``).

Rank r owns the agents ``owned`` (sorted global ids, local index 0..n_local-1) and keeps a
*halo*: the remote agents adjacent to its own, ordered by (owner rank, global id), at local
index n_local.. . Its shard of the contact graph (:class:`Shard`) is one symmetric CSR over
owned ∪ halo: owned rows keep their full neighbour lists (columns in the global row order,
so a row sums in the same order as in the single-process run), halo rows list only their
owned neighbours (the cut edges seen from the other side; the halo×halo block is empty).
Being symmetric, the engine's own :class:`~simulation.kernels.NeighbourSum` and its
backward apply to it unchanged.

:class:`HaloExchange` is the communication: forward, each rank sends the values of its
boundary agents (those with a neighbour on rank q, to q) in one ``all_to_all_single``;
backward, the gradients of the halo values travel the reverse way and are added into the
owners' gradients, so ∂L/∂x flows across ranks. Bytes per exchange: 4 × Σ_r |boundary(r)|
≤ 8 × (cut edges), no header beyond the split sizes exchanged once at setup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist

from simulation.distributed.partition import DistributedError, Partition
from simulation.kernels import NeighbourSum
from simulation.population import CSRLayer

__all__ = ["DistributedNeighbourSum", "HaloExchange", "Shard", "build_shard", "halo_exchange",
           "halo_exchange_columns"]


@dataclass
class Shard:
    """What rank ``rank`` holds of the graph: its agents, halo, CSR and exchange lists."""

    rank: int
    world: int
    n_total: int
    owned: torch.Tensor  # int32 (int64 beyond 2^31 agents) [n_local] global ids, sorted
    halo: torch.Tensor  # [n_halo] global ids (dtype of ``owned``), by (owner, id)
    layer: CSRLayer  # symmetric CSR over owned ∪ halo (n_local + n_halo rows)
    send_index: torch.Tensor  # int64 [n_send] local indices to send, grouped by receiver
    send_counts: list[int]  # per receiver rank
    recv_counts: list[int]  # per sender rank (halo slices)

    @property
    def n_local(self) -> int:
        return int(self.owned.numel())

    @property
    def n_halo(self) -> int:
        return int(self.halo.numel())

    def owned_layer(self) -> CSRLayer:
        """The owned rows only (a view): n_local rows, columns into owned ∪ halo."""
        stop = int(self.layer.indptr[self.n_local])
        w = None if self.layer.weights is None else self.layer.weights[:stop]
        return CSRLayer(self.layer.indptr[: self.n_local + 1], self.layer.indices[:stop], w)

    def halo_bytes(self, itemsize: int = 4) -> int:
        """Bytes this rank sends per exchange (values of ``itemsize`` bytes)."""
        return itemsize * int(self.send_index.numel())

    def nbytes(self) -> int:
        """Bytes of the shard's tensors (graph, id maps, send list)."""
        ts = [self.owned, self.halo, self.send_index, self.layer.indptr, self.layer.indices]
        if self.layer.weights is not None:
            ts.append(self.layer.weights)
        return sum(t.numel() * t.element_size() for t in ts)


def build_shard(layer: CSRLayer, partition: Partition, rank: int) -> Shard:
    """Cut rank ``rank``'s shard out of the global merged graph (numpy, O(local edges))."""
    if layer.n != partition.n:
        raise DistributedError(f"graph has {layer.n} agents, partition {partition.n}")
    if not 0 <= rank < partition.n_parts:
        raise DistributedError(f"rank {rank} outside [0, {partition.n_parts})")
    n, parts = layer.n, partition.parts
    indptr, indices = layer.indptr.numpy(), layer.indices.numpy()
    weights = None if layer.weights is None else layer.weights.numpy()
    owned = partition.owned(rank)
    n_local = owned.size

    def rows_of(agents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(new indptr, positions in ``indices``) of the given rows, original column order."""
        deg = indptr[agents + 1] - indptr[agents]
        ptr = np.zeros(agents.size + 1, np.int64)
        np.cumsum(deg, out=ptr[1:])
        pos = np.repeat(indptr[agents] - ptr[:-1], deg) + np.arange(ptr[-1], dtype=np.int64)
        return ptr, pos

    optr, opos = rows_of(owned)
    ocols = indices[opos].astype(np.int64)
    remote = parts[ocols] != rank
    halo = np.unique(ocols[remote])
    halo = halo[np.lexsort((halo, parts[halo]))]  # by (owner, id)
    local_of = np.full(n, -1, np.int64)
    local_of[owned] = np.arange(n_local)
    local_of[halo] = n_local + np.arange(halo.size)
    # halo rows: each halo agent's owned neighbours (the transpose of the owned→halo block)
    hptr, hpos = rows_of(halo)
    hcols = indices[hpos].astype(np.int64)
    keep = parts[hcols] == rank
    hrow = np.repeat(np.arange(halo.size), hptr[1:] - hptr[:-1])[keep]
    hptr2 = np.zeros(halo.size + 1, np.int64)
    np.cumsum(np.bincount(hrow, minlength=halo.size), out=hptr2[1:])
    all_ptr = np.concatenate([optr, optr[-1] + hptr2[1:]])
    all_cols = np.concatenate([local_of[ocols], local_of[hcols[keep]]]).astype(np.int32)
    all_w = None
    if weights is not None:
        all_w = torch.from_numpy(np.concatenate([weights[opos], weights[hpos][keep]]))
    # send lists: owned agents with a neighbour on rank q, for each q, ordered by global id
    # (= the receiver's halo order for this sender)
    row_of = np.repeat(np.arange(n_local), optr[1:] - optr[:-1])
    dest = parts[ocols].astype(np.int64)
    pair = np.unique(dest[remote] * max(n_local, 1) + row_of[remote])
    send_dest, send_row = pair // max(n_local, 1), pair % max(n_local, 1)
    world = partition.n_parts
    id_dtype = np.int32 if n < 2**31 else np.int64  # 4 bytes per agent while ids fit
    send_counts = np.bincount(send_dest, minlength=world).tolist()
    recv_counts = np.bincount(parts[halo], minlength=world).tolist()
    return Shard(
        rank=rank,
        world=world,
        n_total=n,
        owned=torch.from_numpy(owned.astype(id_dtype)),
        halo=torch.from_numpy(halo.astype(id_dtype)),
        layer=CSRLayer(torch.from_numpy(all_ptr), torch.from_numpy(all_cols), all_w),
        send_index=torch.from_numpy(send_row.astype(np.int64)),
        send_counts=[int(c) for c in send_counts],
        recv_counts=[int(c) for c in recv_counts],
    )


def check_counts(shard: Shard, group: dist.ProcessGroup | None = None) -> None:
    """Verify that every rank's send counts match its peers' receive counts (setup, once)."""
    sent = torch.tensor(shard.send_counts, dtype=torch.int64)
    told = torch.empty_like(sent)
    dist.all_to_all_single(told, sent, group=group)
    if told.tolist() != shard.recv_counts:
        raise DistributedError(
            f"rank {shard.rank}: peers send {told.tolist()} halo values, expected "
            f"{shard.recv_counts} (different graphs or partitions on different ranks?)"
        )


def _exchange(
    values: torch.Tensor, out_len: int, send: list[int], recv: list[int], group
) -> torch.Tensor:
    out = torch.empty(out_len, dtype=values.dtype, device=values.device)
    dist.all_to_all_single(out, values.contiguous(), recv, send, group=group)
    return out


class HaloExchange(torch.autograd.Function):
    """x_local [n_local] → halo values [n_halo]; backward sends halo gradients home."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shard: Shard, group) -> torch.Tensor:  # type: ignore[override]
        ctx.shard, ctx.group, ctx.n_local = shard, group, x.shape[0]
        index = shard.send_index.to(x.device)
        ctx.index = index
        return _exchange(x.index_select(0, index), shard.n_halo, shard.send_counts,
                         shard.recv_counts, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        shard = ctx.shard
        back = _exchange(grad, int(ctx.index.numel()), shard.recv_counts, shard.send_counts,
                         ctx.group)
        gx = torch.zeros(ctx.n_local, dtype=grad.dtype, device=grad.device)
        gx.index_add_(0, ctx.index, back)
        return gx, None, None

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor, _shard, _group):  # type: ignore[override]
        # linear: the halo's tangents are the owners' tangents, sent the same way (a second
        # exchange; DistributedNeighbourSum sends both columns in one when it can)
        shard = ctx.shard
        return _exchange(tangent.index_select(0, ctx.index), shard.n_halo, shard.send_counts,
                         shard.recv_counts, ctx.group)


def halo_exchange_columns(x: torch.Tensor, shard: Shard, group=None) -> torch.Tensor:
    """Halo rows of ``x`` [n_local, k] (k columns, e.g. values and their tangents) in ONE
    exchange; no autograd (forward-mode runs and no-grad steps)."""
    if x.dim() != 2 or x.shape[0] != shard.n_local:
        raise DistributedError(f"expected [{shard.n_local}, k] local values, got {tuple(x.shape)}")
    k = int(x.shape[1])
    if shard.world == 1:
        return x.new_empty(0, k)
    rows = x.detach().index_select(0, shard.send_index.to(x.device))
    out = _exchange(rows.flatten(), shard.n_halo * k, [c * k for c in shard.send_counts],
                    [c * k for c in shard.recv_counts], group)
    return out.view(shard.n_halo, k)


def halo_exchange(x: torch.Tensor, shard: Shard, group=None) -> torch.Tensor:
    """Halo values of ``x`` (one value per owned agent), differentiable across ranks."""
    if x.shape != (shard.n_local,):
        raise DistributedError(f"expected {shard.n_local} local values, got {tuple(x.shape)}")
    if shard.world == 1:  # nothing to exchange
        return x.new_empty(0)
    return HaloExchange.apply(x, shard, group)


def _sorted_rows(layer: CSRLayer) -> CSRLayer:
    """The same CSR with each row's columns in ascending order."""
    rows = np.repeat(np.arange(layer.n), layer.degree().numpy())
    order = np.lexsort((layer.indices.numpy(), rows))
    w = None if layer.weights is None else layer.weights[torch.from_numpy(order)]
    return CSRLayer(layer.indptr, layer.indices[torch.from_numpy(order)], w)


class DistributedNeighbourSum:
    """Σ_j w_ij x_j for the owned agents, over the whole partitioned graph.

    One halo exchange, then the engine's symmetric-CSR kernel on owned ∪ halo. Plug into
    ``simulate(..., neighbour_sum=op)``; every rank must call it the same number of times.
    """

    def __init__(self, shard: Shard, device: torch.device | str = "cpu", group=None) -> None:
        self.shard, self.group = shard, group
        self.device = torch.device(device)
        # CPU keeps the global column order (bit-identical row sums); cuSPARSE gets sorted rows
        layer = shard.layer if self.device.type == "cpu" else _sorted_rows(shard.layer)
        self.local = NeighbourSum(layer, self.device)
        self.exchanges = 0  # forward exchanges so far (benchmark accounting)
        self.exchange_seconds = 0.0  # wall time inside them, waiting for peers included

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        primal, tangent = fwad.unpack_dual(x)
        if tangent is not None and not (torch.is_grad_enabled() and primal.requires_grad):
            # forward mode (dual numbers): values and tangents in one exchange
            val, tan = self.dual(primal, tangent)
            return fwad.make_dual(val, tan)
        self.exchanges += 1
        t0 = time.perf_counter()
        halo = halo_exchange(x, self.shard, self.group)
        self.exchange_seconds += time.perf_counter() - t0
        return self.local(torch.cat([x, halo]))[: self.shard.n_local]

    def dual(self, values: torch.Tensor, tangents: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_j w_ij x_j, Σ_j w_ij ẋ_j) for the owned agents, the halo's values and tangents
        in ONE exchange (8 B per boundary agent and receiving rank in float32); no autograd.
        Each column sums as :meth:`__call__` and the engine's forward-mode jvp do, so the
        owned rows are bit-identical to the single-process run's."""
        n = self.shard.n_local
        self.exchanges += 1
        t0 = time.perf_counter()
        halo = halo_exchange_columns(torch.stack([values.detach(), tangents.detach()
                                                  .to(values.dtype)], 1), self.shard, self.group)
        self.exchange_seconds += time.perf_counter() - t0
        with torch.no_grad():
            val = self.local._apply(torch.cat([values.detach(), halo[:, 0]]), reuse=False)
            tan = self.local._apply(torch.cat([tangents.detach().to(values.dtype), halo[:, 1]]),
                                    reuse=False, binary_ok=False)
        return val[:n], tan[:n]
