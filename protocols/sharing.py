"""Additive secret sharing over Z_2^64 (LPM paper Eq. 9–10).

A secret ring tensor x is split into n shares that sum to x modulo 2^64; any n − 1 of
them are uniformly distributed and independent of x. Random shares come from a ChaCha20
keystream under a fresh 256-bit key (or a caller-supplied derived key), never from a
non-cryptographic generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from protocols.keys import random_key, ring_keystream

__all__ = ["SharingError", "reconstruct", "share"]


class SharingError(ValueError):
    """Shares are missing, mismatched or of the wrong type."""


def share(x: torch.Tensor, n_parties: int, *, key: bytes | None = None) -> list[torch.Tensor]:
    """Split int64 ring tensor ``x`` into ``n_parties`` additive shares.

    The first n − 1 shares are keystream output (under ``key``, or a fresh random key);
    the last is x minus their sum. Pass a derived ``key`` to make shares reproducible by
    the holder of that key (e.g. PRG-compressed shares); never reuse a key for two secrets.
    """
    if x.dtype != torch.int64:
        raise SharingError(f"secrets must be int64 ring elements, got {x.dtype}")
    if n_parties < 1:
        raise SharingError("need at least 1 party")
    if n_parties == 1:  # a single holder: the "share" is the secret itself
        return [x.cpu().clone()]
    m = x.numel()
    randomness = ring_keystream(key if key is not None else random_key(), m * (n_parties - 1))
    randomness = randomness.view(n_parties - 1, *x.shape)
    last = x.cpu() - randomness.sum(dim=0)
    return [*randomness.unbind(0), last]


def reconstruct(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum shares modulo 2^64 (all must have the same shape and dtype int64)."""
    if not shares:
        raise SharingError("no shares")
    first = shares[0]
    for s in shares:
        if s.dtype != torch.int64:
            raise SharingError(f"shares must be int64, got {s.dtype}")
        if s.shape != first.shape:
            raise SharingError(f"share shapes differ: {tuple(s.shape)} vs {tuple(first.shape)}")
    return torch.stack(list(shares)).sum(dim=0)
