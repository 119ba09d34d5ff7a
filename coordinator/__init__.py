"""Central side. Domain modules here: ``run_config`` (what a run simulates), ``hybrid``
(synthetic population + device coupling), ``runner`` (the run loop without Flower),
``calibration`` (online federated calibration), ``fleet`` (a simulated device fleet),
``institutional`` (the MPC calibration driver), ``store`` (SQLite), ``llm_backend``.
Adapters: ``flower/`` (ServerApp, SecAgg+ report rounds), ``http/`` (FastAPI service),
``cli/`` (the `lpm` commands)."""
