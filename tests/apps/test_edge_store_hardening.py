"""Edge store hardening (issue 14): files 0600, nothing private in the clear, wrong
passphrase detected at open, damaged stores refused, project exceptions only."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from edge_agent.store import EdgeStore, EdgeStoreError, WrongPassphraseError

PW = "correct horse battery"


def _fill(path):
    with EdgeStore(path, PW) as st:
        st.put_private_key("run7/nb_key", b"K" * 32)
        st.set_contacts({"handle-alice-0123": 0.75, "handle-bob-4567": 2.5})
        st.set_status("run", {"run_id": "run7", "day": 3, "S": 0.0, "I": 1.0, "R": 0.0,
                              "risk": 0.123456})
        for _ in range(30):  # enough writes that the WAL holds data
            st.set_status("tick", {"n": 1})
        # files as they are while the store is open (db, -wal, -shm)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode)
                 for p in path.parent.iterdir() if p.name.startswith(path.name)}
        raw = b"".join(p.read_bytes() for p in path.parent.iterdir()
                       if p.name.startswith(path.name))
    return modes, raw


def test_files_0600_and_no_private_plaintext(tmp_path):
    old = os.umask(0o022)
    try:
        modes, raw = _fill(tmp_path / "dev.db")
    finally:
        os.umask(old)
    assert set(modes) >= {"dev.db", "dev.db-wal", "dev.db-shm"}, modes
    assert all(m == 0o600 for m in modes.values()), modes
    for needle in (b"handle-alice", b"handle-bob", b"0.75", b"run7", b"0.123456", b"risk",
                   b"nb_key", b"K" * 32, b'"I"'):
        assert needle not in raw, needle
    tables = {r[0] for r in sqlite3.connect(tmp_path / "dev.db").execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"meta", "sealed"}


def test_wrong_passphrase_detected_at_open_and_nothing_written(tmp_path):
    path = tmp_path / "dev.db"
    _fill(path)
    before = sqlite3.connect(path).execute("SELECT COUNT(*) FROM sealed").fetchone()[0]
    with pytest.raises(WrongPassphraseError):
        EdgeStore(path, "another long passphrase")
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM sealed").fetchone()[0] == before
    with EdgeStore(path, PW) as st:
        assert st.get_private_key("run7/nb_key") == b"K" * 32


def test_deleted_salt_or_verifier_is_an_error_not_a_new_key(tmp_path):
    path = tmp_path / "dev.db"
    _fill(path)
    for k in ("salt", "verifier"):
        con = sqlite3.connect(path)
        saved = con.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()[0]
        con.execute("DELETE FROM meta WHERE k = ?", (k,))
        con.commit()
        with pytest.raises(EdgeStoreError, match=f"{k} missing"):
            EdgeStore(path, PW)
        con.execute("INSERT INTO meta VALUES (?, ?)", (k, saved))
        con.commit()
        con.close()
    with EdgeStore(path, PW) as st:  # restored: the old keys still open
        assert st.contacts()["handle-bob-4567"] == 2.5


def test_short_passphrase_refused_for_a_new_store(tmp_path):
    with pytest.raises(EdgeStoreError, match="at least"):
        EdgeStore(tmp_path / "dev.db", "x")


def test_truncated_or_garbage_file_is_edge_store_error(tmp_path):
    path = tmp_path / "dev.db"
    with EdgeStore(path, PW) as st:
        for i in range(200):
            st.set_status(f"k{i}", "v" * 500)
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 3)
    with pytest.raises(EdgeStoreError):
        with EdgeStore(path, PW) as st:
            for i in range(200):
                st.status(f"k{i}")
    garbage = tmp_path / "g.db"
    garbage.write_bytes(b"not sqlite at all" * 64)
    with pytest.raises(EdgeStoreError, match="g.db"):
        EdgeStore(garbage, PW)
    with pytest.raises(EdgeStoreError):
        EdgeStore(tmp_path / "no" / "such" / "dir.db", PW)


def test_rows_cannot_be_swapped(tmp_path):
    path = tmp_path / "dev.db"
    with EdgeStore(path, PW) as st:
        st.put_private_key("a", b"A" * 32)
        st.put_private_key("b", b"B" * 32)
        ida, idb = st._id("key", "a"), st._id("key", "b")
    con = sqlite3.connect(path)
    rows = dict(((i, (n, c)) for i, n, c in con.execute("SELECT id, nonce, ct FROM sealed")))
    con.execute("UPDATE sealed SET nonce = ?, ct = ? WHERE id = ?", (*rows[idb], ida))
    con.commit()
    with EdgeStore(path, PW) as st, pytest.raises(WrongPassphraseError):
        st.get_private_key("a")


def test_reopen_uses_cached_key(tmp_path, monkeypatch):
    """Opening once per message is cheap: scrypt runs once per (salt, passphrase)."""
    import edge_agent.store as es

    calls = []

    real = es.Scrypt

    def counting_scrypt(**kw):  # the real KDF, counted
        calls.append(1)
        return real(**kw)

    monkeypatch.setattr(es, "Scrypt", counting_scrypt)
    path = tmp_path / "dev.db"
    EdgeStore(path, PW).close()
    for _ in range(5):
        with EdgeStore(path, PW) as st:
            st.set_status("x", 1)
    assert len(calls) == 1
    with pytest.raises(WrongPassphraseError):
        EdgeStore(path, PW + "!")
    assert len(calls) == 2
