"""Shared pytest set-up: quiet telemetry, one torch thread (2-core CI machines)."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

torch.set_num_threads(1)
