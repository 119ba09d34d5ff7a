"""In-process transport for the per-device state machines: runs whole rounds with a relay
and a set of devices in one process (tests, demos, reference for app integrations)."""

from __future__ import annotations

from collections.abc import Mapping

from protocols.neighbourhood.assisted import AssistedNeighbourhoodAgent
from protocols.neighbourhood.device import NeighbourSum
from protocols.neighbourhood.peer import PeerNeighbourhoodAgent
from protocols.neighbourhood.policy import NeighbourhoodPolicy, Variant
from protocols.neighbourhood.relay import (
    NeighbourhoodAgent,
    NeighbourhoodRelay,
    RelayAttempt,
    assisted,
    peer,
)
from protocols.ring import FixedPointRing

__all__ = ["make_devices", "run_round"]

# drop_at values: a device stops before uploading phase 1 (0) or phase 2 (1, peer only)
DROP_BEFORE_PHASE1 = 0
DROP_BEFORE_PHASE2 = 1


def make_devices(
    relay: NeighbourhoodRelay, ids: list[str], *, ring: FixedPointRing | None = None,
    policy: NeighbourhoodPolicy | None = None,
) -> dict[str, NeighbourhoodAgent]:
    """Create one device per id (its contacts: the relay's contact lists, i.e. the honest
    configuration), register its key with ``relay``."""
    cls: type[NeighbourhoodAgent] = PeerNeighbourhoodAgent \
        if relay.variant is Variant.PEER else AssistedNeighbourhoodAgent
    devices: dict[str, NeighbourhoodAgent] = {}
    for a in ids:
        own = set(relay.contacts.get(a, ())) | {t for t, cs in relay.contacts.items() if a in cs}
        dev = cls(a, relay.run_id, ring=ring or relay.ring, policy=policy or relay.policy,
                  contacts=own)
        relay.register(a, dev.keyring.public_bytes())
        devices[a] = dev
    return devices


def run_round(
    relay: NeighbourhoodRelay,
    devices: Mapping[str, NeighbourhoodAgent],
    values: Mapping[str, float],
    round: int,
    *,
    weights: Mapping[str, Mapping[str, float]] | None = None,
    drop_at: Mapping[str, int] | None = None,
    online: set[str] | None = None,
) -> dict[str, NeighbourSum | None]:
    """One round over the relay; returns each surviving device's sum (``None``: none).

    ``weights[j][i]`` is ``w_ij`` known to contact ``j``; ``drop_at[a]`` makes ``a`` drop
    before that phase of attempt 0 (restarts then run without it).
    """
    weights = weights or {}
    drop_at = dict(drop_at or {})
    attempt: RelayAttempt | None = relay.begin_round(round, set(devices) if online is None else online)
    results: dict[str, NeighbourSum | None] = {}
    gone: set[str] = set()
    while attempt is not None:
        for a, plan in attempt.plans.items():
            devices[a].keyring.add_peers(relay.keys_for(plan))  # O(degree) keys per device
        wsum = {t: sum(weights.get(c, {}).get(t, 1.0) for c in nb.roster if c in devices)
                for t, nb in attempt.hoods.items()}
        first = attempt.attempt == 0

        def drops(a: str, phase: int, first: bool = first) -> bool:
            if a in gone or (first and drop_at.get(a) == phase):
                gone.add(a)
                return True
            return False

        up1 = {
            a: devices[a].start(p, values[a], weights=weights.get(a),
                                weight_sum=wsum.get(a))
            for a, p in attempt.plans.items() if not drops(a, DROP_BEFORE_PHASE1)
        }
        deliveries = attempt.route_phase1(up1)
        if relay.variant is Variant.ASSISTED:
            for a, d in deliveries.items():
                results[a] = assisted(devices[a]).on_masked(d.envelopes, d.mask_sum)
            return results
        up2 = {
            a: peer(devices[a]).on_shares(d.envelopes, d.aborted)
            for a, d in deliveries.items() if not drops(a, DROP_BEFORE_PHASE2)
        }
        complaints = {a: list(peer(devices[a]).complaints) for a in up2
                      if peer(devices[a]).complaints}
        for a, d in attempt.route_phase2(up2, complaints).items():
            res = peer(devices[a]).on_partials(d.envelopes, d.aborted)
            if res is not None or a not in results:
                results[a] = res
        attempt = attempt.retry()
    return results
