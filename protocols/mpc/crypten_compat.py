"""The small compatibility layer between CrypTen 0.4.1 (2022) and this project.

* Import: CrypTen imports ``torch.onnx._internal.registration``, which torch 2.13 moved to
  ``torch.onnx._internal.torchscript_exporter.registration``; we alias it before importing.
* Decoding: CrypTen's ``FixedPointEncoder.decode`` is off by exactly 1.0 for some negative
  values, so we never call it: raw ring elements are decoded by ``protocols.ring``.
* Randomness: CrypTen's own generators are torch (mt19937) generators (pairwise seeds from
  ``os.urandom``; its TTP server even seeds from torch's default generator). None of them
  touches a secret here: inputs are shared with ``protocols.sharing`` (ChaCha20) and loaded
  with ``from_shares``; Beaver triples, squares and wrap-count randomness come from
  ``protocols.mpc.dealer`` (ChaCha20); CrypTen's PRG set-up is skipped and its
  pseudo-random zero sharing is replaced by a guard that raises, so a CrypTen code path that
  would make shares from mt19937 fails loudly instead of running.
"""

from __future__ import annotations

import math
import os
import sys
from types import ModuleType, SimpleNamespace

import torch

from protocols.ring import FixedPointRing

__all__ = ["CRYPTEN_PRECISION_BITS", "from_ring_shares", "import_crypten", "init_computing_party", "init_dealer",
           "init_party", "leave", "to_ring_share"]

CRYPTEN_PRECISION_BITS = 16  # CrypTen's default encoder scale 2^16 == FixedPointRing(16)


