"""Benchmark: one step of the secure neighbourhood sum in fleet mode (peer and assisted,
ChaCha20 keystreams and ChaCha20-Poly1305 envelopes included) against the plaintext central
neighbour sum on the same graph, in the same run. Also reports bytes per agent per step and
the per-device cost of one agent's share of a step.

    .venv/bin/python benchmarks/bench_neighbourhood.py [--n 150000] [--degree 10]

``--relay-devices N`` instead times the per-device relay (``NeighbourhoodRelay``, assisted,
padding on) on the shape of a hybrid fleet run: N devices with ``--degree`` contacts each
among ``7 N`` coordinator-run parties (most with one or two contacts, so padded with
dummies): seconds per round for planning, routing (dummies included) and all parties' own
work, and the public keys each party is handed. Issue 12: the old relay gave every dummy
every key of the run each round (O(dummies x N)).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from protocols.envelope import MessageContext, seal
from protocols.keys import ring_keystream
from protocols.neighbourhood import FleetNeighbourhoodSum, NeighbourhoodPolicy, Variant
from protocols.neighbourhood.local import make_devices, run_round
from protocols.neighbourhood.messages import PEER_PROTOCOL, encode_element, encode_tagged
from protocols.neighbourhood.relay import NeighbourhoodRelay
from simulation.kernels import NeighbourSum
from simulation.population import random_contact_graph

TARGET_S = {Variant.PEER: 2.0, Variant.ASSISTED: 0.5}
ID = "agent-000000"  # representative device identifier for per-device byte counts


def timed(fn, repeats: int, spread: list[float] | None = None) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (all timings appended to ``spread``)."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    if spread is not None:
        spread.extend(times)
    return statistics.median(times), out


def envelope_overhead() -> int:
    """Bytes a per-device envelope adds around its payload (AEAD + clear context)."""
    ctx = MessageContext(PEER_PROTOCOL, "run-0000", 0, 0, ID, ID)
    return len(seal(b"\x00" * 32, ctx, b"")) + len(ctx.to_bytes())


def per_device_bytes(fleet: FleetNeighbourhoodSum) -> float:
    """Wire bytes per agent per step if every (sender, receiver, phase) pair were one
    envelope, as in per-device mode (uplink to the relay; the downlink is the same)."""
    n, over = fleet.n, envelope_overhead()
    entry = len(encode_tagged([(ID, 0)])) - 4  # one tagged ring element in a bundle
    total = 0
    for cls in fleet._plan.classes:
        c, d = cls.sources.shape
        if fleet.variant is Variant.PEER:
            a, b = torch.triu_indices(d, d, 1)
            pairs = torch.cat([cls.sources[:, a] * (n + 1) + cls.sources[:, b],
                               cls.sources[:, b] * (n + 1) + cls.sources[:, a]]).flatten()
            total += pairs.numel() * entry  # shares, bundled per (j, k) pair
            total += c * d * (len(encode_element(0)) + over)  # partials
            total += torch.unique(pairs).numel() * (over + 4)  # bundle envelopes
        else:
            total += c * d * (len(encode_element(0)) + over)  # masked contributions
            total += c * (over + 8 + 4 + d * entry)  # mask sums with contributor lists
    return total / n


def per_device_step_ms(variant: Variant, degree: int) -> float:
    """Milliseconds per device for one round among ``degree + 1`` devices (a clique),
    i.e. each device is target of ``degree`` contacts and contact of ``degree`` targets."""
    ids = [f"agent-{i:06d}" for i in range(degree + 1)]
    contacts = {a: [b for b in ids if b != a] for a in ids}
    relay = NeighbourhoodRelay(contacts, variant=variant, run_id="bench",
                               policy=NeighbourhoodPolicy(min_size=3))
    devices = make_devices(relay, ids)
    values = {a: float(i % 2) for i, a in enumerate(ids)}
    run_round(relay, devices, values, 0)  # warm-up: X25519 pair keys
    t0 = time.perf_counter()
    rounds = 3
    for r in range(1, rounds + 1):
        run_round(relay, devices, values, r)
    return (time.perf_counter() - t0) / rounds / len(ids) * 1e3


def per_sender_keystream_s(n: int, degree: int) -> float:
    """Seconds for one ChaCha20 keystream call per sender (``degree`` elements each): what
    fleet mode would add if it keyed every sender separately instead of per chunk."""
    key = b"\x07" * 32
    out = torch.empty(degree, dtype=torch.int64)
    t0 = time.perf_counter()
    for i in range(n):
        ring_keystream(key, degree, nonce=i.to_bytes(16, "little"), out=out)
    return time.perf_counter() - t0


def relay_fleet(devices: int, degree: int, rounds: int, seed: int) -> None:
    """Per-device relay on a hybrid-fleet-shaped cross graph (see the module docstring)."""
    import random
    import resource

    rng = random.Random(seed)
    proxies = 7 * devices
    dev_ids = [f"d{i}" for i in range(devices)]
    contacts: dict[str, set[str]] = {}
    for d in dev_ids:  # cross edges device <-> coordinator-run party, both directions
        for p in rng.sample(range(proxies), degree):
            contacts.setdefault(d, set()).add(f"p{p}")
            contacts.setdefault(f"p{p}", set()).add(d)
    t0 = time.perf_counter()
    relay = NeighbourhoodRelay(contacts, variant=Variant.ASSISTED, run_id="bench-relay",
                               policy=NeighbourhoodPolicy(min_size=3))
    agents = make_devices(relay, sorted(contacts))
    t_setup = time.perf_counter() - t0
    values = {a: float(rng.random() < 0.1) for a in contacts}
    print(f"relay fleet: {devices} devices x {degree} contacts, {len(contacts)} parties "
          f"({len(contacts) - devices} coordinator-run), assisted, min_size 3 (padding); "
          f"setup (keys, registration) {t_setup:.1f} s")
    for r in range(rounds):
        t0 = time.perf_counter()
        att = relay.begin_round(r, set(contacts))
        t_plan = time.perf_counter() - t0
        keys_of = getattr(relay, "keys_for", lambda _plan: relay.public_keys())  # old: all
        keys = [len(keys_of(p)) for p in att.plans.values()]
        dummy_keys = max((len(d.keyring._public) for d in relay._dummies.values()), default=0)
        t0 = time.perf_counter()
        for a, plan in att.plans.items():
            agents[a].keyring.add_peers(keys_of(plan))
        ups = {a: agents[a].start(p, values[a]) for a, p in att.plans.items()}
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        deliveries = att.route_phase1(ups)
        t_route = time.perf_counter() - t0
        t0 = time.perf_counter()
        for a, dl in deliveries.items():
            agents[a].on_masked(dl.envelopes, dl.mask_sum)
        t_fin = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"  round {r}: plan {t_plan:.2f} s, route (relay + {len(relay._dummies)} dummies) "
              f"{t_route:.2f} s, parties' start {t_start:.2f} s + finish {t_fin:.2f} s; keys "
              f"per party max {max(keys)} (mean {statistics.mean(keys):.1f}), per dummy max "
              f"{dummy_keys}; max RSS {rss:.2f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=150_000)
    p.add_argument("--degree", type=float, default=10.0)
    p.add_argument("--prevalence", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--relay-devices", type=int, default=0,
                   help="time the per-device relay on a hybrid-fleet-shaped graph instead")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.relay_devices:
        relay_fleet(args.relay_devices, round(args.degree), args.rounds, args.seed)
        return

    merged = random_contact_graph(args.n, args.degree, seed=args.seed).merged()
    indptr, indices = merged.indptr, merged.indices.to(torch.int64)
    n, edges = args.n, indices.numel()
    kernel = NeighbourSum(merged, "cpu")
    g = torch.Generator().manual_seed(args.seed + 1)
    infected = (torch.rand(n, generator=g) < args.prevalence).to(torch.float32)
    target_of_edge = torch.repeat_interleave(torch.arange(n), indptr[1:] - indptr[:-1])

    def plain() -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32).index_add_(0, target_of_edge,
                                                              infected[indices])

    t_plain, ref = timed(plain, args.repeats)
    kernel.plain(infected)  # warm-up (numba compilation)
    t_kernel, ref_kernel = timed(lambda: kernel.plain(infected), args.repeats)
    assert torch.equal(ref, ref_kernel)
    # numba's OpenMP layer resets torch's intra-op thread count (measured: 1 -> 2), which made
    # every torch op below 10-20x slower on this loaded 2-core machine: restore it
    leaked = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"graph: {n} agents, {edges} directed edges (mean degree {edges / n:.2f}); "
          f"torch threads {args.threads}; timings are medians of {args.repeats}, measured on "
          f"a shared, possibly loaded machine: same-run ratios are what count")
    if leaked != args.threads:
        print(f"note: the numba kernel changed torch's thread count to {leaked}; reset to "
              f"{args.threads}")
    print(f"plaintext central sum: simulation kernel {t_kernel * 1e3:.1f} ms, torch index_add "
          f"{t_plain * 1e3:.1f} ms (ratios below are against the kernel)")
    t_sender = per_sender_keystream_s(n, round(args.degree))
    print(f"one ChaCha20 keystream call per sender ({n} calls): {t_sender:.3f} s "
          f"(fleet mode keys per chunk instead; see docs/neighbourhood.md)")
    for variant in (Variant.PEER, Variant.ASSISTED):
        t0 = time.perf_counter()
        fleet = FleetNeighbourhoodSum(indptr, indices, variant=variant,
                                      policy=NeighbourhoodPolicy(min_size=3))
        t_plan = time.perf_counter() - t0
        spread: list[float] = []
        t_step, res = timed(lambda f=fleet: f.step(infected), args.repeats, spread)
        exact = torch.equal(res.sums.float(), ref)
        st = res.stats
        ok = "MET" if t_step <= TARGET_S[variant] else "MISSED"
        print(f"\n[{variant.value}] one step: {t_step:.3f} s median, {min(spread):.3f}-"
              f"{max(spread):.3f} s range  (target <= {TARGET_S[variant]} s: "
              f"{ok}); {t_step / t_kernel:.0f}x the plaintext sum; plan (once) {t_plan:.2f} s; "
              f"sums equal plaintext: {exact}")
        print(f"  keystream {st.seconds_keystream:.3f} s for {st.keystream_elements} ring "
              f"elements in {st.keystream_calls} ChaCha20 calls; envelopes (seal+open) "
              f"{st.seconds_envelopes:.3f} s for {st.sealed_bytes / 1e6:.1f} MB in "
              f"{st.envelopes} AEAD calls")
        print(f"  relayed ring elements per agent: {st.ring_elements_relayed / n:.1f} "
              f"({', '.join(f'{k} {v / n:.1f}' for k, v in st.per_phase.items())})")
        print(f"  bytes per agent per step: ring payload {st.ring_elements_relayed * 8 / n:.0f} B"
              f", fleet-sealed {st.sealed_bytes / n:.0f} B, per-device wire (one envelope per "
              f"pair and phase, uplink) {per_device_bytes(fleet):.0f} B")
        dev_ms = per_device_step_ms(variant, round(args.degree))
        print(f"  per-device mode: {dev_ms:.2f} ms of CPU per device per step "
              f"(clique of {round(args.degree) + 1}, in-process relay)")


if __name__ == "__main__":
    main()
