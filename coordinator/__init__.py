"""Central side: Flower ServerApp, central simulation runner, hybrid coupling,
FastAPI service and persistent store (SQLite by default)."""
