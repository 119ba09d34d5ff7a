"""`lpm demo`: the whole story in a few minutes on a laptop.

A synthetic city (~100k agents) with 50 simulated devices (real ClientApps in a device-host
process) runs a secure neighbourhood round and a SecAgg+ report round every day; the
coordinator calibrates β online from the synthetic agents (autograd) and the devices'
securely aggregated ∂p/∂β — it never simulates or holds a device's state — exports a signed
ONNX bundle with the fitted β, serves everything over HTTP, and a device verifies the bundle
and ranks behaviour options with it. Imports only coordinator/simulation/protocols/
mobile_export (the device host is started by module name).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from coordinator.calibration import CalibrationSettings
from coordinator.fleet import run_fleet
from coordinator.flower.server_app import FederatedSettings
from coordinator.http.service import create_app
from coordinator.runner import RunConfig
from coordinator.store import CoordinatorStore
from simulation.distributed.launch import free_port

__all__ = ["run_demo", "serve_in_thread"]


def serve_in_thread(app, port: int = 0):
    """Start uvicorn on 127.0.0.1 in a daemon thread; returns (server, base_url)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the HTTP service did not start")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def run_demo(out_dir: Path, *, devices: int = 50, days: int = 20, scale: float = 0.67,
             seed: int = 0, calibration_steps: int = 5, beta_init: float = 0.3,
             console: Console | None = None) -> dict:
    """Run the demo; writes the store, bundle and PNG under ``out_dir``; returns a summary."""
    import httpx

    from mobile_export.bundle import build_bundle, verify_bundle_bytes
    from mobile_export.runtime import load_verified_bundle
    from mobile_export.schema import Theta
    from protocols.keys import IdentityKey

    console = console or Console()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cfg = RunConfig(population="oxford", scale=scale, days=days, seed=seed, devices=devices,
                    beta=0.5, gamma=0.1, initial_infected=0.01)
    store = CoordinatorStore(out_dir / "coordinator.db")
    run_id = store.create_run(cfg.to_dict(), cfg.days)
    token = secrets.token_urlsafe(24)
    server, url = serve_in_thread(create_app(store, token, execute=False))
    console.rule("[bold]lpm-edge demo")
    console.print(f"1. Coordinator HTTP service on {url} (OpenAPI at {url}/docs); run {run_id}.")
    console.print(f"2. Synthetic city: preset 'oxford' × {scale} (~{int(150_000 * scale):,} "
                  f"agents); {devices} of them are devices (real ClientApps in their own "
                  "process). Each day: the coordinator steps the synthetic agents; devices run "
                  "the assisted secure neighbourhood sum (sealed, masked envelopes relayed by "
                  "the coordinator), compute their risk p_i and ∂p_i/∂β at the current θ, update "
                  "their status with randomness that never leaves them, and send their report "
                  "through SecAgg+, so the coordinator learns only totals. Every 2 days the "
                  f"coordinator updates β (start {beta_init}) from the reported counts: "
                  "∂L/∂β = autograd through the synthetic agents + the devices' Σ∂p/∂β.")
    store.set_status(run_id, "running")
    t_fleet = time.perf_counter()
    day_times: list[float] = []

    def on_day(day: int, row: dict) -> None:
        day_times.append(time.perf_counter())
        console.print(f"   day {day:2d}: infected {int(row['I']):6d}, new "
                      f"{int(row['new_infections']):5d} | devices: {row['survivors']} reported, "
                      f"infected {row['physical_I']}, Σ∂p/∂β {row['physical_dp_dbeta']:.3f} | "
                      f"β {row['theta_beta']:.4f}, loss {row['loss']:.4f}")

    settings = FederatedSettings(calibration=CalibrationSettings(
        beta_init=beta_init, every=2, steps=calibration_steps))
    rows = run_fleet(cfg, settings=settings, store=store, run_id=run_id, on_day=on_day)
    store.set_status(run_id, "completed")
    fleet_s = time.perf_counter() - t_fleet
    per_day = (day_times[-1] - day_times[0]) / max(len(day_times) - 1, 1)
    console.print(f"   federated run: {fleet_s:.1f} s including start-up; ≈{per_day:.2f} s per "
                  "simulated day.")
    console.print("3. Calibration happened during the run (no central re-simulation of the "
                  "devices): β per day above, also served at GET /runs/{id}/series "
                  "(theta_beta, loss) and /calibration.")
    beta_fitted = float(cast(float, rows[-1]["theta_beta"]))
    calib = {"beta_start": beta_init, "beta_fitted": beta_fitted,
             "beta_true": cfg.beta, "theta_beta_per_day": [r["theta_beta"] for r in rows],
             "loss_per_day": [r["loss"] for r in rows],
             "grad_synthetic_per_day": [r["grad_synthetic"] for r in rows],
             "grad_devices_per_day": [r["grad_devices"] for r in rows]}
    store.set_calibration(run_id, calib)

    console.print("4. Model bundle: export the personal forecast model to ONNX with the fitted β, "
                  "sign it (Ed25519), publish it at /bundle.")
    key = IdentityKey.generate()
    bundle_path = build_bundle(None, key, out_dir / "model.lpmb",
                               theta=Theta(beta=beta_fitted),
                               model_version=run_id)
    store.put_bundle(bundle_path.read_bytes(), run_id)

    with httpx.Client(base_url=url, timeout=30) as http:
        blob = http.get("/bundle").content
        verify_bundle_bytes(blob, key.public_bytes())
        console.print(f"   a device downloaded {len(blob):,} bytes from /bundle and verified the "
                      f"signature against the coordinator's key {key.public_bytes().hex()[:16]}…")
        device_copy = out_dir / "device-copy.lpmb"
        device_copy.write_bytes(blob)
        exposure = http.get("/exposure").json()
        series = http.get(f"/runs/{run_id}/series").json()["series"]
        csv_text = http.get(f"/runs/{run_id}/series", params={"format": "csv"}).text
        png = http.get(f"/runs/{run_id}/plot.png").content
        status = http.get(f"/runs/{run_id}").json()
    (out_dir / "series.png").write_bytes(png)
    (out_dir / "series.csv").write_text(csv_text)

    prevalence = float(np.mean(list(exposure["prevalence"].values())))
    session = load_verified_bundle(device_copy, key.public_bytes())
    options = [("as usual", (3, 8, 6), 0.0, 0.0), ("wear a mask", (3, 8, 6), 0.0, 0.5),
               ("work from home", (3, 0, 6), 0.0, 0.0), ("self-isolate", (3, 8, 6), 1.0, 0.0)]
    res = session.run(np.array([1.0, 1.0, 17.0], np.float32),
                      np.array([o[1] for o in options], np.float32),
                      np.array([o[2] for o in options], np.float32),
                      np.array([o[3] for o in options], np.float32),
                      np.full((7, len(session.layers)), prevalence, np.float32))
    console.print(f"5. Device forecast with the verified bundle (public prevalence "
                  f"{prevalence:.4f} from /exposure, 7 days):")
    table = Table()
    for col in ("option", "7-day risk", "∂risk/∂β"):
        table.add_column(col)
    for k in res.ranking():
        table.add_row(options[k][0], f"{float(res.risk[k]):.4f}", f"{float(res.drisk_dbeta[k]):.4f}")
    console.print(table)

    console.print(f"6. Results through the HTTP API: GET {url}/runs/{run_id} → status "
                  f"{status['status']}, progress {status['progress']:.0%}; "
                  f"GET /runs/{run_id}/series:")
    table = Table()
    for col in ("day", "S", "I", "R", "new", "device I", "Σ∂p/∂β (devices)", "β", "loss"):
        table.add_column(col, justify="right")
    for r in series:
        table.add_row(str(r["day"]), f"{int(r['S'])}", f"{int(r['I'])}", f"{int(r['R'])}",
                      f"{int(r['new_infections'])}", f"{int(r['physical_I'])}",
                      f"{r['physical_dp_dbeta']:.3f}", f"{r['theta_beta']:.4f}",
                      f"{r['loss']:.4f}")
    console.print(table)
    total = time.perf_counter() - t0
    console.print(f"Federated calibration: β {calib['beta_fitted']:.4f} (start {beta_init}, "
                  f"true {cfg.beta}) after {len(rows)} days.")
    console.print(f"Files in {out_dir}: series.png, series.csv, model.lpmb, coordinator.db. "
                  f"Demo finished in {total:.0f} s.")
    server.should_exit = True
    return {"run_id": run_id, "seconds": total, "per_day_seconds": per_day,
            "beta_fitted": calib["beta_fitted"], "rows": len(series)}