def import_crypten() -> ModuleType:
    """Import CrypTen on torch 2.13 (module alias shim)."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    registration: ModuleType | None
    try:
        import torch.onnx._internal.torchscript_exporter.registration as registration
    except ImportError:  # older torch: nothing to alias
        registration = None
    if registration is not None:
        sys.modules.setdefault("torch.onnx._internal.registration", registration)
    import crypten

    return crypten


def init_party(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1") -> ModuleType:
    """Join a CrypTen party group over torch.distributed (gloo) on ``master_addr``."""
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "RENDEZVOUS": "env://",
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "DISTRIBUTED_BACKEND": "gloo",
        }
    )
    crypten = import_crypten()
    crypten.init()
    return crypten


def _layout_env(rank: int, parties: int, master_port: int, master_addr: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(parties), "RENDEZVOUS": "env://",
                       "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
                       "DISTRIBUTED_BACKEND": "gloo"})


def _join(rank: int, parties: int, master_port: int, master_addr: str) -> ModuleType:
    """Form the group: ``parties`` computing ranks plus the dealer (rank ``parties``)."""
    _layout_env(rank, parties, master_port, master_addr)
    crypten = import_crypten()
    from crypten import communicator as comm
    from crypten.config import cfg

    cfg.mpc.provider = "TTP"  # only for the group layout: computing ranks + one extra rank
    cfg.encoder.precision_bits = CRYPTEN_PRECISION_BITS
    comm._init(use_threads=False, init_ttp=True)
    return crypten


def _guard_przs(original):
    """Allow CrypTen's zero sharing only for empty tensors (it builds ``MPCTensor([])``
    internally); any real share from mt19937 raises ``DealerError``."""

    def przs(*size, device=None):
        dims = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        if math.prod(int(d) for d in dims) == 0:  # nothing random in an empty sharing
            return SimpleNamespace(share=torch.zeros(tuple(int(d) for d in dims), dtype=torch.int64, device=device))
        from protocols.mpc.errors import DealerError

        raise DealerError("CrypTen tried to make shares from its mt19937 zero sharing; refused")

    przs.guarded = True
    return przs


def _star_all_reduce(original):
    """CrypTen's reveal sums every party's share with gloo's ring all-reduce: 2(n−1)
    sequential hops. Gather to party 0 and broadcast back is two hops. Party 0 sees each
    party's share of the opened value (uniformly masked, as in CrypTen's own wrap protocol)."""
    import torch.distributed as dist

    def all_reduce(self, input, op=dist.ReduceOp.SUM, batched=False):
        tensors = list(input) if batched else [input]
        if op != dist.ReduceOp.SUM or any(t.dtype != torch.int64 for t in tensors):
            return original(self, input, op=op, batched=batched)
        flat = torch.cat([t.data.reshape(-1) for t in tensors])
        if self.get_rank() == 0:
            parts = [torch.empty_like(flat) for _ in range(self.get_world_size())]
            dist.gather(flat, parts, 0, group=self.main_group)
            total = torch.stack(parts).sum(dim=0)
        else:
            dist.gather(flat, None, 0, group=self.main_group)
            total = torch.empty_like(flat)
        dist.broadcast(total, 0, group=self.main_group)
        out, at = [], 0
        for t in tensors:
            out.append(total[at: at + t.numel()].view(t.shape).clone())
            at += t.numel()
        return out if batched else out[0]

    all_reduce.star = True
    return all_reduce


def init_computing_party(rank: int, parties: int, master_port: int, master_addr: str = "127.0.0.1"):
    """Join as computing party ``rank`` < ``parties``; returns (crypten, DealerProvider).

    Receives this party's key from the dealer and installs the ChaCha20 dealer as CrypTen's
    tuple provider; CrypTen's mt19937 zero sharing is disabled (see module docstring).
    """
    from protocols.mpc.dealer import DealerProvider, receive_key

    crypten = _join(rank, parties, master_port, master_addr)
    from crypten.communicator.distributed_communicator import DistributedCommunicator

    if not getattr(DistributedCommunicator.all_reduce, "star", False) and os.environ.get("LPM_MPC_RING") != "1":
        DistributedCommunicator.all_reduce = _star_all_reduce(DistributedCommunicator.all_reduce)
    provider = DealerProvider(rank, parties, receive_key(parties))
    getattr(crypten.mpc, "__SUPPORTED_PROVIDERS")["TTP"] = provider
    from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor

    for cls in (ArithmeticSharedTensor, BinarySharedTensor):
        if not getattr(cls.PRZS, "guarded", False):
            cls.PRZS = staticmethod(_guard_przs(cls.PRZS))
    return crypten, provider


def init_dealer(parties: int, master_port: int, master_addr: str = "127.0.0.1") -> ModuleType:
    """Join as the dealer (rank ``parties``), not a computing party."""
    return _join(parties, parties, master_port, master_addr)


def main_group():
    """The process group of the computing parties (the dealer is not in it)."""
    from crypten import communicator as comm

    return comm.get().main_group


def leave() -> None:
    """Leave every process group (never CrypTen's shutdown: it pickles a message to the TTP)."""
    import torch.distributed as dist
    from crypten.communicator.distributed_communicator import DistributedCommunicator

    if dist.is_initialized():
        dist.destroy_process_group()
    DistributedCommunicator.instance = None


def from_ring_shares(share: torch.Tensor):
    """Wrap this party's int64 share (made by ``protocols.sharing``) as a CrypTen tensor."""
    crypten = import_crypten()
    if share.dtype != torch.int64:
        raise TypeError("ring shares are int64")
    return crypten.mpc.primitives.ArithmeticSharedTensor.from_shares(share, precision=CRYPTEN_PRECISION_BITS)


def to_ring_share(tensor) -> torch.Tensor:
    """This party's raw int64 share of a CrypTen arithmetic tensor."""
    return tensor.share.clone()


def decode(ring_value: torch.Tensor, frac_bits: int = CRYPTEN_PRECISION_BITS) -> torch.Tensor:
    """Exact decode (CrypTen's decoder is off by 1.0 for some negatives)."""
    return FixedPointRing(frac_bits).decode(ring_value)
