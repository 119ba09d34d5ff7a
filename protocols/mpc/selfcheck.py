"""Interoperability self-check: ``protocols.sharing`` shares ↔ CrypTen, over real processes.

Each of ``world`` processes joins a gloo group on 127.0.0.1 and checks both directions:
(1) shares made by ``protocols.sharing`` load into CrypTen (``from_shares``) and CrypTen
reveals the secret; (2) a CrypTen-made tensor's raw shares, gathered, reconstruct with
``protocols.sharing.reconstruct`` and decode exactly with ``protocols.ring``.

    python -m protocols.mpc.selfcheck --world 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from protocols.mpc.crypten_compat import decode, from_ring_shares, init_party, to_ring_share
from protocols.ring import FixedPointRing
from protocols.sharing import reconstruct, share

VALUES = torch.tensor([-1.0, -0.5, -3.25, 0.0, 2.5, -1234.0625, 7.75e4], dtype=torch.float64)


def _party(rank: int, world: int, port: int, key_hex: str) -> None:
    crypten = init_party(rank, world, port)
    ring = FixedPointRing(16)
    try:
        shares = share(ring.encode(VALUES), world, key=bytes.fromhex(key_hex))  # same key: same shares
        ours = from_ring_shares(shares[rank])
        revealed = decode(ours.reveal())
        assert torch.equal(revealed, VALUES), f"rank {rank}: sharing→CrypTen gave {revealed}"
        theirs = crypten.cryptensor(VALUES.float() if rank == 0 else torch.zeros_like(VALUES).float(), src=0)
        raw = to_ring_share(theirs._tensor)
        gathered = [torch.empty_like(raw) for _ in range(world)]
        dist.all_gather(gathered, raw)
        back = decode(reconstruct(gathered))
        expect = ring.decode(ring.encode(VALUES.float().double()))
        assert torch.allclose(back, expect, atol=2**-16), f"rank {rank}: CrypTen→sharing gave {back}"
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=3)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--key")
    args = ap.parse_args(argv)
    if args.rank is not None:
        torch.set_num_threads(1)
        _party(args.rank, args.world, args.port, args.key)
        return 0
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = os.urandom(32).hex()
    procs = [subprocess.Popen([sys.executable, "-m", "protocols.mpc.selfcheck", "--world", str(args.world),
                               "--rank", str(r), "--port", str(port), "--key", key],
                              stderr=subprocess.PIPE, text=True) for r in range(args.world)]
    failed = [(r, p.communicate(timeout=180)[1]) for r, p in enumerate(procs)]
    bad = [(r, err) for (r, err), p in zip(failed, procs, strict=True) if p.returncode != 0]
    if bad:
        print(f"rank {bad[0][0]} failed:\n{bad[0][1][-3000:]}", file=sys.stderr)
        return 1
    print(f"interop ok across {args.world} processes (both directions, negatives exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
