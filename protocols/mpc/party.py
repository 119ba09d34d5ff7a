"""An institution's process (or the dealer's): joins the party group, loads only its own
series, sets up the shared logs under CrypTen, then answers verified rounds until stop.

    python -m protocols.mpc.party --rank 0 --institutions 5 --port 29500 --data cases.csv \\
        --column BX_CASE_COUNT --cells 0,1,2,3,4 --model protocols.mpc.query:log_linear_model \\
        --model-args '{"cells": 5, "days": 120}'
    python -m protocols.mpc.party --dealer --institutions 5 --port 29500

The public model and the query policy are this institution's own run configuration (set by
its operator), never taken from the coordinator. It prints ``ready`` once its data loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date, timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from protocols.mpc.errors import DataRejected, MPCError
from protocols.mpc.loss import RoundStats, setup_shared_logs, share_counts
from protocols.mpc.query import QueryPolicy, QueryVerifier, load_public_model
from protocols.mpc.wire import CONTROL_STOP, decode_control

__all__ = ["load_series", "serve", "serve_as_dealer"]


def load_series(path: str | Path, column: str, start: str, end: str, count_bound: float) -> torch.Tensor:
    """The institution's private column, one value per day from ``start`` to ``end``.

    Raises :class:`DataRejected` for a missing file or column, a missing day, an empty cell,
    a negative count or one above the public ``count_bound``; the message names the day,
    never the value.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataRejected(f"no such case file: {p}")
    try:
        frame = pd.read_csv(p)
    except (ValueError, OSError) as exc:
        raise DataRejected(f"cannot read {p}: {exc}") from None
    if "date_of_interest" not in frame or column not in frame:
        raise DataRejected(f"{p} needs columns date_of_interest and {column!r}")
    try:
        first, last = date.fromisoformat(start), date.fromisoformat(end)
        dates = pd.to_datetime(frame["date_of_interest"], format="%m/%d/%Y").dt.date
    except ValueError as exc:
        raise DataRejected(f"bad date: {exc}") from None
    if last < first:
        raise DataRejected("end is before start")
    values = pd.to_numeric(frame[column], errors="coerce")
    by_day = dict(zip(dates, values, strict=True))
    out = []
    for i in range((last - first).days + 1):
        day = first + timedelta(days=i)
        if day not in by_day:
            raise DataRejected(f"{column}: no row for {day}")
        v = float(by_day[day])
        if math.isnan(v):
            raise DataRejected(f"{column}: empty or non-numeric cell on {day}")
        if v < 0:
            raise DataRejected(f"{column}: negative count on {day}")
        if not v <= count_bound:
            raise DataRejected(f"{column}: count on {day} is above the public bound {count_bound:g}")
        out.append(v)
    return torch.tensor(out, dtype=torch.float64)


def serve(rank: int, institutions: int, port: int, y: torch.Tensor, cells: list[int], model, policy: QueryPolicy,
          ) -> RoundStats:
    """Set up, then answer rounds until the coordinator broadcasts stop."""
    from protocols.mpc.crypten_compat import init_computing_party, leave, main_group
    from protocols.mpc.institutional import institution_round

    _, provider = init_computing_party(rank, institutions + 1, port)
    stats = RoundStats()
    try:
        group = main_group()
        n_cells, days = max(cells) + 1, y.numel()
        shared = setup_shared_logs(share_counts(y, rank, cells, n_cells, days, group, stats))
        provider.stop()
        verifier = QueryVerifier(model, policy, n_cells, days)
        while True:
            control = torch.empty(2, dtype=torch.int64)
            dist.broadcast(control, src=institutions, group=group)
            opcode, length = decode_control(control)
            if opcode == CONTROL_STOP:
                break
            institution_round(length, shared, verifier, policy, institutions, group, stats)
    finally:
        leave()
    return stats


def serve_as_dealer(institutions: int, port: int) -> int:
    """The dealer: keys and correlated randomness during set-up, then exit."""
    from protocols.mpc.crypten_compat import init_dealer, leave
    from protocols.mpc.dealer import serve_dealer

    init_dealer(institutions + 1, port)
    try:
        return serve_dealer(institutions + 1)
    finally:
        leave()


def parse_cells(text: str, institutions: int) -> list[int]:
    """Cell index of each institution ("0,1,1": institutions 1 and 2 add up in cell 1)."""
    try:
        cells = [int(c) for c in text.split(",")]
    except ValueError:
        raise MPCError(f"--cells must be comma-separated integers, got {text!r}") from None
    if len(cells) != institutions or min(cells) < 0 or sorted(set(cells)) != list(range(max(cells) + 1)):
        raise MPCError("--cells needs one index per institution, covering 0..C−1")
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dealer", action="store_true")
    ap.add_argument("--rank", type=int)
    ap.add_argument("--institutions", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--data")
    ap.add_argument("--column")
    ap.add_argument("--cells")
    ap.add_argument("--start", default="2020-03-01")
    ap.add_argument("--end", default="2020-06-28")
    ap.add_argument("--model", default="protocols.mpc.query:log_linear_model")
    ap.add_argument("--model-args", default="{}")
    ap.add_argument("--policy", default="{}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if args.dealer:
            serve_as_dealer(args.institutions, args.port)
            return 0
        if args.rank is None or args.data is None or args.column is None:
            raise MPCError("an institution needs --rank, --data and --column")
        policy = QueryPolicy.from_json(args.policy)
        cells = parse_cells(args.cells or ",".join(map(str, range(args.institutions))), args.institutions)
        y = load_series(args.data, args.column, args.start, args.end, policy.count_bound)
        try:
            model_args = json.loads(args.model_args)
        except ValueError as exc:
            raise MPCError(f"--model-args is not JSON: {exc}") from None
        model = load_public_model(args.model, model_args if isinstance(model_args, dict) else {})
        print("ready", flush=True)
        serve(args.rank, args.institutions, args.port, y, cells, model, policy)
    except MPCError as exc:
        who = "dealer" if args.dealer else f"institution {args.rank}"
        print(f"{who}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
