"""An institution's process: joins the party group, loads only its own series, and answers
loss/gradient rounds until the coordinator says stop.

    python -m protocols.mpc.party --rank 0 --world 6 --port 29500 --data cases.csv --column BX_CASE_COUNT
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from protocols.mpc.crypten_compat import init_party
from protocols.mpc.institutional import RoundStats, institution_round
from protocols.ring import RingOverflowError

CONTROL_STOP = 0


class HeadroomRefused(RuntimeError):
    """This institution refused a round whose products could wrap the ring."""


def load_series(path: str, column: str, start: str, end: str) -> torch.Tensor:
    """The institution's private column (the only data this process reads)."""
    import pandas as pd

    frame = pd.read_csv(path)
    if column not in frame:
        raise SystemExit(f"column {column!r} not in {path}")
    dates = pd.to_datetime(frame["date_of_interest"], format="%m/%d/%Y")
    sel = frame[(dates >= start) & (dates <= end)]
    return torch.tensor(sel[column].to_numpy(), dtype=torch.float64)


def serve(rank: int, world: int, port: int, y: torch.Tensor, count_scale: float) -> RoundStats:
    """Answer rounds; the coordinator broadcasts control = [go, K, T, P] before each."""
    init_party(rank, world, port)
    stats = RoundStats()
    try:
        while True:
            control = torch.zeros(4, dtype=torch.int64)
            dist.broadcast(control, src=world - 1)
            if int(control[0]) == CONTROL_STOP:
                break
            shape = (int(control[1]), int(control[2]), int(control[3]))
            try:
                institution_round(y, shape, count_scale, stats)
            except RingOverflowError:
                # The message would carry the magnitude of this institution's counts: say only
                # that the round was refused (stderr may be visible to the launcher).
                raise HeadroomRefused(f"institution {rank} refused the round: Σ count × multiplier "
                                      "would exceed the ring headroom (raise --count-scale)") from None
    finally:
        dist.destroy_process_group()
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--column", required=True)
    ap.add_argument("--start", default="2020-03-01")
    ap.add_argument("--end", default="2020-06-28")
    ap.add_argument("--count-scale", type=float, default=100.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    y = load_series(args.data, args.column, args.start, args.end)
    serve(args.rank, args.world, args.port, y, args.count_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
