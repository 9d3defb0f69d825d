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


# ---- refusing a ledger that cannot be used (issue 9, item 4) --------------------------------

def _sound_ledger(tmp_path):
    from coordinator.repo import init_repo

    repo = tmp_path / "run"
    init_repo(repo, tag="t", preset="tiny", train_py="print('baseline')\n")
    return repo, repo / ".autoresearch" / "ledger.sqlite3"


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


def _damage(path):
    """Overwrite the middle of the file (past page 1, which holds the header and schema), so
    the header is fine but the b-tree pages are garbage."""
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    assert len(data) >= 3 * page
    data[page: len(data) - page // 2] = bytes([0xA5]) * (len(data) - page - page // 2)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case, words", [
    ("empty", "is empty (0 bytes"),
    ("not_sqlite", "is not an SQLite database"),
    ("damaged", "is damaged (quick_check"),
    ("foreign", "not an autoresearch ledger (no table"),
])
def test_unusable_ledger_is_refused_in_one_line_and_left_untouched(tmp_path, case, words):
    from coordinator.ledger import LedgerRefused, check_ledger

    _, path = _sound_ledger(tmp_path)
    if case == "empty":
        path.write_bytes(b"")
    elif case == "not_sqlite":
        path.write_text("these are not the rows you are looking for\n" * 20)
    elif case == "damaged":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE filler(x)")
        db.executemany("INSERT INTO filler VALUES (?)", [("x" * 500,)] * 400)
        db.commit()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        _damage(path)
    else:
        path.unlink()
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE recipes(name)")
        db.commit()
        db.close()
    before = _snapshot(path)
    for opener in (lambda: check_ledger(path), lambda: Ledger(path)):
        with pytest.raises(LedgerRefused) as err:
            opener()
        message = str(err.value)
        assert words in message and str(path) in message, message
        assert "\n" not in message
        assert "backup" in message   # the remedy
    assert _snapshot(path) == before   # never written to: the evidence stays as it was


def test_locked_ledger_is_refused_after_the_busy_timeout(tmp_path):
    """Another process holds the write lock (BEGIN IMMEDIATE) past the busy timeout."""
    from coordinator.ledger import LedgerRefused
    from serving import write_locked

    _, path = _sound_ledger(tmp_path)
    with write_locked(path):
        with pytest.raises(LedgerRefused, match=r"is locked by another process") as err:
            Ledger(path, busy_timeout=0.2)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    Ledger(path, busy_timeout=0.2).close()   # released: opens again


def test_sound_ledger_after_a_killed_writer_opens(tmp_path):
    """A writer killed mid-transaction leaves a hot WAL: that is a sound ledger, not refused."""
    import signal
    import subprocess
    import sys

    _, path = _sound_ledger(tmp_path)
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, time\n"
         f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
         "c.execute(\"INSERT INTO meta VALUES ('committed', '1')\")\n"
         "c.execute('BEGIN IMMEDIATE')\n"
         "c.execute(\"INSERT INTO meta VALUES ('uncommitted', '1')\")\n"
         "print('mid', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "mid"
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    led = Ledger(path, busy_timeout=0.5)
    try:
        assert led.get_meta("committed") == 1 and led.get_meta("uncommitted") is None
    finally:
        led.close()


def test_start_refuses_an_empty_ledger_without_traceback(tmp_path, prepared_sample):
    """The CLI as a person runs it: exit 1, one line naming the file and the remedy."""
    import subprocess
    import sys

    repo, path = _sound_ledger(tmp_path)
    path.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-m", "coordinator.cli", "start", str(repo),
                        "--bind", "tcp://127.0.0.1:0", "--data", str(prepared_sample)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "is empty" in lines[0], r.stderr
    assert path.stat().st_size == 0   # not rewritten into an empty database
    # The trust commands open the same file: refused the same way.
    r = subprocess.run([sys.executable, "-m", "coordinator.cli", "keys", "--dir", str(repo)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is empty" in r.stderr and "Traceback" not in r.stderr, r
    assert path.stat().st_size == 0


def test_checking_a_ledger_this_process_has_open_keeps_it_sound(tmp_path):
    """The coordinator opens its trust list (check_ledger) while its own Ledger is open. A
    check that opened and closed the file outside SQLite would drop this process's locks, and
    another process closing its connection would then take itself for the last one and
    remove the WAL under us: "database disk image is malformed"."""
    import subprocess
    import sys

    from coordinator.ledger import check_ledger

    _, path = _sound_ledger(tmp_path)
    led = Ledger(path)
    try:
        with led.tx():
            for i in range(50):
                led.set_meta(f"k{i}", "x" * 2000)   # pages in the WAL, not yet checkpointed
        check_ledger(path)
        # Another process (an admin's `autoresearch-coord trust`) checks, writes and closes.
        subprocess.run([sys.executable, "-c",
                        "import sqlite3\n"
                        "from coordinator.ledger import check_ledger\n"
                        f"check_ledger({str(path)!r})\n"
                        f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
                        "c.execute(\"INSERT INTO meta VALUES ('other', '2')\")\n"
                        "c.close()\n"], check=True, timeout=60)
        for i in range(50):
            with led.tx():
                led.set_meta(f"after{i}", "y" * 2000)
        assert led.get_meta("k49") == "x" * 2000 and led.get_meta("other") == 2
        assert led.scalar("PRAGMA quick_check") == "ok"
    finally:
        led.close()
