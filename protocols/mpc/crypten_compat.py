"""The small compatibility layer between CrypTen 0.4.1 (2022) and this project.

* Import: CrypTen imports ``torch.onnx._internal.registration``, which torch 2.13 moved to
  ``torch.onnx._internal.torchscript_exporter.registration``; we alias it before importing.
* Decoding: CrypTen's ``FixedPointEncoder.decode`` is off by exactly 1.0 for some negative
  values, so we never call it: raw ring elements are decoded by ``protocols.ring``.
* Randomness: CrypTen's own generators are torch (mt19937) generators seeded with 64-bit
  values from ``os.urandom``; they are not a CSPRNG. We therefore never let CrypTen create
  shares: shares come from ``protocols.sharing`` (ChaCha20) and are loaded with
  ``ArithmeticSharedTensor.from_shares``; and the protocol needs no Beaver triples (it is
  linear in the secret inputs), so no CrypTen randomness touches a secret.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch

from protocols.ring import FixedPointRing

__all__ = ["CRYPTEN_PRECISION_BITS", "import_crypten", "init_party", "from_ring_shares", "to_ring_share"]

CRYPTEN_PRECISION_BITS = 16  # CrypTen's default encoder scale 2^16 == FixedPointRing(16)


def import_crypten() -> ModuleType:
    """Import CrypTen on torch 2.13 (module alias shim)."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
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
