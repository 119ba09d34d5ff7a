"""Coordinator and edge-agent stores: ordering, atomic resume, encryption at rest."""

from __future__ import annotations

import sqlite3

import pytest

from coordinator.store import CoordinatorStore, RoundOrderError, RunNotFoundError
from edge_agent.store import EdgeStore, EdgeStoreError, WrongPassphraseError, pseudonym


def test_runs_rounds_resume(tmp_path):
    st = CoordinatorStore(tmp_path / "c.db")
    rid = st.create_run({"population": "tiny"}, days=3)
    assert st.resume(rid) is None
    st.set_status(rid, "running")
    st.commit_round(rid, 1, {"I": 5}, state=b"s1")
    with pytest.raises(RoundOrderError):
        st.commit_round(rid, 3, {"I": 7}, state=b"s3")
    st.commit_round(rid, 2, {"I": 6}, state=b"s2")
    with pytest.raises(RoundOrderError):
        st.commit_round(rid, 2, {"I": 6}, state=b"s2")
    st.close()
    st2 = CoordinatorStore(tmp_path / "c.db")  # reopened: nothing lost
    rp = st2.resume(rid)
    assert (rp.day, rp.state) == (2, b"s2")
    assert st2.series(rid) == [{"day": 1, "I": 5}, {"day": 2, "I": 6}]
    rec = st2.get_run(rid)
    assert rec.status == "running" and rec.completed_days == 2 and rec.progress == pytest.approx(2 / 3)
    assert [r.id for r in st2.list_runs()] == [rid]
    with pytest.raises(RunNotFoundError):
        st2.get_run("nope")
    assert sqlite3.connect(tmp_path / "c.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_failed_round_commit_is_atomic(tmp_path):
    st = CoordinatorStore(tmp_path / "c.db")
    rid = st.create_run({}, days=2)
    with pytest.raises((sqlite3.Error, TypeError)):
        st.commit_round(rid, 1, {"x": 1}, state=object())  # bad state type: whole tx rolls back
    assert st.series(rid) == [] and st.resume(rid) is None


def test_bundles_and_calibration(tmp_path):
    st = CoordinatorStore(tmp_path / "c.db")
    assert st.latest_bundle() is None
    st.put_bundle(b"a", "1")
    st.put_bundle(b"bb", "2")
    assert st.latest_bundle() == ("2", b"bb")
    rid = st.create_run({}, days=1)
    st.set_calibration(rid, {"beta": 0.4})
    assert st.calibration(rid) == {"beta": 0.4}


def test_edge_store_keys_encrypted(tmp_path, monkeypatch):
    path = tmp_path / "e.db"
    st = EdgeStore(path, "correct horse")
    secret = bytes(range(32))
    st.put_private_key("x25519", secret)
    h = pseudonym(b"k" * 32, "alice")
    st.set_contacts({h: 1.0, "bob": 0.5})
    st.set_status("infected", False)
    st.close()
    assert secret not in path.read_bytes()
    monkeypatch.setenv("LPM_EDGE_PASSPHRASE", "correct horse")
    st2 = EdgeStore(path)
    assert st2.get_private_key("x25519") == secret
    assert st2.contacts() == {h: 1.0, "bob": 0.5} and st2.status("infected") is False
    st2.close()
    with pytest.raises(WrongPassphraseError):
        EdgeStore(path, "wrong passphrase")
    with pytest.raises(WrongPassphraseError):
        EdgeStore(path, "wrong")  # short and wrong: still the passphrase error
    with EdgeStore(path, "correct horse") as st3, pytest.raises(KeyError):
        st3.get_private_key("other")
    with EdgeStore(path, "correct horse") as st3, pytest.raises(EdgeStoreError):
        st3.set_contacts({"c": -1.0})
    monkeypatch.delenv("LPM_EDGE_PASSPHRASE")
    with pytest.raises(EdgeStoreError):
        EdgeStore(path)


def test_running_block_marks_completed_failed_or_leaves_a_taken_over_run(tmp_path):
    from coordinator.store import LeaseHeldError

    store = CoordinatorStore(tmp_path / "c.db")
    ok, bad, taken = (store.create_run({}, 3) for _ in range(3))
    with store.running(ok):
        assert store.get_run(ok).status == "running"
    assert store.get_run(ok).status == "completed"

    store.acquire_lease(bad, "me", "coordinator", 60)
    with pytest.raises(ValueError, match="boom"), store.running(bad, "me"):
        raise ValueError("boom")
    rec = store.get_run(bad)
    assert rec.status == "failed" and rec.error == "ValueError: boom"
    assert store.lease(bad) is None  # released

    store.acquire_lease(taken, "me", "coordinator", 60)
    with pytest.raises(LeaseHeldError), store.running(taken, "me"):
        raise LeaseHeldError("another runner owns it")
    assert store.get_run(taken).status == "running" and store.lease(taken) is not None
