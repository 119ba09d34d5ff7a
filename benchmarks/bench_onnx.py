"""On-device forecast: onnxruntime (.ort and .onnx) vs torch eager, in one run.

Measures per-query latency (p50/p99) for a 7-day, 8-option query in expected-value mode and
in Monte Carlo mode, bundle load time (verify + session creation), and .onnx/.ort/bundle sizes,
against the issue-7 targets (≤ 1 ms per query, ≤ 50 kB bundle, ≤ 5 ms load). One thread
everywhere. Run: ``.venv/bin/python benchmarks/bench_onnx.py [--queries N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mobile_export.bundle import build_bundle
from mobile_export.export import export_artifacts
from mobile_export.model import INPUT_NAMES, PersonalForecast, Theta, example_inputs
from mobile_export.runtime import load_verified_bundle


def _times(fn: Callable[[], object], n: int, warmup: int = 50) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - start
    return out * 1e3  # ms


def _session(model: bytes, fmt: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.load_model_format", fmt)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--loads", type=int, default=100)
    parser.add_argument("--samples", type=int, default=100, help="Monte Carlo samples")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    artifacts = export_artifacts()
    export_s = time.perf_counter() - start
    key = Ed25519PrivateKey.generate()
    tmp = Path(tempfile.mkdtemp(prefix="lpm-bench-onnx-"))
    bundle = build_bundle(Theta(), key, tmp / "forecast.lpmb")

    model = PersonalForecast().eval()
    rows: dict[str, dict[str, float]] = {}
    for mode, samples in (("expected", 0), (f"mc{args.samples}", args.samples)):
        inputs = example_inputs(7, 8, samples, seed=1)
        feeds = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs, strict=True)}
        sessions = {"ort": _session(artifacts.ort, "ORT"), "onnx": _session(artifacts.onnx, "ONNX")}
        verified = load_verified_bundle(bundle, key.public_key())
        np_inputs = [t.numpy() for t in inputs]

        def eager(inputs: tuple[torch.Tensor, ...] = inputs) -> object:
            with torch.no_grad():
                return model(*inputs)

        candidates: dict[str, Callable[[], object]] = {
            "torch eager": eager,
            "onnxruntime .onnx": lambda s=sessions["onnx"], f=feeds: s.run(None, f),
            "onnxruntime .ort": lambda s=sessions["ort"], f=feeds: s.run(None, f),
            "ForecastSession.run (.ort + input checks)": lambda v=verified, a=np_inputs, m=samples: (
                v.run(*a[:5], uniforms=a[6] if m else None)
            ),
        }
        for name, fn in candidates.items():
            t = _times(fn, args.queries)
            rows[f"{mode} | {name}"] = {
                "p50_ms": float(np.median(t)),
                "p99_ms": float(np.percentile(t, 99)),
            }

    loads = {
        "load_verified_bundle (read+verify+session)": lambda: load_verified_bundle(
            bundle, key.public_key()
        ),
        "session from .ort bytes": lambda: _session(artifacts.ort, "ORT"),
        "session from .onnx bytes": lambda: _session(artifacts.onnx, "ONNX"),
    }
    load_rows = {}
    for name, fn in loads.items():
        t = _times(fn, args.loads, warmup=3)
        load_rows[name] = {"p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99))}

    sizes = {
        ".onnx bytes": len(artifacts.onnx),
        ".ort bytes": len(artifacts.ort),
        "bundle bytes": bundle.stat().st_size,
    }

    print(f"export (dynamo + .ort conversion): {export_s:.1f} s; opset {artifacts.opset}")
    print(f"{'query: 7 days x 8 options':58s} {'p50 ms':>9s} {'p99 ms':>9s} {'eager/x':>8s}")
    for mode in ("expected", f"mc{args.samples}"):
        eager_p50 = rows[f"{mode} | torch eager"]["p50_ms"]
        for key_name, row in rows.items():
            if key_name.startswith(mode + " |"):
                ratio = eager_p50 / row["p50_ms"]
                print(f"{key_name:58s} {row['p50_ms']:9.4f} {row['p99_ms']:9.4f} {ratio:7.1f}x")
    print(f"{'load':58s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for name, row in load_rows.items():
        print(f"{name:58s} {row['p50_ms']:9.3f} {row['p99_ms']:9.3f}")
    for name, size in sizes.items():
        print(f"{name:58s} {size:9d}")
    best = rows["expected | ForecastSession.run (.ort + input checks)"]["p50_ms"]
    load = load_rows["load_verified_bundle (read+verify+session)"]["p50_ms"]
    print(
        "targets: query p50 {:.3f} ms (≤ 1 ms: {}), bundle {} B (≤ 50 kB: {}), load p50 {:.2f} ms "
        "(≤ 5 ms: {})".format(
            best,
            "met" if best <= 1 else "MISSED",
            sizes["bundle bytes"],
            "met" if sizes["bundle bytes"] <= 50_000 else "MISSED",
            load,
            "met" if load <= 5 else "MISSED",
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"queries": rows, "loads": load_rows, "sizes": sizes, "export_s": export_s},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
