"""The coordinator's batched SecAgg+ paths against the scalar reference: batched Shamir
reconstruction (= per-secret :func:`reconstruct_secret`; a tampered share among more than
threshold is always caught, also one crafted to cancel across the packed chunks), batched
ChaCha20 keystreams (= :func:`ring_keystream` per key), and the exact-layout message parsers
(accept only what the strict decoders accept, with the same content)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from protocols.keys import ring_keystream
from protocols.secagg import InputSpec
from protocols.secagg import epoch_messages as em
from protocols.secagg.keystream import BATCH_MAX_BLOCKS, ring_keystreams
from protocols.secagg.local import make_round
from protocols.secagg.messages import MAC_BYTES
from protocols.secagg.shamir import (
    ELEMENT_BYTES,
    PRIME,
    InconsistentSharesError,
    ShamirError,
    decode_share,
    encode_share,
    reconstruct_secret,
    reconstruct_secrets,
    share_secret,
)


def _batch(rng: random.Random, count: int, k: int, t: int, n: int = 500
           ) -> tuple[list[dict[int, bytes]], list[list[int]], list[bytes]]:
    """``count`` secrets, each shared among k random holders; up to k − t holders missing."""
    batch, fulls, secrets = [], [], []
    for _ in range(count):
        secret = os.urandom(32)
        xs = rng.sample(range(1, n + 1), k)
        shares = dict(zip(xs, share_secret(secret, xs, t), strict=True))
        gone = set(rng.sample(xs, rng.randint(0, k - t)))
        batch.append({x: s for x, s in shares.items() if x not in gone})
        fulls.append(xs)
        secrets.append(secret)
    return batch, fulls, secrets


@pytest.mark.parametrize(("k", "t"), [(4, 3), (6, 4), (10, 6), (16, 9)])
def test_batched_reconstruction_equals_the_scalar_path(k: int, t: int) -> None:
    rng = random.Random(k)  # test data only
    batch, fulls, secrets = _batch(rng, 60, k, t)
    assert [reconstruct_secret(s, t) for s in batch] == secrets
    assert reconstruct_secrets(batch, t) == secrets
    assert reconstruct_secrets(batch, t, fulls) == secrets  # weights from the sharing set
    assert reconstruct_secrets(batch, t, fulls) == secrets  # cached plans
    assert reconstruct_secrets([], t) == []


@pytest.mark.parametrize(("k", "t"), [(6, 4), (10, 6), (16, 9)])
def test_any_single_tampered_share_is_detected(k: int, t: int) -> None:
    rng = random.Random(100 + k)  # test data only
    batch, fulls, _ = _batch(rng, 5, k, t)
    for item, shares in enumerate(batch):
        if len(shares) == t:
            continue  # no redundancy: nothing to check against
        for x in shares:
            for chunk in range(3):
                vals = list(decode_share(shares[x]))
                vals[chunk] = (vals[chunk] + rng.randrange(1, PRIME)) % PRIME
                bad = [dict(s) for s in batch]
                bad[item][x] = encode_share(vals)
                with pytest.raises(InconsistentSharesError) as err:
                    reconstruct_secrets(bad, t, fulls)
                assert err.value.item == item


def test_an_error_cancelling_across_packed_chunks_is_detected() -> None:
    """The three chunks of a share are packed into one integer (lanes of 8·lane bits);
    errors chosen so that the *packed* value is unchanged mod p (δ₀·2^(2L) + δ₁·2^L ≡ 0)
    must still be caught: each chunk is checked on its own."""
    t, k = 4, 6
    xs = list(range(1, k + 1))
    shares = dict(zip(xs, share_secret(os.urandom(32), xs, t), strict=True))
    lane_bits = 8 * -(-(2 * 127 + k.bit_length()) // 8)
    delta0 = 12345
    delta1 = -delta0 * pow(2, lane_bits, PRIME) % PRIME
    vals = list(decode_share(shares[3]))
    vals[0] = (vals[0] + delta0) % PRIME
    vals[1] = (vals[1] + delta1) % PRIME
    shares[3] = encode_share(vals)
    with pytest.raises(InconsistentSharesError):
        reconstruct_secrets([shares], t)


def test_batched_reconstruction_rejects_invalid_input_naming_the_item() -> None:
    rng = random.Random(7)  # test data only
    batch, _, _ = _batch(rng, 4, 6, 4)
    x = next(iter(batch[2]))
    outside = [dict(s) for s in batch]
    outside[2][x] = PRIME.to_bytes(ELEMENT_BYTES, "big") * 3  # p itself: not in the field
    with pytest.raises(ShamirError, match="outside the field") as err:
        reconstruct_secrets(outside, 4)
    assert err.value.item == 2
    short = [dict(s) for s in batch]
    short[1][x] = b"\x00" * 47
    with pytest.raises(ShamirError) as err:
        reconstruct_secrets(short, 4)
    assert err.value.item == 1
    few = [dict(s) for s in batch]
    few[3] = dict(list(few[3].items())[:3])
    with pytest.raises(ShamirError, match="need 4") as err:
        reconstruct_secrets(few, 4)
    assert err.value.item == 3


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 8 * BATCH_MAX_BLOCKS, 8 * BATCH_MAX_BLOCKS + 1])
@pytest.mark.parametrize("keys", [1, 8, 40])
def test_batched_keystreams_equal_ring_keystream(n: int, keys: int) -> None:
    ks = [os.urandom(32) for _ in range(keys)]
    ref = torch.stack([ring_keystream(k, n) for k in ks]).numpy()
    assert (ring_keystreams(ks, n) == ref).all()


def test_batched_keystream_rejects_bad_keys() -> None:
    with pytest.raises(ValueError):
        ring_keystreams([b"short"], 4)
    assert ring_keystreams([], 4).shape == (0, 4)


def _bodies() -> dict[str, tuple[bytes, bytes]]:
    """(MAC-stripped body, exact expected header) of one real input, tags and unmask
    response from client 0 (N=8, k=4), with one neighbour dropped before input so that
    the tags carry a day key."""
    setup = make_round(8, InputSpec("int", 5, 100), degree=4, threshold=3)
    server, clients = setup.agreed()
    cfg = server.config
    gone = next(iter(server.neighbours(0)))
    server.open_day(3)
    inputs = {i: c.masked_input(3, torch.arange(5) - i) for i, c in enumerate(clients)
              if i != gone}
    for i, blob in inputs.items():
        server.receive(i, blob)
    tags = {i: clients[i].sign_survivors(b) for i, b in server.advance().items()}
    for i, blob in tags.items():
        server.receive(i, blob)
    resp = {i: clients[i].unmask(b) for i, b in server.advance().items()}

    def head(mtype: em.EMsg) -> bytes:
        return em.header_prefix(mtype, cfg.run_id, cfg.round, 3) + bytes.fromhex(
            "00000000ffffffff")

    return {"input": (inputs[0][:-MAC_BYTES], head(em.EMsg.INPUT)),
            "tags": (tags[0][:-MAC_BYTES], head(em.EMsg.TAGS)),
            "reveals": (resp[0][:-MAC_BYTES], head(em.EMsg.UNMASK_RESPONSE))}


def _fast(kind: str, body: bytes, head: bytes, keys: tuple) -> tuple | None:
    """The fast path as the server runs it: parse, then require the expected index sets
    (``keys``, from the honest message); None means the server falls back to strict."""
    if kind == "input":
        got = em.fast_input(body, head, 4, 5)
        return got if got is not None and got[0].keys() == keys[0] else None
    if kind == "tags":
        got2 = em.fast_tags(body, head, 4)
        ok = got2 is not None and got2[0].keys() == keys[0] and got2[1].keys() == keys[1]
        return got2 if ok else None
    got3 = em.fast_reveals(body, head, 4)
    return (got3,) if got3 is not None and got3.keys() == keys[0] else None


def _strict(kind: str, body: bytes) -> tuple:
    """The strict decoder's content in the fast path's shape, then the header (raises if
    it rejects)."""
    if kind == "input":
        msg = em.DayInput.decode(body, 8, 4, 5)
        return dict(msg.envelopes), msg.vector.numpy().astype("<i8").tobytes(), msg.header
    if kind == "tags":
        tags = em.SurvivorTags.decode(body, 8, 4)
        return dict(tags.tags), dict(tags.day_keys), tags.header
    resp = em.DayUnmaskResponse.decode(body, 8, 4)
    for _, _, data in resp.reveals:
        decode_share(data)  # in the field
    return {j: d for j, _, d in resp.reveals}, resp.header


def _mutations(body: bytes, rng: random.Random) -> list[bytes]:
    out = [body[:cut] for cut in range(0, len(body), 7)] + [body + b"\x00", body + body[-4:]]
    for pos in range(len(body)):
        for flip in (0x01, 0x80):
            out.append(body[:pos] + bytes([body[pos] ^ flip]) + body[pos + 1 :])
    for _ in range(200):
        pos = rng.randrange(len(body))
        out.append(body[:pos] + os.urandom(rng.randint(1, 8)) + body[pos + 1 :])
    return out


@pytest.mark.parametrize("kind", ["input", "tags", "reveals"])
def test_fast_parsers_accept_only_what_the_strict_decoders_accept(kind: str) -> None:
    body, head = _bodies()[kind]
    strict = _strict(kind, body)
    keys = tuple(part.keys() for part in strict[:-1] if isinstance(part, dict))
    assert strict[-1] == em.parse_eheader(head)
    got = _fast(kind, body, head, keys)
    assert got is not None, "the fast path must take a well-formed message"
    assert tuple(got) == strict[:-1]
    if kind == "tags":
        assert got[1], "the fixture must carry a day key"
    rng = random.Random(kind)  # test data only
    accepted = 0
    for mutated in _mutations(body, rng):
        fast = _fast(kind, mutated, head, keys)
        if fast is None:
            continue  # the server runs the strict decoder, which raises or agrees
        accepted += 1
        strict = _strict(kind, mutated)  # must not raise
        assert strict[-1] == em.parse_eheader(head)
        assert tuple(fast) == strict[:-1]
    assert accepted > 0  # flips inside tags, keys, envelopes or vectors stay well formed


def test_assembled_server_messages_are_the_reference_encodings() -> None:
    """The coordinator builds survivor sets and unmask requests from pre-encoded pieces:
    the bytes must be exactly what SurvivorSet / DayUnmaskRequest encode, entries sorted by
    index (as the per-entry encoders produced them before)."""
    setup = make_round(12, InputSpec("int", 3, 100), degree=6, threshold=4)
    server, clients = setup.agreed()
    gone = 5
    server.open_day(0)
    for i, c in enumerate(clients):
        if i != gone:
            server.receive(i, c.masked_input(0, torch.arange(3)))
    outs = server.advance()
    for blob in outs.values():
        body = blob[:-MAC_BYTES]
        msg, members = em.SurvivorSet.decode(body, 12)
        assert msg.encode() == body and gone not in members
    tagged = {i: clients[i].sign_survivors(b) for i, b in outs.items()}
    for i, blob in tagged.items():
        server.receive(i, blob)
    for i, blob in server.advance().items():
        body = blob[:-MAC_BYTES]
        req = em.DayUnmaskRequest.decode(body, 12, 6)
        assert req.encode() == body
        assert [j for j, _ in req.tags] == sorted(server.neighbours(i) - {gone})
        assert [j for j, _ in req.envelopes] == sorted(server.neighbours(i) - {gone})


def test_two_colluding_holders_cannot_shift_a_secret() -> None:
    """Before the batched path the coordinator compared the secrets of the t smallest and
    the t largest holders. Two colluding holders, one in each part outside the overlap,
    can pick errors e_a, e_b with λ¹_a·e_a = λ²_b·e_b: both subsets then give the same
    *wrong* secret. Checking every share against one polynomial needs m − t + 1 colluders
    (the code's distance)."""
    t, m = 4, 7
    xs = list(range(1, m + 1))
    secret = os.urandom(32)
    shares = dict(zip(xs, share_secret(secret, xs, t), strict=True))
    low, high = xs[:t], xs[-t:]
    a, b = low[0], high[-1]  # a only in the first subset, b only in the second

    def lagrange0(points: list[int], j: int) -> int:
        num = den = 1
        for x in points:
            if x != j:
                num, den = num * x % PRIME, den * (x - j) % PRIME
        return num * pow(den, -1, PRIME) % PRIME

    e_a = pow(lagrange0(low, a), -1, PRIME)  # shifts the first subset's result by +1
    e_b = lagrange0(low, a) * e_a * pow(lagrange0(high, b), -1, PRIME) % PRIME
    bad = dict(shares)
    for x, e in ((a, e_a), (b, e_b)):
        vals = list(decode_share(bad[x]))
        vals[0] = (vals[0] + e) % PRIME  # the first 15-byte chunk of the secret
        bad[x] = encode_share(vals)

    first = reconstruct_secret({x: bad[x] for x in low}, t)
    second = reconstruct_secret({x: bad[x] for x in high}, t)
    assert first == second != secret  # the old comparison accepted a shifted secret
    assert int.from_bytes(first[:15], "big") == int.from_bytes(secret[:15], "big") + 1
    with pytest.raises(InconsistentSharesError):
        reconstruct_secrets([bad], t)


def test_batched_self_mask_keys_equal_the_single_derivation() -> None:
    setup = make_round(6, InputSpec("int", 4, 2**20))
    from protocols.secagg.epoch_keys import EpochContexts

    ctx = EpochContexts(setup.config)
    seeds = [os.urandom(32) for _ in range(6)]
    for day in (0, 1, 2**40):
        assert ctx.self_mask_keys(seeds, range(6), day) == [
            ctx.self_mask_key(s, i, day) for i, s in enumerate(seeds)]
    with pytest.raises(ValueError):
        ctx.self_mask_keys(seeds, range(5), 0)


_EDGES = [0, 1, 2, 7, 8, (1 << 26) - 1, 1 << 26, (1 << 64) - 1, 1 << 64, (1 << 104) - 1,
          1 << 126, PRIME - 2, PRIME - 1]


def test_field_limb_arithmetic_matches_python_ints_at_the_edges() -> None:
    """The compiled GF(2^127 − 1) limbs: conversions round-trip and a product (also of
    unreduced limbs up to 2^27, as the kernel feeds it) is canonical and equal to a·b mod p,
    for edge values and random ones."""
    import numpy as np

    from protocols.secagg import gf127

    rng = random.Random(3)  # test data only
    values = _EDGES + [rng.randrange(PRIME) for _ in range(200)]
    raw = np.frombuffer(b"".join(v.to_bytes(16, "big") for v in values), dtype=np.uint8)
    limbs = gf127.from_be16(raw.reshape(-1, 16))
    assert [sum(int(x) << (26 * i) for i, x in enumerate(row)) for row in limbs] == values
    assert gf127.to_be16(limbs).tobytes() == raw.tobytes()
    for a in _EDGES + values[-20:]:
        for b in _EDGES + values[-20:]:
            got = gf127._canonical(*gf127._mul(*gf127.from_int(a), *gf127.from_int(b)))
            assert sum(int(x) << (26 * i) for i, x in enumerate(got)) == a * b % PRIME
    # x + (p − y) limbwise: limbs up to 2^27 in, still exact
    big = [(1 << 27) - 1] * 4 + [(1 << 24) - 1]
    val = sum(x << (26 * i) for i, x in enumerate(big))
    got = gf127._canonical(*gf127._mul(*big, *big))
    assert sum(int(x) << (26 * i) for i, x in enumerate(got)) == val * val % PRIME
    assert gf127._canonical(*gf127.from_int(PRIME)) == (0, 0, 0, 0, 0)


def test_batched_reconstruction_with_holders_outside_the_named_set() -> None:
    """``full`` is a hint: holders outside it fall back to their own set's weights; x
    beyond the compiled path's int64 range is refused naming the item."""
    rng = random.Random(11)  # test data only
    batch, fulls, secrets = _batch(rng, 8, 6, 4)
    wrong = [list(f) for f in fulls]
    wrong[3] = [x + 1000 for x in wrong[3]]  # none of item 3's holders
    wrong[5] = wrong[5][1:]  # one holder missing from the named set
    assert reconstruct_secrets(batch, 4, wrong) == secrets
    xs = [1, 2, 1 << 63, 5]
    far = dict(zip(xs, share_secret(os.urandom(32), xs, 3), strict=True))
    with pytest.raises(ShamirError, match="2\\^63") as err:
        reconstruct_secrets([batch[0], far], 3)
    assert err.value.item == 1


def test_set_table_growth_within_one_batch_and_array_input_checks() -> None:
    """The sharing-set table grows (reallocates) while a batch's sets are added: the kernel
    must get the grown table (it once got the old one: an out-of-bounds read). Bad array
    input to :func:`reconstruct_sorted` is refused, not read out of bounds."""
    import numpy as np

    from protocols.secagg import shamir
    from protocols.secagg.shamir import SHARE_BYTES, reconstruct_sorted

    shamir._SETS.clear()
    rng = random.Random(12)  # test data only
    batch, fulls, secrets = _batch(rng, 300, 6, 4)
    assert reconstruct_secrets(batch, 4, fulls) == secrets
    shamir._SETS.limit = 100  # a batch with more new sets than the limit: cleared, refilled
    try:
        assert reconstruct_secrets(batch, 4, fulls) == secrets
    finally:
        shamir._SETS.limit = 1 << 13
    xs = sorted(batch[0])
    hx = np.array(xs, dtype=np.int64)
    raw = np.frombuffer(b"".join(batch[0][x] for x in xs), dtype=np.uint8).reshape(
        -1, SHARE_BYTES)
    full = tuple(sorted(fulls[0]))
    assert reconstruct_sorted(hx, [len(xs)], raw, 4, [full]) == secrets[:1]
    with pytest.raises(ShamirError):
        reconstruct_sorted(hx[::-1].copy(), [len(xs)], raw, 4, [full])  # not ascending
    with pytest.raises(ShamirError):
        reconstruct_sorted(hx, [len(xs) + 1], raw, 4, [full])  # counts beyond the rows
    with pytest.raises(ShamirError):
        reconstruct_sorted(hx, [len(xs)], raw[:-1], 4, [full])


def test_message_mac_is_hmac_sha256_and_strip_mac_accepts_the_same_inputs() -> None:
    import hashlib
    import hmac

    from protocols.secagg.errors import MalformedMessageError, TamperedMessageError
    from protocols.secagg.messages import add_mac, strip_mac

    key, body = os.urandom(32), os.urandom(300)
    blob = add_mac(key, body)
    assert blob == body + hmac.new(key, body, hashlib.sha256).digest()

    class Sub(bytes):
        pass

    for form in (blob, bytearray(blob), memoryview(blob), Sub(blob)):
        assert strip_mac(key, form, 300) == body
    with pytest.raises(TamperedMessageError):
        strip_mac(key, blob[:-1] + bytes([blob[-1] ^ 1]), 300)
    with pytest.raises(MalformedMessageError):
        strip_mac(key, "text", 300)
    with pytest.raises(MalformedMessageError):
        strip_mac(key, blob[: MAC_BYTES - 1], 300)
