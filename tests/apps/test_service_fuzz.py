"""Schema-driven fuzzing of the coordinator API (issue 14): schemathesis generates requests
from the service's own OpenAPI schema (valid and invalid: wrong types, NaN, huge numbers,
odd strings) and sends them, with and without the write token, to a real uvicorn server on
127.0.0.1. Target: ≥ 5,000 requests, no 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
import requests  # noqa: E402  (schemathesis depends on it)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from coordinator.http.service import create_app  # noqa: E402
from coordinator.store import CoordinatorStore  # noqa: E402

TOKEN = "fuzz-token-" + "z" * 24
PER_OPERATION = 320  # × 2 (token or not) × 2 (valid / invalid) × operations ≥ 5,000


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_openapi_fuzz_no_server_errors(tmp_path, serving):
    store = CoordinatorStore(tmp_path / "c.db")
    rid = store.create_run({"population": "tiny", "days": 3}, days=3)
    for d in (1, 2):
        store.commit_round(rid, d, {"S": 990 - d, "I": 10 + d, "R": 0, "exposure": {"a": 0.1}})
    store.set_calibration(rid, {"beta": 0.4})
    store.put_bundle(b"LPMBNDL\x01bundle", "1")
    app = create_app(store, TOKEN, execute=False)
    schema = schemathesis.openapi.from_dict(app.openapi())
    sent: list[int] = []
    errors: list[str] = []
    session = requests.Session()
    with serving(app, log_level="critical") as (url, _):
        for result in schema.get_all_operations():
            operation = result.ok()
            for auth in (True, False):
                for mode in GenerationMode:  # schema-valid and schema-violating requests
                    _fuzz_operation(operation.as_strategy(generation_mode=mode), url, session,
                                    rid, auth, sent, errors)
    print(f"fuzz: {len(sent)} requests, {sum(s >= 500 for s in sent)} 5xx, "
          f"statuses {sorted(set(sent))}")
    assert len(sent) >= 5000
    assert not errors, errors[:10]


def _fuzz_operation(strategy, url, session, rid, auth, sent, errors) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}

    @settings(max_examples=PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case) -> None:
        if case.path_parameters and "run_id" in case.path_parameters \
                and len(sent) % 3 == 0:
            case.path_parameters["run_id"] = rid  # reach the deep paths too
        response = case.call(base_url=url, session=session, headers=headers,
                             timeout=30)
        sent.append(response.status_code)
        if response.status_code >= 500:
            errors.append(f"{response.status_code} {case.method} "
                          f"{case.formatted_path} {case.query} {case.body!r}"[:300])

    try:
        fuzz()
    except Unsatisfiable:  # nothing schema-violating exists for an operation without inputs
        pass
