"""The SQLite ledger: WAL, schema, one transaction per change, uniqueness that blocks double counts."""
from __future__ import annotations

import sqlite3

import pytest

from coordinator.ledger import SCHEMA_VERSION, Ledger, LedgerError


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite3", create=True)
    yield led
    led.close()


def test_missing_ledger_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="autoresearch-coord init"):
        Ledger(tmp_path / "nope.sqlite3")


def test_wal_and_schema(ledger):
    assert ledger.scalar("PRAGMA journal_mode") == "wal"
    tables = {r[0] for r in ledger.all("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"meta", "candidates", "attempts", "workers", "decisions", "head"} <= tables
    assert ledger.get_meta("schema_version") == SCHEMA_VERSION


def test_meta_roundtrip_and_reopen(tmp_path, ledger):
    with ledger.tx():
        ledger.set_meta("settings", {"seq_len": 256, "margin": 0.0})
        ledger.set_meta("settings", {"seq_len": 512, "margin": 0.0})
    ledger.close()
    again = Ledger(tmp_path / "ledger.sqlite3")
    try:
        assert again.get_meta("settings") == {"seq_len": 512, "margin": 0.0}
        assert again.get_meta("absent", "dflt") == "dflt"
    finally:
        again.close()


def test_a_failed_transaction_leaves_nothing(ledger):
    with pytest.raises(RuntimeError):
        with ledger.tx() as db:
            db.execute("INSERT INTO candidates(id, description, sha256, train_py, state, "
                       "created_at, updated_at) VALUES (1, 'x', 'h', 't', 'queued', 0, 0)")
            raise RuntimeError("crash mid-change")
    assert ledger.scalar("SELECT COUNT(*) FROM candidates") == 0
    # Nested blocks belong to the outer transaction.
    with ledger.tx():
        with ledger.tx() as db:
            db.execute("INSERT INTO candidates(id, description, sha256, train_py, state, "
                       "created_at, updated_at) VALUES (1, 'x', 'h', 't', 'queued', 0, 0)")
    assert ledger.scalar("SELECT COUNT(*) FROM candidates") == 1


def test_one_decision_per_candidate_and_unique_texts(ledger):
    with ledger.tx() as db:
        db.execute("INSERT INTO candidates(id, description, sha256, train_py, state, created_at,"
                   " updated_at) VALUES (1, 'x', 'h', 't', 'kept', 0, 0)")
        db.execute("INSERT INTO decisions(candidate_id, verdict, head_after, reason, attempt_ids,"
                   " decided_at) VALUES (1, 'kept', 'abc', 'r', '[]', 0)")
    with pytest.raises(sqlite3.IntegrityError):
        with ledger.tx() as db:
            db.execute("INSERT INTO decisions(candidate_id, verdict, head_after, reason, "
                       "attempt_ids, decided_at) VALUES (1, 'discarded', 'abc', 'r', '[]', 0)")
    with pytest.raises(sqlite3.IntegrityError):
        with ledger.tx() as db:
            db.execute("INSERT INTO candidates(id, description, sha256, train_py, state, "
                       "created_at, updated_at) VALUES (2, 'y', 'h', 't', 'queued', 0, 0)")
    with pytest.raises(sqlite3.IntegrityError):  # verdicts are a closed set
        with ledger.tx() as db:
            db.execute("INSERT INTO candidates(id, description, sha256, train_py, state, "
                       "created_at, updated_at) VALUES (3, 'z', 'h3', 't', 'kept', 0, 0)")
            db.execute("INSERT INTO decisions(candidate_id, verdict, head_after, reason, "
                       "attempt_ids, decided_at) VALUES (3, 'maybe', 'abc', 'r', '[]', 0)")


def test_other_schema_version_is_refused(tmp_path, ledger):
    with ledger.tx():
        ledger.set_meta("schema_version", SCHEMA_VERSION + 1)
    ledger.close()
    with pytest.raises(LedgerError, match="schema"):
        Ledger(tmp_path / "ledger.sqlite3")


def test_head_missing_is_an_error(ledger):
    with pytest.raises(LedgerError, match="no head"):
        ledger.head()
