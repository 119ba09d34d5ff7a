"""Per-device state machine of the *assisted* neighbourhood sum (O(n_i) messages).

Contact ``j`` sends target ``i`` the masked value ``w_ij * I_j + m_ji``, sealed under the
(j, i) pair key so the relay cannot read it. The mask ``m_ji`` comes from a ChaCha20 keystream
keyed by HKDF over the key ``j`` shares with the coordinator, bound to the message context;
the coordinator recomputes it, and sends ``i`` (sealed) the sum of the masks of exactly the
contributions it forwarded. ``i`` subtracts: it learns only the sum, unless it colludes with
the coordinator. Phases: ``start`` (as contact) -> ``on_masked`` (as target).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from protocols.envelope import EnvelopeError, MessageContext
from protocols.keys import derive_key
from protocols.neighbourhood.device import (
    DeviceBase,
    NeighbourSum,
    Phase,
    keystream_element,
    wrap64,
)
from protocols.neighbourhood.errors import (
    CulpritError,
    MissingMessageError,
    NeighbourhoodError,
    ProtocolStateError,
    UnexpectedMessageError,
)
from protocols.neighbourhood.keyring import Keyring
from protocols.neighbourhood.messages import (
    ASSISTED_PROTOCOL,
    RELAY_ID,
    STEP_MASKED,
    STEP_MASKSUM,
    AgentPlan,
    Envelope,
    decode_element,
    decode_mask_sum,
    encode_element,
)

__all__ = ["AssistedNeighbourhoodAgent", "mask_for"]

MASK_LABEL = "lpm-nbhd-mask"


def mask_for(keyring: Keyring, contact: str, context: MessageContext) -> int:
    """Mask of ``contact``'s phase-1 message ``context``: known to it and the coordinator.

    ``keyring`` is the contact's own keyring or the coordinator's.
    """
    peer = RELAY_ID if keyring.owner == contact else contact
    return keystream_element(derive_key(keyring.mask_key(peer), context, label=MASK_LABEL))


class AssistedNeighbourhoodAgent(DeviceBase):
    """One device in the assisted variant: contact and target at once."""

    protocol = ASSISTED_PROTOCOL

    def start(
        self,
        plan: AgentPlan,
        value: float,
        *,
        weights: Mapping[str, float] | None = None,
        weight_sum: float | None = None,
    ) -> list[Envelope]:
        """Phase MASKED: one sealed masked contribution per target of ``plan``.

        Arguments as in :meth:`PeerNeighbourhoodAgent.start`.
        """
        encoded = self._begin(plan, value, weights, weight_sum)
        out = []
        self.sent_masks: dict[str, int] = {}  # kept by relay-run dummies only (see below)
        # an agent the coordinator runs itself (a proxy whose keyring is in the relay's
        # party) leaves its masks to the relay the same way
        party = None if self.relay_run else self.keyring.party_with(RELAY_ID)
        for nb in plan.memberships:
            ctx = self._ctx(STEP_MASKED, self.agent_id, nb.target)
            mask = mask_for(self.keyring, self.agent_id, ctx)
            if self.relay_run:  # the relay is this mask's other holder: it reuses it for the
                self.sent_masks[nb.target] = mask  # mask sum instead of deriving it again
            elif party is not None:
                party.keep_mask(ctx, mask)
            out.append(self.keyring.seal_to(ctx, encode_element(wrap64(encoded[nb.target]
                                                                       + mask))))
        self.phase = Phase.SENT
        return out

    def resume(
        self,
        plan: AgentPlan,
        value: float,
        *,
        weights: Mapping[str, float] | None = None,
        weight_sum: float | None = None,
    ) -> None:
        """Re-arm a device that sent its contributions for ``plan`` (:meth:`start`) in an
        earlier process and now only has to receive (:meth:`on_masked`): the same checks as
        :meth:`start` with the same inputs, nothing derived, sealed or sent again."""
        self._begin(plan, value, weights, weight_sum)
        self.sent_masks = {}
        self.phase = Phase.SENT

    def on_masked(
        self, envelopes: Sequence[Envelope], mask_sum: Envelope | None
    ) -> NeighbourSum | None:
        """As target: unmask the forwarded contributions with the coordinator's mask sum.

        ``mask_sum is None`` means the coordinator refused or aborted this neighbourhood
        (below the minimum after dropouts): no sum, and none can be computed.
        """
        if self.phase is not Phase.SENT or self.plan is None:
            raise ProtocolStateError(f"on_masked() called in phase {self.phase.value}")
        self.phase = Phase.DONE
        own = self.plan.own
        if own is None or mask_sum is None:
            if own is None and (envelopes or mask_sum is not None):
                raise UnexpectedMessageError("contributions received without a neighbourhood")
            return None
        expected = self._ctx(STEP_MASKSUM, RELAY_ID, self.agent_id)
        if mask_sum.context != expected:
            raise UnexpectedMessageError(f"mask-sum context {mask_sum.context!r} unexpected")
        try:
            total_mask, contributors = decode_mask_sum(self.keyring.open_from(mask_sum))
        except (EnvelopeError, NeighbourhoodError) as exc:
            raise CulpritError(RELAY_ID, f"unreadable mask sum: {exc}") from exc
        got: dict[str, int] = {}
        for env in envelopes:
            self._check_context(env, STEP_MASKED)
            if env.sender not in own.roster or env.sender in got:
                raise UnexpectedMessageError(f"unexpected contribution from {env.sender!r}")
            try:
                got[env.sender] = decode_element(self.keyring.open_from(env))
            except (EnvelopeError, NeighbourhoodError) as exc:
                raise CulpritError(env.sender, f"unreadable contribution: {exc}") from exc
        if set(contributors) != set(got) or len(contributors) != len(got):
            raise MissingMessageError(
                f"forwarded contributions {sorted(got)} != mask sum cover {sorted(contributors)}"
            )
        if not got:
            raise MissingMessageError("a mask sum over no contributions")
        missing = len(own.roster) - len(got)  # dropped real contacts (dummies never drop)
        return self._finish(sum(got.values()) - total_mask, len(got), own.real_size - missing)
