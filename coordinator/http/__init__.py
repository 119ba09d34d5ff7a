"""The coordinator's HTTP service (FastAPI): runs, series, exposure, plots, bundles, metrics."""
