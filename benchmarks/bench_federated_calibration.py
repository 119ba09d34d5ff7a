"""β recovery by online federated calibration across a grid (issue 12's "β within 5 % in a
30-day, 100k-agent, 50-device run", measured on more than one point).

Each grid point is one real ``lpm fleet`` run in a subprocess (the coordinator, a device-host
process with 50 real ClientApps, SecAgg+ reports; ``OMP_NUM_THREADS=1``; one run at a time):

    lpm fleet --devices 50 --days 30 --population oxford --scale 0.67 --calibrate beta
      --calibrate-every 2 --beta RUN_BETA --beta-init START --seed SEED
      --drop-fraction DROP [--tangents] [--observed-csv SERIES]

Observed series (``--observed``):

* ``own`` (the issue's check): the run's own reported new infections; the run's dynamics
  (devices and synthetic agents) are at the truth, RUN_BETA = TRUTH.
* ``independent``: the new-infections series of another fleet run at the truth with seed
  SEED + 1 (another population draw: wiring, initial infections, uniforms, device seeds),
  given as ``--observed-csv``; the calibrating run itself runs at RUN_BETA = START (it does
  not know the truth). The series comes from an ``own`` point at (TRUTH, SEED + 1, drop 0)
  of the results file when there is one, else from an uncalibrated fleet run.

Per point (θ_d = the calibrator's β after day d's update, i.e. fitted on days 1..d, read
from the run's committed rows; with ``--calibrate-every 2`` it changes on even days): final
β and its error, the day from which |θ_d − truth| ≤ 5 % holds on every later day, the last
5 days' spread of θ_d, the rolling-window fits θ_t for t = 10, 20, 30, the observed series'
daily new infections (min, peak and its day). Results are
appended to a JSON-lines file (one line per finished point; points already in it are
skipped, so an interrupted grid resumes); ``--report`` prints the table of a results file.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_federated_calibration.py \\
        --design half --results /tmp/calgrid.jsonl        # 36 own-count points
    .venv/bin/python benchmarks/bench_federated_calibration.py --observed independent \\
        --truths 0.3 0.5 0.8 --starts 0.9 --seeds 0 --drops 0 --results /tmp/calgrid.jsonl
    .venv/bin/python benchmarks/bench_federated_calibration.py --report --results FILE

``--design full`` runs the full factorial truths × starts × seeds × drops × tangents;
``--design half`` (default) runs, per (truth, tangents), 6 of the 12 (seed, start, drop)
combinations — every seed with both starts, each start with both drop fractions —
(0, lo, 0), (0, hi, drop), (1, lo, drop), (1, hi, 0), (2, lo, 0), (2, hi, drop).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.05
WINDOWS = (10, 20, 30)
DEFAULT_ESTIMATOR = "straight_through"  # lpm fleet's


@dataclass(frozen=True)
class Point:
    """One grid point: the truth, calibration start, seed, dropout share, model, series."""

    truth: float
    start: float
    seed: int
    drop: float
    tangents: bool
    observed: str  # "own" or "independent"
    estimator: str = DEFAULT_ESTIMATOR

    @property
    def key(self) -> str:
        est = "" if self.estimator == DEFAULT_ESTIMATOR else f":estimator={self.estimator}"
        return (f"{self.observed}:truth={self.truth}:start={self.start}:seed={self.seed}:"
                f"drop={self.drop}:tangents={int(self.tangents)}{est}")

    @property
    def run_beta(self) -> float:
        """β of the calibrating run's own dynamics (the truth only for own counts)."""
        return self.truth if self.observed == "own" else self.start


def grid(truths: Sequence[float], starts: Sequence[float], seeds: Sequence[int],
         drops: Sequence[float], tangents: Sequence[bool], observed: str,
         design: str, estimator: str = DEFAULT_ESTIMATOR) -> list[Point]:
    """The points of the grid, ordered so that a partial run covers every truth and model."""
    if design == "full":
        combos = list(itertools.product(seeds, range(len(starts)), range(len(drops))))
    else:  # per seed: both starts, each start with both drops over the seeds
        combos = [(s, j % len(starts), (j + k) % len(drops))
                  for k, s in enumerate(seeds) for j in range(len(starts))]
    return [Point(t, starts[j], s, drops[d], tg, observed, estimator)
            for s, j, d in combos for tg in tangents for t in truths]


