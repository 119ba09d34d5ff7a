"""Public round parameters shared by server and clients: roster, graph degree, threshold,
input specification and the public graph seed."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from protocols.secagg.errors import MalformedMessageError
from protocols.secagg.quantize import InputSpec

__all__ = ["PROTOCOL", "RoundConfig", "default_degree", "default_threshold"]

PROTOCOL = "lpm-secagg+/1"
MAX_CLIENTS = 1 << 20


def default_degree(n: int) -> int:
    """Neighbours per client: the smallest even number ≥ log2 n (8 at n = 200, 10 at
    n = 1000), capped at the complete graph."""
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 clients")
    k = 2 * math.ceil(math.log2(n) / 2)
    return min(max(k, 2), n - 1)


def default_threshold(degree: int) -> int:
    """Shamir threshold: a strict majority of a client's neighbours."""
    return degree // 2 + 1


@dataclass(frozen=True)
class RoundConfig:
    """Everything public about one aggregation round.

    ``client_ids`` is the roster (index = position); ``graph_seed`` is public randomness that
    fixes the neighbour graph; ``server_pk`` is the server's X25519 key for this round (every
    client–server message after the signed key advertisement carries an HMAC under a key
    agreed with it); ``min_survivors`` is the smallest number of inputs the server
    may reveal a sum of.
    """

    run_id: str
    round: int
    client_ids: tuple[str, ...]
    spec: InputSpec
    graph_seed: bytes
    server_pk: bytes
    degree: int = 0
    threshold: int = 0
    min_survivors: int = 0

    def __post_init__(self) -> None:
        n = len(self.client_ids)
        if not 2 <= n <= MAX_CLIENTS:
            raise ValueError(f"need 2..{MAX_CLIENTS} clients, got {n}")
        if len(set(self.client_ids)) != n:
            raise ValueError("client ids must be distinct")
        if any(not isinstance(c, str) or not c or len(c.encode()) > 255 for c in self.client_ids):
            raise ValueError("client ids must be non-empty str of at most 255 bytes")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != 32:
            raise ValueError("graph_seed must be 32 bytes")
        if not isinstance(self.server_pk, bytes) or len(self.server_pk) != 32:
            raise ValueError("server_pk must be 32 bytes")
        if not isinstance(self.round, int) or not 0 <= self.round < 2**63:
            raise ValueError("round must be an int in [0, 2^63)")
        if self.degree == 0:
            object.__setattr__(self, "degree", default_degree(n))
        if not 1 <= self.degree <= n - 1:
            raise ValueError(f"degree must be in [1, {n - 1}], got {self.degree}")
        if self.degree < n - 1 and self.degree % 2:
            raise ValueError("degree must be even (Harary graph) unless the graph is complete")
        if self.threshold == 0:
            object.__setattr__(self, "threshold", default_threshold(self.degree))
        if not 1 <= self.threshold <= self.degree:
            raise ValueError(f"threshold must be in [1, degree={self.degree}]")
        if self.min_survivors == 0:
            object.__setattr__(self, "min_survivors", max(2, self.threshold))
        if not 1 <= self.min_survivors <= n:
            raise ValueError("min_survivors must be in [1, n]")
        self.spec.check_headroom(n)

    @property
    def n(self) -> int:
        return len(self.client_ids)

    def to_bytes(self) -> bytes:
        """Canonical JSON encoding (for transports that carry the public config)."""
        return json.dumps({
            "run_id": self.run_id, "round": self.round, "client_ids": list(self.client_ids),
            "spec": [self.spec.kind, self.spec.length, self.spec.bound, self.spec.frac_bits],
            "graph_seed": self.graph_seed.hex(), "server_pk": self.server_pk.hex(),
            "degree": self.degree, "threshold": self.threshold,
            "min_survivors": self.min_survivors,
        }, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundConfig:
        """Parse :meth:`to_bytes`; raises :class:`MalformedMessageError` on anything else."""
        try:
            d = json.loads(bytes(data).decode())
            kind, length, bound, frac = d["spec"]
            return cls(
                run_id=str(d["run_id"]), round=int(d["round"]),
                client_ids=tuple(str(c) for c in d["client_ids"]),
                spec=InputSpec(str(kind), int(length), float(bound), int(frac)),
                graph_seed=bytes.fromhex(d["graph_seed"]),
                server_pk=bytes.fromhex(d["server_pk"]),
                degree=int(d["degree"]), threshold=int(d["threshold"]),
                min_survivors=int(d["min_survivors"]),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise MalformedMessageError(f"invalid round config: {exc}") from exc
