"""Per-device state machine of the *peer* neighbourhood sum (GMW-style additive sharing,
LPM paper Eq. 9-10; Chopra et al., AAMAS 2024).

For every target ``i`` it is a contact of, a device splits ``x = w_ij * I_j`` into one
additive share per member of ``i``'s roster, keeps its own and sends the others, sealed
per (sender, receiver) pair, through the relay (phase SHARES). Each member sums the shares it
holds for ``i`` and sends that partial, sealed to ``i`` (phase PARTIALS). ``i`` adds the
partials: only the sum is revealed. Phases: ``start`` -> ``on_shares`` -> ``on_partials``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence

import torch

from protocols.envelope import EnvelopeError
from protocols.neighbourhood.device import DeviceBase, NeighbourSum, Phase, wrap64
from protocols.neighbourhood.errors import (
    MissingMessageError,
    NeighbourhoodError,
    NeighbourSumOutOfRangeError,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.messages import (
    PEER_PROTOCOL,
    STEP_PARTIALS,
    STEP_SHARES,
    AgentPlan,
    Envelope,
    decode_element,
    decode_tagged,
    encode_element,
    encode_tagged,
)
from protocols.sharing import share

__all__ = ["PeerNeighbourhoodAgent"]


class PeerNeighbourhoodAgent(DeviceBase):
    """One device in the peer variant: contact, share holder and target at once."""

    protocol = PEER_PROTOCOL
    complaints: list[tuple[str, str]] = []  # (culprit, reason) of the last on_shares

    def start(
        self,
        plan: AgentPlan,
        value: float,
        *,
        weights: Mapping[str, float] | None = None,
        weight_sum: float | None = None,
    ) -> list[Envelope]:
        """Phase SHARES: split ``weights[i] * value`` for every target ``i`` of ``plan``.

        ``value`` is this device's ``I_j`` in [0, 1]; ``weights`` maps target -> ``w_ij``
        (default 1); ``weight_sum`` is ``sum_j w_ij`` over this device's own real contacts
        (default: their number), used to range-check its own decoded sum.
        """
        return self._emit_shares(self._begin(plan, value, weights, weight_sum))

    def start_encoded(self, plan: AgentPlan, encoded: Mapping[str, int]) -> list[Envelope]:
        """Phase SHARES with ring-encoded contributions given per target: for relay-run
        parties only (the noise member contributes a noise value outside [0, 1])."""
        self._begin(plan, 0.0, None, None)
        if set(encoded) != {nb.target for nb in plan.memberships}:
            raise UnexpectedMessageError("encoded contributions do not match the plan")
        return self._emit_shares(dict(encoded))

    def _emit_shares(self, encoded: Mapping[str, int]) -> list[Envelope]:
        plan = self.plan
        assert plan is not None
        bundles: dict[str, list[tuple[str, int]]] = defaultdict(list)
        self._kept: dict[str, int] = {}
        for nb in plan.memberships:
            parts = share(torch.tensor([encoded[nb.target]], dtype=torch.int64), len(nb.roster))
            for holder, part in zip(nb.roster, parts, strict=True):
                if holder == self.agent_id:
                    self._kept[nb.target] = int(part[0])
                else:
                    bundles[holder].append((nb.target, int(part[0])))
        self.phase = Phase.SENT
        return [
            self.keyring.seal_to(self._ctx(STEP_SHARES, self.agent_id, holder),
                                 encode_tagged(entries))
            for holder, entries in sorted(bundles.items())
        ]

    def on_shares(
        self, envelopes: Sequence[Envelope], aborted: Collection[str] = ()
    ) -> list[Envelope]:
        """Phase PARTIALS: sum the shares held for each target and seal the partial to it.

        ``aborted``: targets whose attempt the relay aborted (a member dropped); their shares
        are discarded. Every other target needs a share from each co-member. A bundle that
        does not open or parse is the sender's fault: it is recorded in :attr:`complaints`
        as ``(sender, reason)`` (hand them to ``RelayAttempt.route_phase2``), the targets it
        should have served get no partial from this device, and the device stays in the round.
        """
        if self.phase is not Phase.SENT or self.plan is None:
            raise ProtocolStateError(f"on_shares() called in phase {self.phase.value}")
        live = {nb.target: nb for nb in self.plan.memberships if nb.target not in aborted}
        by_target = {nb.target: nb for nb in self.plan.memberships}
        received: dict[str, dict[str, int]] = {t: {} for t in live}
        senders: set[str] = set()
        self.complaints = []
        for env in envelopes:
            self._check_context(env, STEP_SHARES)  # relay-visible: the relay misrouted it
            if env.sender in senders:
                raise UnexpectedMessageError(f"second share bundle from {env.sender!r}")
            senders.add(env.sender)
            try:
                entries = decode_tagged(self.keyring.open_from(env))
                for target, _ in entries:
                    nb = by_target.get(target)
                    if nb is None or env.sender not in nb.roster:
                        raise UnexpectedMessageError(
                            f"share for {target!r} outside the plan")
            except (EnvelopeError, NeighbourhoodError) as exc:
                # The bundle is the sender's fault (the relay cannot produce a valid
                # ciphertext between two devices): name it, drop it, keep serving the rest.
                self.complaints.append((env.sender, f"{type(exc).__name__}: {exc}"))
                continue
            for target, value in entries:
                if target in live:
                    received[target][env.sender] = value
        out = []
        culprits = {c for c, _ in self.complaints}
        for target, nb in sorted(live.items()):
            missing = set(nb.roster) - {self.agent_id} - set(received[target])
            if missing & culprits:
                continue  # no partial: the relay aborts this target and retries without them
            if missing:
                raise MissingMessageError(f"no share for {target!r} from {sorted(missing)}")
            partial = wrap64(self._kept[target] + sum(received[target].values()))
            out.append(self.keyring.seal_to(self._ctx(STEP_PARTIALS, self.agent_id, target),
                                            encode_element(partial)))
        self.phase = Phase.RELAYED
        return out

    def on_partials(
        self, envelopes: Sequence[Envelope], aborted: bool = False
    ) -> NeighbourSum | None:
        """Final phase: add the partials of this device's own neighbourhood.

        Returns ``None`` when the device has no neighbourhood this attempt or the relay
        aborted it (a restart follows); raises on missing, foreign or out-of-range input.
        """
        if self.phase is not Phase.RELAYED or self.plan is None:
            raise ProtocolStateError(f"on_partials() called in phase {self.phase.value}")
        self.phase = Phase.DONE
        own = self.plan.own
        if own is None or aborted:
            if envelopes and own is None:
                raise UnexpectedMessageError("partials received without a neighbourhood")
            return None
        got: dict[str, int] = {}
        for env in envelopes:
            self._check_context(env, STEP_PARTIALS)
            if env.sender not in own.roster or env.sender in got:
                raise UnexpectedMessageError(f"unexpected partial from {env.sender!r}")
            got[env.sender] = decode_element(self.keyring.open_from(env))
        missing = set(own.roster) - set(got)
        if missing:
            raise MissingMessageError(f"no partial from {sorted(missing)}")
        try:
            return self._finish(sum(got.values()), len(own.roster))
        except NeighbourSumOutOfRangeError as exc:
            raise NeighbourSumOutOfRangeError(
                f"{exc}; the partials came from {sorted(own.roster)} (a holder or a contact "
                "deviated; additive shares cannot tell which)") from exc
