"""Correlated randomness for CrypTen from a dealer, drawn from ChaCha20 (not mt19937).

CrypTen's own providers are unusable here: TFP makes rank 0 the dealer (it knows every
Beaver triple *and* sees every opened value, so it learns all secrets), and TTP seeds the
server's generators from torch's default mt19937 (fixed default seed) and talks pickle.
This provider keeps CrypTen's protocols (Beaver multiplication, squaring, wrap-count
truncation) and replaces where the randomness comes from:

* The dealer is a separate process (the last rank) that is *not* a computing party: it never
  sees an opened value. It sends each computing party i a fresh 256-bit key k_i (os.urandom).
* For request j, party i draws its shares of (a, b, c) from ChaCha20(k_i, nonce=j); the dealer
  draws the same values for every i, computes c = a·b (or r², or the wrap count θ_r), and sends
  party 0 the one correction share c_0 = c − Σ_{i≠0} c_i. Requests are fixed-size int64
  headers (no pickle), checked by the dealer.

Trust: the dealer must not collude with any computing party (it knows a, b; a party knows
x − a). It is needed only while the session sets up (log and square of the secret counts);
rounds after that need no correlated randomness, and the dealer exits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from protocols.keys import random_key, ring_keystream
from protocols.mpc.errors import DealerError

__all__ = ["DealerProvider", "serve_dealer"]

OP_STOP, OP_MUL, OP_MATMUL, OP_SQUARE, OP_WRAPS = 0, 1, 2, 3, 4
WITH_WRAPS = 8  # flag: also serve the wrap pair for the product's truncation (next counter)
_MAXD = 8
HEADER_LEN = 2 + 2 * (1 + _MAXD)
MAX_ELEMENTS = 1 << 22


def _stream(key: bytes, counter: int, n: int) -> torch.Tensor:
    return ring_keystream(key, n, nonce=b"\0" * 4 + counter.to_bytes(12, "little"))


def _encode_header(op: int, counter: int, size0=(), size1=()) -> torch.Tensor:
    h = torch.zeros(HEADER_LEN, dtype=torch.int64)
    h[0], h[1] = op, counter
    for base, size in ((2, size0), (3 + _MAXD, size1)):
        if len(size) > _MAXD:
            raise DealerError(f"tensor of {len(size)} dimensions: the dealer serves at most {_MAXD}")
        h[base] = len(size)
        h[base + 1: base + 1 + len(size)] = torch.tensor(list(size), dtype=torch.int64)
    return h


def _decode_header(h: torch.Tensor) -> tuple[int, int, torch.Size, torch.Size]:
    op, counter = int(h[0]), int(h[1])
    sizes = []
    for base in (2, 3 + _MAXD):
        nd = int(h[base])
        if not 0 <= nd <= _MAXD:
            raise DealerError(f"bad dimension count {nd}")
        dims = [int(v) for v in h[base + 1: base + 1 + nd]]
        if any(d < 0 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
            raise DealerError(f"bad or oversized shape {dims}")
        sizes.append(torch.Size(dims))
    return op, counter, sizes[0], sizes[1]


def _broadcast(size0: torch.Size, size1: torch.Size) -> torch.Size:
    """NumPy broadcasting of two shapes (``torch.broadcast_shapes`` imports sympy: ~1 s)."""
    n = max(len(size0), len(size1))
    a, b = (1,) * (n - len(size0)) + tuple(size0), (1,) * (n - len(size1)) + tuple(size1)
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and 1 not in (x, y):
            raise DealerError(f"shapes {tuple(size0)} and {tuple(size1)} do not broadcast")
        out.append(y if x == 1 else x)
    return torch.Size(out)


def _out_size(op: int, size0: torch.Size, size1: torch.Size) -> torch.Size:
    try:
        if op == OP_MUL:
            return _broadcast(size0, size1)
        if op == OP_MATMUL:
            return torch.matmul(torch.empty(size0, device="meta"), torch.empty(size1, device="meta")).shape
    except RuntimeError as exc:
        raise DealerError(f"shapes {tuple(size0)} and {tuple(size1)} do not combine: {exc}") from None
    if op in (OP_SQUARE, OP_WRAPS):
        return size0
    raise DealerError(f"unknown dealer operation {op}")


def _draw(key: bytes, counter: int, sizes: list[torch.Size]) -> list[torch.Tensor]:
    flat = _stream(key, counter, sum(math.prod(s) for s in sizes))
    out, at = [], 0
    for s in sizes:
        n = math.prod(s)
        out.append(flat[at: at + n].view(s))
        at += n
    return out


def _request_sizes(op: int, size0: torch.Size, size1: torch.Size) -> tuple[list[torch.Size], torch.Size]:
    """(sizes each party draws before the last, size of the last (correction) tensor)."""
    out = _out_size(op, size0, size1)
    if op in (OP_MUL, OP_MATMUL):
        return [size0, size1], out
    return [size0], out  # square: r then r²; wraps: r then θ_r


class DealerProvider:
    """CrypTen tuple provider for computing party ``rank`` (installed by ``crypten_compat``)."""

    NAME = "LPM-DEALER"

    def __init__(self, rank: int, dealer_rank: int, key: bytes, *, speculate: bool = True) -> None:
        self.rank, self.dealer_rank, self.key = rank, dealer_rank, key
        self.counter = 0
        self.requests = 0  # tuples used, the same count at every party
        self.speculative_hits = 0
        self.speculate = speculate
        self._pending: tuple[torch.Size, list[torch.Tensor]] | None = None
        # speculation: (op, size0, size1), its counter; party 0 also holds the dealer's reply
        self._spec: tuple[tuple[int, torch.Size, torch.Size], int] | None = None
        self._spec_io: tuple[torch.Tensor, torch.Tensor, Any, Any] | None = None

    def _reply_len(self, op: int, size0: torch.Size, size1: torch.Size) -> int:
        _, last = _request_sizes(op, size0, size1)
        wraps = math.prod(last) if op in (OP_MUL, OP_MATMUL, OP_SQUARE) else 0
        return math.prod(last) + wraps

    def _header(self, op: int, counter: int, size0: torch.Size, size1: torch.Size) -> torch.Tensor:
        prefetch = op in (OP_MUL, OP_MATMUL, OP_SQUARE)
        return _encode_header(op | (WITH_WRAPS if prefetch else 0), counter, size0, size1)

    def _collect_speculation(self) -> torch.Tensor | None:
        """Party 0: wait for the outstanding speculative reply (in order on the channel)."""
        if self._spec_io is None:
            return None
        _, reply, send_work, recv_work = self._spec_io
        send_work.wait()
        recv_work.wait()
        self._spec_io = None
        return reply

    def _tuple(self, op: int, size0, size1=()) -> list[torch.Tensor]:
        """One tuple. A product (mul, matmul, square) also reserves the next counter for the
        wrap pair of its truncation, served in the same round trip (CrypTen truncates every
        fixed-point product right away). After each request every party reserves the next
        counters for an identical request and party 0 asks the dealer for it at once, so a
        repeated request (the squarings of exp) finds its correction already there. An
        unused reservation is skipped by every party alike (all run the same code path)."""
        size0, size1 = torch.Size(size0), torch.Size(size1)
        first, last = _request_sizes(op, size0, size1)
        prefetch = op in (OP_MUL, OP_MATMUL, OP_SQUARE)
        step = 2 if prefetch else 1
        signature = (op, size0, size1)
        hit = self._spec is not None and self._spec[0] == signature
        self._pending = None
        self.requests += 1
        if hit:
            assert self._spec is not None
            counter = self._spec[1]
            self.speculative_hits += 1
        else:
            if self.rank == 0:
                self._collect_speculation()  # a miss: discard the unused reply
            counter = self.counter
            self.counter += step
        self._spec = None
        wrap_first, wrap_last = _request_sizes(OP_WRAPS, last, torch.Size())
        if self.rank == 0:
            drawn = _draw(self.key, counter, first)
            if hit:
                reply = self._collect_speculation()
                assert reply is not None
            else:
                dist.send(self._header(op, counter, size0, size1), dst=self.dealer_rank)
                reply = torch.empty(self._reply_len(op, size0, size1), dtype=torch.int64)
                dist.recv(reply, src=self.dealer_rank)
            n_last = math.prod(last)
            result = [*drawn, reply[:n_last].view(last)]
            if prefetch:
                self._pending = (last, [*_draw(self.key, counter + 1, wrap_first), reply[n_last:].view(wrap_last)])
        else:
            result = _draw(self.key, counter, [*first, last])
            if prefetch:
                self._pending = (last, _draw(self.key, counter + 1, [*wrap_first, wrap_last]))
        if self.speculate:
            self._spec = (signature, self.counter)
            if self.rank == 0:
                header = self._header(op, self.counter, size0, size1)
                reply = torch.empty(self._reply_len(op, size0, size1), dtype=torch.int64)
                send_work = dist.isend(header, dst=self.dealer_rank)
                recv_work = dist.irecv(reply, src=self.dealer_rank)
                self._spec_io = (header, reply, send_work, recv_work)
            self.counter += step
        return result

    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if args or kwargs or op not in ("mul", "matmul"):
            raise DealerError(f"the dealer serves mul and matmul triples, not {op!r} with extra arguments")
        a, b, c = self._tuple(OP_MUL if op == "mul" else OP_MATMUL, size0, size1)
        return tuple(_shared(t) for t in (a, b, c))

    def square(self, size, device=None):
        r, r2 = self._tuple(OP_SQUARE, size)
        return _shared(r), _shared(r2)

    def wrap_rng(self, size, device=None):
        if self._pending is not None and self._pending[0] == torch.Size(size):
            (r, theta_r), self._pending = self._pending[1], None
        else:
            r, theta_r = self._tuple(OP_WRAPS, size)
        return _shared(r), _shared(theta_r)

    def generate_binary_triple(self, size0, size1, device=None):
        raise DealerError("binary triples are not served (the loss needs no comparison)")

    def B2A_rng(self, size, device=None):
        raise DealerError("B2A randomness is not served (the loss needs no comparison)")

    def stop(self) -> None:
        """Tell the dealer that set-up is over (party 0 only, after any speculative reply)."""
        self._spec = None
        if self.rank == 0:
            self._collect_speculation()
            dist.send(_encode_header(OP_STOP, self.counter), dst=self.dealer_rank)


def _shared(t: torch.Tensor):
    from crypten.mpc.primitives import ArithmeticSharedTensor

    return ArithmeticSharedTensor.from_shares(t.contiguous(), precision=0)


def serve_dealer(parties: int) -> int:
    """Run as the dealer (rank ``parties``): hand out keys, answer party 0's requests until
    it sends stop. Returns the number of requests served."""
    from crypten.common.util import count_wraps

    keys = [random_key() for _ in range(parties)]
    for rank, key in enumerate(keys):
        dist.send(torch.frombuffer(bytearray(key), dtype=torch.uint8), dst=rank)
    expected = 0
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    def correction(op: int, counter: int, size0: torch.Size, size1: torch.Size) -> torch.Tensor:
        first, last = _request_sizes(op, size0, size1)
        draws = [_draw(key, counter, [*first, last]) for key in keys]
        def total(i: int) -> torch.Tensor:
            return torch.stack([d[i] for d in draws]).sum(dim=0)

        if op in (OP_MUL, OP_MATMUL):
            a, b = total(0), total(1)
            value = a * b if op == OP_MUL else torch.matmul(a, b)
        elif op == OP_SQUARE:
            value = total(0) * total(0)
        else:
            value = count_wraps([d[0] for d in draws])
        others = torch.stack([d[-1] for d in draws[1:]]).sum(dim=0) if len(draws) > 1 else torch.zeros_like(value)
        return (value - others).reshape(-1)

    while True:
        dist.recv(header, src=0)
        op, counter, size0, size1 = _decode_header(header)
        base, prefetch = op & ~WITH_WRAPS, bool(op & WITH_WRAPS)
        if base == OP_STOP:
            return expected
        if counter != expected:
            raise DealerError(f"request {counter} replayed or out of order (expected {expected})")
        if prefetch and base not in (OP_MUL, OP_MATMUL, OP_SQUARE):
            raise DealerError(f"operation {base} has no truncation to prefetch")
        parts = [correction(base, counter, size0, size1)]
        if prefetch:
            parts.append(correction(OP_WRAPS, counter + 1, _out_size(base, size0, size1), torch.Size()))
        expected = counter + (2 if prefetch else 1)
        dist.send(torch.cat(parts).contiguous(), dst=0)


def receive_key(dealer_rank: int) -> bytes:
    """A computing party's key from the dealer (first message after the group forms)."""
    buf = torch.empty(32, dtype=torch.uint8)
    dist.recv(buf, src=dealer_rank)
    return bytes(buf.tolist())
