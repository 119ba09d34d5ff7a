"""Ring, keys, envelopes and additive sharing: exactness, binding, rejection of bad input."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.envelope import (
    MalformedEnvelopeError,
    MessageContext,
    MisroutedEnvelopeError,
    ReplayedEnvelopeError,
    ReplayGuard,
    TamperedEnvelopeError,
    open_envelope,
    seal,
)
from protocols.keys import (
    AgreementKey,
    IdentityKey,
    InvalidKeyError,
    SignatureError,
    derive_key,
    ring_keystream,
    verify_signature,
)
from protocols.ring import FixedPointRing, RingOverflowError
from protocols.sharing import SharingError, reconstruct, share

CTX = MessageContext("secagg", "run-1", 3, 1, "alice", "bob")


# ---------------------------------------------------------------- ring
@given(st.lists(st.floats(-1e9, 1e9, allow_nan=False), min_size=1, max_size=50))
def test_ring_roundtrip_within_half_resolution(values):
    ring = FixedPointRing()
    x = torch.tensor(values, dtype=torch.float64)
    err = (ring.decode(ring.encode(x)) - x).abs().max().item()
    assert err <= ring.resolution / 2 + 1e-9 * max(1.0, x.abs().max().item()) * 1e-6


def test_ring_decode_exact_for_negatives_and_sums():
    ring = FixedPointRing(16)
    x = torch.tensor([-1.0, -0.5, -3.25, -(2.0**30), 7.0])
    enc = ring.encode(x)
    assert torch.equal(ring.decode(enc), x.double())
    # sums of negatives decode exactly (CrypTen's decoder is off by 1.0 here)
    assert ring.decode(enc.sum().reshape(1)).item() == x.double().sum().item()


def test_ring_headroom_raises():
    ring = FixedPointRing(16)
    with pytest.raises(RingOverflowError):
        ring.encode(torch.tensor([2.0**47]))
    with pytest.raises(RingOverflowError):
        ring.encode(torch.tensor([2.0**40]), n_summands=2**8)
    with pytest.raises(RingOverflowError):
        ring.encode(torch.tensor([float("nan")]))
    ring.encode(torch.tensor([2.0**40]), n_summands=2**5)  # fits


def test_ring_arithmetic_wraps_mod_2_64():
    a = torch.tensor([2**63 - 1], dtype=torch.int64)
    assert (a + 1).item() == -(2**63)


# ---------------------------------------------------------------- keys
def test_identity_sign_verify_and_reject():
    key = IdentityKey.generate()
    sig = key.sign(b"msg")
    verify_signature(key.public_bytes(), sig, b"msg")
    with pytest.raises(SignatureError):
        verify_signature(key.public_bytes(), sig, b"other")
    with pytest.raises(InvalidKeyError):
        verify_signature(b"short", sig, b"msg")
    clone = IdentityKey.from_private_bytes(key.private_bytes())
    assert clone.public_bytes() == key.public_bytes()


def test_agreement_is_symmetric_and_derivation_is_domain_separated():
    a, b = AgreementKey.generate(), AgreementKey.generate()
    s = a.exchange(b.public_bytes())
    assert s == b.exchange(a.public_bytes())
    k1 = derive_key(s, CTX, label="mask")
    assert k1 == derive_key(s, CTX, label="mask")
    assert k1 != derive_key(s, CTX, label="seal")
    for other in (
        MessageContext("secagg", "run-1", 4, 1, "alice", "bob"),
        MessageContext("secagg", "run-1", 3, 2, "alice", "bob"),
        MessageContext("secagg", "run-1", 3, 1, "bob", "alice"),
        MessageContext("secagg", "run-2", 3, 1, "alice", "bob"),
    ):
        assert derive_key(s, other, label="mask") != k1
    with pytest.raises(InvalidKeyError):
        a.exchange(bytes(32))  # low-order point


def test_keystream_is_deterministic_fills_buffers_and_uses_all_key_bits():
    key = os.urandom(32)
    out = torch.empty(1000, dtype=torch.int64)
    a = ring_keystream(key, 1000, out=out)
    assert a.data_ptr() == out.data_ptr()
    assert torch.equal(a, ring_keystream(key, 1000))
    # flipping any single bit of the 256-bit key, including high bits a 32-bit seed would
    # ignore, changes the stream completely
    for bit in (0, 31, 32, 100, 255):
        flipped = bytearray(key)
        flipped[bit // 8] ^= 1 << (bit % 8)
        b = ring_keystream(bytes(flipped), 1000)
        assert (a == b).float().mean() < 0.01
    with pytest.raises(InvalidKeyError):
        ring_keystream(b"\x00" * 16, 10)


def test_keystream_bits_are_balanced():
    stream = ring_keystream(os.urandom(32), 1 << 14)
    bits = ((stream.unsqueeze(1) >> torch.arange(64)) & 1).float()
    # each bit position is 1 about half the time (binomial sd ~ 0.004 for 16384 samples)
    assert (bits.mean(0) - 0.5).abs().max() < 0.02


# ---------------------------------------------------------------- envelopes
def test_envelope_roundtrip_and_context_binding():
    key = os.urandom(32)
    blob = seal(key, CTX, b"payload")
    assert open_envelope(key, CTX, blob, expected_receiver="bob") == b"payload"
    with pytest.raises(TamperedEnvelopeError):  # replayed into another round
        open_envelope(key, MessageContext("secagg", "run-1", 4, 1, "alice", "bob"), blob)
    with pytest.raises(TamperedEnvelopeError):  # reordered into another step
        open_envelope(key, MessageContext("secagg", "run-1", 3, 2, "alice", "bob"), blob)
    with pytest.raises(MisroutedEnvelopeError):
        open_envelope(key, CTX, blob, expected_receiver="carol")
    with pytest.raises(TamperedEnvelopeError):
        open_envelope(os.urandom(32), CTX, blob)
    with pytest.raises(MalformedEnvelopeError):
        open_envelope(key, CTX, b"short")
    with pytest.raises(MalformedEnvelopeError):
        open_envelope(key, CTX, "not bytes")  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 10_000))
def test_envelope_rejects_any_tampering(payload, position):
    key = bytes(range(32))
    blob = bytearray(seal(key, CTX, payload))
    blob[position % len(blob)] ^= 0x01
    with pytest.raises(TamperedEnvelopeError):
        open_envelope(key, CTX, bytes(blob))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=100))
def test_envelope_garbage_never_crashes(garbage):
    with pytest.raises((TamperedEnvelopeError, MalformedEnvelopeError)):
        open_envelope(bytes(32), CTX, garbage)


def test_replay_guard():
    guard = ReplayGuard()
    guard.accept(CTX)
    with pytest.raises(ReplayedEnvelopeError):
        guard.accept(CTX)
    guard.accept(MessageContext("secagg", "run-1", 3, 2, "alice", "bob"))
    guard.forget_before(4)
    assert len(guard) == 0


def test_context_validation():
    from protocols.envelope import MalformedEnvelopeError

    for bad in [("p", "r", -1, 0, "a", "b"), ("p", "r", 2**63, 0, "a", "b"),
                ("p", "r", 0, 2**63, "a", "b"), ("p", "r", True, 0, "a", "b"),
                ("p", 5, 0, 0, "a", "b"), ("p", "r", 0, 0, "\ud800", "b")]:
        with pytest.raises(MalformedEnvelopeError):  # a project error (a ValueError)
            MessageContext(*bad).to_bytes()  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MessageContext("p", "r", -1, 0, "a", "b")
    with pytest.raises(ValueError):
        MessageContext("p", "r" * 300, 0, 0, "a", "b").to_bytes()
    # injective: field boundaries cannot be shifted
    assert (
        MessageContext("ab", "c", 0, 0, "a", "b").to_bytes()
        != MessageContext("a", "bc", 0, 0, "a", "b").to_bytes()
    )


# ---------------------------------------------------------------- sharing
@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_share_reconstruct(n):
    ring = FixedPointRing()
    x = ring.encode(torch.tensor([[-2.5, 3.0], [1e6, -1e-3]]))
    shares = share(x, n)
    assert len(shares) == n
    assert torch.equal(reconstruct(shares), x)


def test_shares_look_uniform_whatever_the_secret():
    zeros = torch.zeros(1 << 13, dtype=torch.int64)
    ones = torch.full((1 << 13,), 1 << 16, dtype=torch.int64)
    for secret in (zeros, ones):
        s = share(secret, 3)[2]  # the share that depends on the secret
        top = ((s >> 60) & 0xF).bincount(minlength=16).float()
        chi2 = (((top - top.mean()) ** 2) / top.mean()).sum().item()
        assert chi2 < 50  # 15 dof: p < 1e-5 threshold


def test_sharing_errors():
    with pytest.raises(SharingError):
        share(torch.zeros(3), 2)
    with pytest.raises(SharingError):
        reconstruct([torch.zeros(3, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(SharingError):
        reconstruct([])
