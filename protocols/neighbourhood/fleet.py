"""Vectorised fleet mode of the secure neighbourhood sum.

A whole simulated population runs one protocol step in one process, tensorised over agents
and edges. Targets are grouped by (padded) neighbourhood size ``d``; each class is one
contiguous ``(c, d)`` contribution tensor (peer: ``(c, d, d)`` shares), so share generation,
partial sums and the target sums are plain int64 reductions (wrap-around is the ring).

What is real: every share and mask comes from ChaCha20 keystreams (``protocols.keys``), every
relayed byte is sealed and opened with ChaCha20-Poly1305 (``protocols.envelope``), the
arithmetic is the protocol's arithmetic, and decoded sums are range-checked.
What is batched (and therefore *not* per-device isolation): keystreams are drawn per chunk
of at most ``chunk_elems`` ring elements of one size class rather than per sender, and one
envelope seals a chunk of many per-device messages rather than one (sender, receiver) pair.
The sealed bytes are exactly the relayed bytes; the per-call overheads are amortised.
Per-device isolation is what :mod:`protocols.neighbourhood.peer` and
:mod:`protocols.neighbourhood.assisted` provide.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from protocols.envelope import MessageContext, open_envelope, seal
from protocols.keys import derive_key, ring_keystream
from protocols.neighbourhood.errors import NeighbourhoodError
from protocols.neighbourhood.messages import (
    ASSISTED_PROTOCOL,
    PEER_PROTOCOL,
    STEP_MASKED,
    STEP_MASKSUM,
    STEP_PARTIALS,
    STEP_SHARES,
)
from protocols.neighbourhood.noise import discrete_laplace
from protocols.neighbourhood.policy import (
    BelowMinimum,
    NeighbourhoodPolicy,
    Outcome,
    Variant,
    check_range,
)
from protocols.ring import FixedPointRing

__all__ = ["FleetNeighbourhoodSum", "FleetStepResult", "FleetStepStats"]

_ELEM = 8  # bytes per ring element


@dataclass
class FleetStepStats:
    """Byte and call counts of one fleet step."""

    ring_elements_relayed: int = 0  # ring elements that crossed the relay
    sealed_bytes: int = 0  # ciphertext bytes (incl. tags) produced by fleet-mode sealing
    envelopes: int = 0  # AEAD calls in fleet mode
    keystream_calls: int = 0
    keystream_elements: int = 0
    seconds_keystream: float = 0.0  # ChaCha20 keystream generation
    seconds_envelopes: float = 0.0  # sealing + opening
    per_phase: dict[str, int] = field(default_factory=dict)


@dataclass
class FleetStepResult:
    """Output of one fleet step: decoded sums (float64, NaN where none), outcome per agent."""

    sums: torch.Tensor
    outcome: torch.Tensor  # int8, values of :class:`Outcome`
    stats: FleetStepStats


@dataclass
class _SizeClass:
    d: int  # padded neighbourhood size
    targets: torch.Tensor  # (c,) int64 target ids
    sources: torch.Tensor  # (c, d) int64 index into the value array (n = dummy zero slot)
    weights: torch.Tensor  # (c, d) float64 (0 for dummies)


@dataclass
class _Plan:
    classes: list[_SizeClass]
    outcome: torch.Tensor  # int8 per agent
    weight_sums: torch.Tensor  # float64 per agent (real contacts only)
    live_degree: torch.Tensor  # int64 per agent


def _as_csr(indptr: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.as_tensor(indptr).to(torch.int64)
    indices = torch.as_tensor(indices).to(torch.int64)
    if indptr.ndim != 1 or indices.ndim != 1 or indptr.numel() < 1:
        raise NeighbourhoodError("indptr and indices must be 1-D tensors")
    if int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel():
        raise NeighbourhoodError("indptr must start at 0 and end at len(indices)")
    if bool((indptr[1:] < indptr[:-1]).any()):
        raise NeighbourhoodError("indptr must be non-decreasing")
    n = indptr.numel() - 1
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise NeighbourhoodError("contact index out of range")
    return indptr, indices


def _build_plan(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    live: torch.Tensor | None,
    policy: NeighbourhoodPolicy,
    noise_member: bool = False,
) -> _Plan:
    n = indptr.numel() - 1
    deg = indptr[1:] - indptr[:-1]
    target_of_edge = torch.repeat_interleave(torch.arange(n), deg)
    if live is not None:
        keep = live[indices] & live[target_of_edge]
        indices, weights, target_of_edge = indices[keep], weights[keep], target_of_edge[keep]
        deg = torch.bincount(target_of_edge, minlength=n)
        indptr = torch.zeros(n + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(deg, 0)
    weight_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, target_of_edge, weights)

    outcome = torch.full((n,), int(Outcome.OK), dtype=torch.int8)
    small = (deg > 0) & (deg < policy.min_size)
    outcome[deg == 0] = int(Outcome.EMPTY)
    if policy.below_minimum is BelowMinimum.PAD:
        outcome[small] = int(Outcome.PADDED)
        size = torch.where(small, torch.full_like(deg, policy.min_size), deg)
    else:
        outcome[small] = int(Outcome.REFUSED)
        size = torch.where(small, torch.zeros_like(deg), deg)
    if live is not None:
        outcome[~live] = int(Outcome.DROPPED)
        size = torch.where(live, size, torch.zeros_like(size))

    classes: list[_SizeClass] = []
    for d in torch.unique(size).tolist():
        if d == 0:
            continue
        targets = torch.nonzero(size == d).flatten()
        c = targets.numel()
        slot = torch.arange(d).expand(c, d)
        start = indptr[targets].unsqueeze(1)
        real = slot < deg[targets].unsqueeze(1)
        edge = torch.where(real, start + slot, torch.zeros_like(slot))
        sources = torch.where(real, indices[edge] if indices.numel() else edge, n)
        w = torch.where(real, weights[edge] if weights.numel() else 0.0, 0.0).to(torch.float64)
        if noise_member:  # a relay-run member contributing the target's noise (slot n+1+i)
            sources = torch.cat([sources, (n + 1 + targets).unsqueeze(1)], dim=1)
            w = torch.cat([w, torch.ones(c, 1, dtype=torch.float64)], dim=1)
        classes.append(_SizeClass(d + int(noise_member), targets, sources.contiguous(),
                                  w.contiguous()))
    return _Plan(classes, outcome, weight_sums, deg)


class FleetNeighbourhoodSum:
    """Secure neighbourhood sums for a whole simulated population, one step per call.

    ``indptr``/``indices`` give, for every target ``i``, its contacts
    ``indices[indptr[i]:indptr[i+1]]`` (CSR); ``weights`` (optional, per edge, >= 0) are the
    ``w_ij``. The graph plan (size classes, padding, refusals) is built once.
    """

    def __init__(
        self,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor | None = None,
        *,
        variant: Variant | str = Variant.PEER,
        policy: NeighbourhoodPolicy | None = None,
        ring: FixedPointRing | None = None,
        run_id: str = "fleet",
        secret: bytes | None = None,
        chunk_elems: int = 1 << 20,
    ) -> None:
        self.indptr, self.indices = _as_csr(indptr, indices)
        if weights is None:
            self.weights = torch.ones(self.indices.numel(), dtype=torch.float64)
        else:
            self.weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if self.weights.numel() != self.indices.numel():
                raise NeighbourhoodError("weights must have one entry per edge")
            if bool((self.weights < 0).any()) or not bool(torch.isfinite(self.weights).all()):
                raise NeighbourhoodError("weights must be finite and >= 0")
        self.n = self.indptr.numel() - 1
        self.variant = Variant(variant)
        self.policy = policy or NeighbourhoodPolicy()
        self.ring = ring or FixedPointRing()
        self.run_id = run_id
        if secret is not None and len(secret) < 32:
            raise NeighbourhoodError("fleet secret must be at least 32 bytes")
        self._secret = secret if secret is not None else os.urandom(32)
        if chunk_elems < 1:
            raise NeighbourhoodError("chunk_elems must be >= 1")
        self.chunk_elems = int(chunk_elems)
        max_w = float(self.weights.max()) if self.weights.numel() else 0.0
        max_deg = int((self.indptr[1:] - self.indptr[:-1]).max()) if self.n else 0
        self.ring.check_headroom(max(max_w, 1.0, self.policy.effective_noise_bound),
                                 max(max_deg + self.policy.min_size + 1, 1))
        self._noise_member = self.policy.noisy and self.variant is Variant.PEER
        self._plan = _build_plan(self.indptr, self.indices, self.weights, None, self.policy,
                                 self._noise_member)
        self._round = 0

    @property
    def protocol(self) -> str:
        return PEER_PROTOCOL if self.variant is Variant.PEER else ASSISTED_PROTOCOL

    # ------------------------------------------------------------------ crypto helpers
    def _ctx(self, rnd: int, step: int, sender: str, receiver: str) -> MessageContext:
        return MessageContext(self.protocol, self.run_id, rnd, step, sender, receiver)

    def _fill_keystream(
        self, out: torch.Tensor, rnd: int, step: int, tag: str, stats: FleetStepStats
    ) -> None:
        t0 = time.perf_counter()
        flat = out.view(-1)
        for k, lo in enumerate(range(0, flat.numel(), self.chunk_elems)):
            hi = min(lo + self.chunk_elems, flat.numel())
            ctx = self._ctx(rnd, step, f"fleet:{tag}:{k}", "fleet")
            key = derive_key(self._secret, ctx, label="nbhd-fleet-keystream")
            ring_keystream(key, hi - lo, out=flat[lo:hi])
            stats.keystream_calls += 1
            stats.keystream_elements += hi - lo
        stats.seconds_keystream += time.perf_counter() - t0

    def _relay(
        self, t: torch.Tensor, rnd: int, step: int, tag: str, stats: FleetStepStats
    ) -> torch.Tensor:
        """Seal ``t`` in chunk envelopes, hand them over, open them: the relayed tensor."""
        t0 = time.perf_counter()
        t = t.contiguous()
        raw = t.view(-1).numpy().view(np.uint8)
        out = torch.empty_like(t)
        dst = out.view(-1).numpy().view(np.uint8)
        step_bytes = self.chunk_elems * _ELEM
        key = derive_key(self._secret, self._ctx(rnd, step, "fleet", "fleet"),
                         label="nbhd-fleet-envelope")
        for k, lo in enumerate(range(0, raw.size, step_bytes)):
            hi = min(lo + step_bytes, raw.size)
            ctx = self._ctx(rnd, step, f"fleet:{tag}:{k}", "relay")
            blob = seal(key, ctx, raw[lo:hi].tobytes())
            stats.sealed_bytes += len(blob)
            stats.envelopes += 1
            dst[lo:hi] = np.frombuffer(open_envelope(key, ctx, blob), dtype=np.uint8)
        stats.seconds_envelopes += time.perf_counter() - t0
        stats.ring_elements_relayed += t.numel()
        phase = tag.rstrip("0123456789")
        stats.per_phase[phase] = stats.per_phase.get(phase, 0) + t.numel()
        return out

    def _noise(self, rnd: int) -> torch.Tensor:
        if not self.policy.noisy:
            return torch.zeros(self.n, dtype=torch.int64)
        key = derive_key(self._secret, self._ctx(rnd, STEP_MASKSUM, "relay", "noise"),
                         label="nbhd-fleet-noise")
        return discrete_laplace(key, self.n, self.policy.noise_scale,
                                self.policy.effective_noise_bound, self.ring.frac_bits)

    # ------------------------------------------------------------------ protocol steps
    def _encode(self, values: torch.Tensor, cls: _SizeClass) -> torch.Tensor:
        return self.ring.encode(cls.weights * values[cls.sources])

    def _peer_class(
        self, values: torch.Tensor, cls: _SizeClass, rnd: int, stats: FleetStepStats
    ) -> torch.Tensor:
        c, d = cls.sources.shape
        x = self._encode(values, cls)  # (c, d): contribution of contact a of each target
        shares = torch.empty((c, d, d), dtype=torch.int64)  # [target, sender a, holder b]
        self._fill_keystream(shares, rnd, STEP_SHARES, f"shares{d}", stats)
        # sender a's last share makes its row sum to x[a] (mod 2^64)
        shares[:, :, d - 1] = x - shares[:, :, : d - 1].sum(dim=2)
        flat = shares.view(c, d * d)
        diag = torch.arange(d) * (d + 1)
        off = torch.ones(d * d, dtype=torch.bool)
        off[diag] = False
        off_idx = torch.nonzero(off).flatten()
        if d > 1:  # only the shares for other holders travel (sealed, via the relay)
            flat[:, off_idx] = self._relay(flat[:, off_idx], rnd, STEP_SHARES, f"shares{d}",
                                           stats)
        partials = shares.sum(dim=1)  # (c, d): holder b sums what it holds for the target
        partials = self._relay(partials, rnd, STEP_PARTIALS, f"partials{d}", stats)
        return partials.sum(dim=1)

    def _assisted_class(
        self, values: torch.Tensor, cls: _SizeClass, rnd: int, stats: FleetStepStats
    ) -> torch.Tensor:
        c, d = cls.sources.shape
        masks = torch.empty((c, d), dtype=torch.int64)
        self._fill_keystream(masks, rnd, STEP_MASKED, f"masks{d}", stats)
        masked = self._encode(values, cls) + masks  # contact j -> target i, sealed to i
        masked = self._relay(masked, rnd, STEP_MASKED, f"masked{d}", stats)
        # the coordinator folds the (optional) noise into the mask sum: the target gets s + eta
        mask_sums = masks.sum(dim=1) - self._eta[cls.targets]
        mask_sums = self._relay(mask_sums, rnd, STEP_MASKSUM, f"masksum{d}", stats)
        return masked.sum(dim=1) - mask_sums

    def step(
        self,
        infected: torch.Tensor,
        *,
        round: int | None = None,
        dropped: torch.Tensor | None = None,
    ) -> FleetStepResult:
        """Run one protocol step over the whole fleet.

        ``infected``: per-agent contribution ``I_j`` (bool or float in [0, 1]).
        ``round``: context round (default: an internal counter, incremented per call).
        ``dropped``: agents that went offline mid-step; their edges are excluded and the
        size policy is re-applied to the surviving neighbourhoods (the fallback).
        """
        rnd = self._round if round is None else int(round)
        self._round = rnd + 1
        values = torch.as_tensor(infected).detach().flatten().to("cpu", torch.float64)
        if values.numel() != self.n:
            raise NeighbourhoodError(f"expected {self.n} values, got {values.numel()}")
        if bool(((values < 0) | (values > 1) | ~torch.isfinite(values)).any()):
            raise NeighbourhoodError("contributions I_j must lie in [0, 1]")
        plan = self._plan
        if dropped is not None:
            dropped = torch.as_tensor(dropped, dtype=torch.bool).flatten()
            if dropped.numel() != self.n:
                raise NeighbourhoodError("dropped mask must have one entry per agent")
            if bool(dropped.any()):
                plan = _build_plan(self.indptr, self.indices, self.weights, ~dropped,
                                   self.policy, self._noise_member)
        # slot n: the dummies' zero; slots n+1..2n: per-target noise of the relay-run party
        eta = self._noise(rnd)
        ext = torch.cat([values, torch.zeros(1, dtype=torch.float64),
                         eta.to(torch.float64) * 2.0**-self.ring.frac_bits])
        self._eta = eta
        stats = FleetStepStats()
        sums = torch.full((self.n,), float("nan"), dtype=torch.float64)
        sums[plan.outcome == int(Outcome.EMPTY)] = 0.0
        refused = plan.outcome == int(Outcome.REFUSED)
        sums[refused] = self.policy.public_prevalence * plan.weight_sums[refused]
        if dropped is not None:
            sums[dropped] = float("nan")
        run = self._peer_class if self.variant is Variant.PEER else self._assisted_class
        for cls in plan.classes:
            ring_sum = run(ext, cls, rnd, stats)
            decoded = self.ring.decode(ring_sum)
            wsum = plan.weight_sums[cls.targets]
            check_range(decoded, wsum, cls.d, self.ring.frac_bits,
                        self.policy.range_tolerance_ulps, self.policy.effective_noise_bound)
            if self.policy.noisy:
                decoded = torch.minimum(decoded.clamp(min=0.0), wsum)
            sums[cls.targets] = decoded
        return FleetStepResult(sums, plan.outcome.clone(), stats)

    def __call__(self, infected: torch.Tensor) -> torch.Tensor:
        """Neighbour-sum hook: ``infected -> sum_j w_ij I_j`` in ``infected``'s float dtype."""
        out = self.step(infected).sums
        dtype = infected.dtype if infected.is_floating_point() else torch.float32
        return out.to(infected.device, dtype)

    def hook(self, start_round: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
        """A neighbour-sum hook whose context round starts at ``start_round``."""
        self._round = int(start_round)
        return self.__call__
