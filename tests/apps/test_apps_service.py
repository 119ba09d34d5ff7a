"""Coordinator HTTP service against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import time

import httpx
import pytest

from coordinator.http.service import create_app
from coordinator.store import CoordinatorStore

TOKEN = "t" * 32


@pytest.fixture()
def server(tmp_path, serving):
    store = CoordinatorStore(tmp_path / "c.db")
    with serving(create_app(store, TOKEN)) as (url, _):
        yield url, store


def test_service_end_to_end(server):
    url, store = server
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        body = {"population": "tiny", "days": 4, "devices": 20, "seed": 2,
                "initial_infected": 0.05}
        assert c.post("/runs", json=body).status_code == 401
        assert c.post("/runs", json=body, headers={"Authorization": "Bearer wrong"}
                      ).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.post("/runs", json={**body, "days": 0}, headers=auth).status_code == 422
        assert c.post("/runs", json={**body, "population": "mars"}, headers=auth
                      ).status_code == 422
        r = c.post("/runs", json=body, headers=auth)
        assert r.status_code == 201
        rid = r.json()["id"]
        deadline = time.time() + 60
        while (st := c.get(f"/runs/{rid}").json())["status"] != "completed":
            assert st["status"] in ("pending", "running") and time.time() < deadline, st
            time.sleep(0.2)
        assert st["progress"] == 1.0 and st["completed_days"] == 4
        assert [x["id"] for x in c.get("/runs").json()] == [rid]
        series = c.get(f"/runs/{rid}/series").json()["series"]
        assert [row["day"] for row in series] == [1, 2, 3, 4]
        assert series == store.series(rid)
        assert all(row["S"] + row["I"] + row["R"] == 1000 for row in series)
        csv_text = c.get(f"/runs/{rid}/series", params={"format": "csv"}).text
        assert csv_text.splitlines()[0].startswith("day,S,I,R,new_infections")
        assert len(csv_text.splitlines()) == 5
        assert c.get(f"/runs/{rid}/series", params={"format": "xml"}).status_code == 422
        png = c.get(f"/runs/{rid}/plot.png")
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
        assert c.get(f"/runs/{rid}/calibration").status_code == 404
        store.set_calibration(rid, {"beta": 0.42})
        assert c.get(f"/runs/{rid}/calibration").json() == {"beta": 0.42}
        assert c.get("/runs/nope").status_code == 404
        assert c.get("/bundle").status_code == 404
        store.put_bundle(b"LPMBNDL\x01xyz", "3")
        b = c.get("/bundle")
        assert b.content == b"LPMBNDL\x01xyz" and b.headers["x-model-version"] == "3"
        exp = c.get("/exposure").json()
        assert exp["day"] == 4 and exp["prevalence"] == series[-1]["exposure"]
        metrics = c.get("/metrics").text
        assert 'lpm_http_requests_total{path="/runs/{run_id}",status="200"}' in metrics
        assert "/runs/{run_id}/series" in c.get("/openapi.json").json()["paths"]
