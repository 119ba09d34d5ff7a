"""Public round parameters shared by server and clients: roster, graph degree, threshold,
input specification and the public graph seed."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from protocols.secagg.errors import ConfigError, MalformedMessageError
from protocols.secagg.quantize import InputSpec

__all__ = ["RoundConfig", "check_security", "default_degree", "default_threshold"]
MAX_CLIENTS = 1 << 20
MIN_DEGREE = 4
MIN_THRESHOLD = 2
MIN_SURVIVORS = 3
MAX_CONFIG_BYTES = 300 * MAX_CLIENTS


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def default_degree(n: int) -> int:
    """Neighbours per client: the smallest even number ≥ log2 n (8 at n = 200, 10 at
    n = 1000) and ≥ 4, capped at the complete graph."""
    if not _is_int(n) or n < 3:
        raise ConfigError("secure aggregation needs at least 3 clients")
    k = 2 * math.ceil(math.log2(n) / 2)
    return min(max(k, MIN_DEGREE), n - 1)


def default_threshold(degree: int) -> int:
    """Shamir threshold: a strict majority of a client's neighbours (and at least 2)."""
    return max(MIN_THRESHOLD, degree // 2 + 1)


def check_security(n: int, degree: int, threshold: int, min_survivors: int) -> None:
    """Refuse parameters below the documented security level (docs/secagg.md):

    * ``threshold ≥ 2`` and ``2·threshold > degree``: a minority of a client's neighbours
      (in particular one curious neighbour) never holds enough shares of its secret, and two
      disjoint groups of neighbours can never both reach the threshold;
    * ``degree ≥ 4`` unless the graph is complete (n ≤ 5), so that a neighbourhood tolerates
      at least one corrupt and one dropped neighbour;
    * ``min_survivors ≥ threshold + 1`` (and ≥ 3): no sum over fewer inputs is ever revealed.
    """
    if not MIN_THRESHOLD <= threshold <= degree:
        raise ConfigError(f"threshold must be in [{MIN_THRESHOLD}, degree={degree}], "
                          f"got {threshold}")
    if 2 * threshold <= degree:
        raise ConfigError(f"threshold {threshold} is not a strict majority of the "
                          f"{degree} neighbours (2·t must exceed the degree)")
    if degree < min(MIN_DEGREE, n - 1):
        raise ConfigError(f"degree {degree} is below {MIN_DEGREE} (graph not complete)")
    floor = max(MIN_SURVIVORS, threshold + 1)
    if not floor <= min_survivors <= n:
        raise ConfigError(f"min_survivors must be in [{floor}, {n}], got {min_survivors}")


@dataclass(frozen=True)
class RoundConfig:
    """Everything public about one key epoch (``round`` is the epoch number; days are
    counted separately).

    ``client_ids`` is the roster (index = position); ``graph_seed`` is public randomness that
    fixes the neighbour graph; ``server_pk`` is the server's X25519 key for this round (every
    client–server message after the signed key advertisement carries an HMAC under a key
    agreed with it); ``min_survivors`` is the smallest number of inputs the server
    may reveal a sum of. Construction validates every field and the security level
    (:func:`check_security`) and raises :class:`ConfigError`.
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
        if not isinstance(self.run_id, str) or not 1 <= len(self.run_id.encode()) <= 255:
            raise ConfigError("run_id must be a str of 1..255 UTF-8 bytes")
        if not isinstance(self.client_ids, tuple):
            raise ConfigError("client_ids must be a tuple of str")
        n = len(self.client_ids)
        if not 3 <= n <= MAX_CLIENTS:
            raise ConfigError(f"need 3..{MAX_CLIENTS} clients, got {n}")
        if any(not isinstance(c, str) or not c or len(c.encode()) > 255 for c in self.client_ids):
            raise ConfigError("client ids must be non-empty str of at most 255 bytes")
        if len(set(self.client_ids)) != n:
            raise ConfigError("client ids must be distinct")
        if not isinstance(self.spec, InputSpec):
            raise ConfigError("spec must be an InputSpec")
        if not isinstance(self.graph_seed, bytes) or len(self.graph_seed) != 32:
            raise ConfigError("graph_seed must be 32 bytes")
        if not isinstance(self.server_pk, bytes) or len(self.server_pk) != 32:
            raise ConfigError("server_pk must be 32 bytes")
        if not _is_int(self.round) or not 0 <= self.round < 2**63:
            raise ConfigError("round must be an int in [0, 2^63)")
        for name in ("degree", "threshold", "min_survivors"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"{name} must be an int")
        if self.degree == 0:
            object.__setattr__(self, "degree", default_degree(n))
        if not 1 <= self.degree <= n - 1:
            raise ConfigError(f"degree must be in [1, {n - 1}], got {self.degree}")
        if self.degree < n - 1 and self.degree % 2:
            raise ConfigError("degree must be even (Harary graph) unless the graph is complete")
        if self.threshold == 0:
            object.__setattr__(self, "threshold", default_threshold(self.degree))
        if self.min_survivors == 0:
            object.__setattr__(self, "min_survivors",
                               min(n, max(MIN_SURVIVORS, self.threshold + 1)))
        check_security(n, self.degree, self.threshold, self.min_survivors)
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
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) > MAX_CONFIG_BYTES:
            raise MalformedMessageError("round config must be bytes of bounded size")
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
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError,
                RecursionError) as exc:
            raise MalformedMessageError(f"invalid round config: {exc}") from exc