def lpm_command() -> list[str]:
    """The ``lpm`` entry point of this interpreter's environment."""
    exe = Path(sys.executable).parent / "lpm"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lpm")
    if found is None:
        raise SystemExit("no `lpm` command (install the package: pip install -e .)")
    return [found]


def run_fleet_cli(args: argparse.Namespace, *, run_beta: float, seed: int, out: Path,
                  calibrate: Point | None = None, observed_csv: Path | None = None,
                  drop: float = 0.0, estimator: str = DEFAULT_ESTIMATOR) -> dict[str, Any]:
    """One ``lpm fleet`` run; returns its summary.json (plus the wall seconds, the load)."""
    cmd = [*lpm_command(), "fleet", "--devices", str(args.devices), "--days", str(args.days),
           "--population", args.population, "--scale", str(args.scale),
           "--beta", str(run_beta), "--seed", str(seed), "--drop-fraction", str(drop),
           "--estimator", estimator, "--db", str(out / "run.db"), "--out", str(out)]
    if calibrate is not None:
        cmd += ["--calibrate", "beta", "--beta-init", str(calibrate.start),
                "--calibrate-every", str(args.every), "--calibrate-steps", str(args.steps)]
        if calibrate.tangents:
            cmd.append("--tangents")
    if observed_csv is not None:
        cmd += ["--observed-csv", str(observed_csv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                          check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        days = [ln for ln in done.stdout.splitlines() if ln.startswith("day ")]
        lines = [ln.strip(" │") for ln in done.stderr.splitlines()
                 if ln.strip(" │") and not ln.lstrip().startswith(("╭", "╰"))]
        raise FleetRunFailed(f"lpm fleet exited {done.returncode} after {len(days)} days: "
                             + " ".join(lines[-2:])[-400:], len(days), wall)
    summary = json.loads((out / "summary.json").read_text())
    if calibrate is not None:  # θ fitted on days 1..d, per day d (the store's rows)
        summary["theta_fitted"] = fitted_theta(out / "run.db", summary["run_id"])
    summary.update(wall_seconds=round(wall, 1), load_start=round(load0, 2),
                   load_end=round(os.getloadavg()[0], 2), command=" ".join(cmd[1:]))
    return summary


def fitted_theta(db: Path, run_id: str) -> list[float]:
    """β fitted on days 1..d for every day d, from the run's committed rows (``theta``:
    the calibrator's θ after day d's update; the summary's ``theta_beta`` is the β handed to
    day d + 1, picked before day d's update)."""
    from coordinator.store import CoordinatorStore

    store = CoordinatorStore(db)
    try:
        return [float(r["theta"]["beta"][-1]) for r in store.series(run_id)]
    finally:
        store.close()


def within_from(theta: Sequence[float], truth: float, tol: float = TOLERANCE) -> int | None:
    """The first day (1-based) from which every later θ is within ``tol`` of the truth."""
    day = None
    for d in range(len(theta), 0, -1):
        if abs(theta[d - 1] - truth) > tol * truth:
            break
        day = d
    return day


def measure(theta: Sequence[float], truth: float, observed: Sequence[float]) -> dict[str, Any]:
    """The point's figures from its θ trajectory (θ after fitting days 1..d, per day d)."""
    final = theta[-1]
    tail = theta[-5:]
    return {
        "final_beta": final,
        "error": (final - truth) / truth,
        "within_from_day": within_from(theta, truth),
        "spread_last5": (max(tail) - min(tail)) / truth,
        "windows": {str(t): {"beta": theta[t - 1], "error": (theta[t - 1] - truth) / truth}
                    for t in WINDOWS if t <= len(theta)},
        "observed_min": min(observed), "observed_peak": max(observed),
        "observed_peak_day": 1 + max(range(len(observed)), key=observed.__getitem__),
        "observed_last": observed[-1], "observed_total": sum(observed),
    }


def load_results(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            out[rec["key"]] = rec
    return out


def series_for(args: argparse.Namespace, results: dict[str, dict[str, Any]], truth: float,
               seed: int, estimator: str, work: Path) -> tuple[Path, list[float], str]:
    """An observed series at the truth with ``seed`` (CSV path, values, where it came from)."""
    for rec in results.values():
        p = rec["point"]
        if (p["observed"] == "own" and p["truth"] == truth and p["seed"] == seed
                and p["drop"] == 0.0 and p.get("estimator", DEFAULT_ESTIMATOR) == estimator):
            values, source = rec["new_infections"], rec["key"]
            break
    else:
        out = work / f"series-{truth}-{seed}"
        summary = run_fleet_cli(args, run_beta=truth, seed=seed, out=out, estimator=estimator)
        values = summary["new_infections"]
        source = f"uncalibrated run truth={truth} seed={seed} estimator={estimator}"
    path = work / f"observed-{truth}-{seed}-{estimator}.csv"
    path.write_text("day,new_infections\n" + "".join(f"{d + 1},{v}\n"
                                                     for d, v in enumerate(values)))
    return path, list(values), source


class FleetRunFailed(RuntimeError):
    """An ``lpm fleet`` run that did not finish (its last error lines, days committed)."""

    def __init__(self, message: str, days: int, wall: float) -> None:
        super().__init__(message)
        self.days, self.wall = days, wall


def run_point(args: argparse.Namespace, point: Point, results: dict[str, dict[str, Any]],
              work: Path) -> dict[str, Any]:
    """The point's record; a run that fails is recorded as a miss with its error."""
    load0 = os.getloadavg()[0]
    try:
        return _run_point(args, point, results, work)
    except FleetRunFailed as exc:
        return {"key": point.key, "point": asdict(point), "failed": True, "error": str(exc),
                "days_completed": exc.days, "wall_seconds": round(exc.wall, 1),
                "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2)}


def _run_point(args: argparse.Namespace, point: Point, results: dict[str, dict[str, Any]],
               work: Path) -> dict[str, Any]:
    out = work / point.key.replace(":", "_").replace("=", "")
    csv, source = None, "own"
    if point.observed == "independent":
        csv, _, source = series_for(args, results, point.truth, point.seed + 1,
                                    point.estimator, work)
    summary = run_fleet_cli(args, run_beta=point.run_beta, seed=point.seed, out=out,
                            calibrate=point, observed_csv=csv, drop=point.drop,
                            estimator=point.estimator)
    theta = summary["theta_fitted"]
    observed = (summary["new_infections"] if csv is None else
                [float(r.split(",")[1]) for r in csv.read_text().splitlines()[1:]])
    shutil.rmtree(out, ignore_errors=True)
    return {"key": point.key, "point": asdict(point), "series_source": source,
            **measure(theta, point.truth, observed[:len(theta)]),
            "theta": theta, "theta_handed": summary["theta"]["beta"],
            "loss_last": summary["loss"][-1] if summary["loss"] else None,
            "new_infections": summary["new_infections"],
            "survivors_min": min(summary["survivors"]),
            "seconds_per_day_median": sorted(summary["seconds_per_day"])[
                len(summary["seconds_per_day"]) // 2],
            "wall_seconds": summary["wall_seconds"], "load_start": summary["load_start"],
            "load_end": summary["load_end"], "command": summary["command"]}


def _within(r: dict[str, Any]) -> bool:
    return not r.get("failed") and abs(r["error"]) <= TOLERANCE


def _pct(x: float) -> str:
    return f"{100 * x:+.1f} %"


def report(results: dict[str, dict[str, Any]], file: Any = None) -> None:
    """Markdown table of every point, then the summary counts."""
    for r in results.values():
        r["point"].setdefault("estimator", DEFAULT_ESTIMATOR)
    rows = sorted(results.values(), key=lambda r: (
        r["point"]["observed"], r["point"]["estimator"], r["point"]["tangents"],
        r["point"]["truth"],
        r["point"]["seed"], r["point"]["start"], r["point"]["drop"]))
    print("| observed | estimator | model | truth | start | seed | drop | final β | error | within 5 % "
          "from day | last-5 spread | fit 1..10 | fit 1..20 | fit 1..30 | new/day min · "
          "peak (day) | s/day | load |", file=file)
    print("|" + "---|" * 17, file=file)
    for r in rows:
        p = r["point"]
        if r.get("failed"):
            print(f"| {p['observed']} | {p['estimator']} | "
                  f"{'full path' if p['tangents'] else 'Eq. 11'} | {p['truth']} | {p['start']} "
                  f"| {p['seed']} | {p['drop']} | **failed** on day {r['days_completed'] + 1} "
                  f"| {r['error'][-160:]} |" + " |" * 8
                  + f" {r['load_start']:.1f}/{r['load_end']:.1f} |", file=file)
            continue
        w = r["windows"]
        print(f"| {p['observed']} | {p['estimator']} | {'full path' if p['tangents'] else 'Eq. 11'} | "
              f"{p['truth']} | {p['start']} | {p['seed']} | {p['drop']} | "
              f"{r['final_beta']:.4f} | {_pct(r['error'])} | {r['within_from_day'] or 'never'} | "
              f"{100 * r['spread_last5']:.2f} % | "
              + " | ".join(_pct(w[str(t)]["error"]) if str(t) in w else "—" for t in WINDOWS)
              + f" | {r['observed_min']:.0f} · {r['observed_peak']:.0f} "
              f"({r['observed_peak_day']}) | {r['seconds_per_day_median']:.1f} | "
              f"{r['load_start']:.1f}/{r['load_end']:.1f} |", file=file)
    groups: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for r in rows:
        p = r["point"]
        groups.setdefault((p["observed"], p["estimator"], p["tangents"]), []).append(r)
    print(file=file)
    total = sum(_within(r) for r in rows)
    print(f"final β within 5 %: {total} of {len(rows)} points", file=file)
    for (obs, est, tg), rs in sorted(groups.items()):
        ok = sum(_within(r) for r in rs)
        win = {t: sum(not r.get("failed") and str(t) in r["windows"]
                      and abs(r["windows"][str(t)]["error"]) <= TOLERANCE for r in rs)
               for t in WINDOWS}
        failed = sum(bool(r.get("failed")) for r in rs)
        done = [r for r in rs if not r.get("failed")] or rs
        worst = max(done, key=lambda r: abs(r.get("error", 0.0)))
        print(f"  {obs:11s} {est:16s} {'full path' if tg else 'Eq. 11':9s}: {ok}/{len(rs)} within 5 % "
              f"(fit on days 1..t within 5 %: "
              + ", ".join(f"t={t} {win[t]}/{len(rs)}" for t in WINDOWS)
              + f"); {failed} failed; worst finished "
              + (f"{_pct(worst['error'])} at {worst['key']}" if "error" in worst
                 and not worst.get("failed") else "none"), file=file)


def points_from(args: argparse.Namespace) -> Iterator[Point]:
    tangents = {"off": [False], "on": [True], "both": [False, True]}[args.tangents]
    yield from grid(args.truths, args.starts, args.seeds, args.drops, tangents, args.observed,
                    args.design, args.estimator)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truths", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    ap.add_argument("--starts", type=float, nargs="+", default=[0.2, 0.9])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--drops", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--tangents", choices=["off", "on", "both"], default="both")
    ap.add_argument("--observed", choices=["own", "independent"], default="own")
    ap.add_argument("--design", choices=["half", "full"], default="half")
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--population", default="oxford")
    ap.add_argument("--scale", type=float, default=0.67)
    ap.add_argument("--estimator", default=DEFAULT_ESTIMATOR,
                    help="the fleet's gradient estimator (straight_through, expected, ...)")
    ap.add_argument("--every", type=int, default=2, help="--calibrate-every")
    ap.add_argument("--steps", type=int, default=5, help="--calibrate-steps")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per fleet run")
    ap.add_argument("--max-points", type=int, default=0, help="stop after this many new runs")
    ap.add_argument("--results", type=Path, default=Path("federated_calibration_grid.jsonl"))
    ap.add_argument("--report", action="store_true", help="only print the results' table")
    args = ap.parse_args()
    results = load_results(args.results)
    if not args.report:
        todo = [p for p in points_from(args) if p.key not in results]
        print(f"{len(todo)} points to run ({len(results)} already in {args.results})",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="calgrid-") as tmp:
            for i, point in enumerate(todo[:args.max_points or None]):
                rec = run_point(args, point, results, Path(tmp))
                results[rec["key"]] = rec
                with args.results.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                what = (f"FAILED: {rec['error']}" if rec.get("failed") else
                        f"β {rec['final_beta']:.4f} ({_pct(rec['error'])}), within 5 % from "
                        f"day {rec['within_from_day']}")
                print(f"[{i + 1}/{len(todo)}] {point.key}: {what}, {rec['wall_seconds']:.0f} s, "
                      f"load {rec['load_start']}/{rec['load_end']}", flush=True)
    report(results)


if __name__ == "__main__":
    main()
