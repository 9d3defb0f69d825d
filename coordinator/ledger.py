"""The ledger: the run's truth, in SQLite (WAL) at ``DIR/.autoresearch/ledger.sqlite3``.

The git branch is derived from this file and reconciled with it on every start, never the
other way round. Each state change is one ``BEGIN IMMEDIATE ... COMMIT`` (``Ledger.tx()``), so
a ``kill -9`` leaves either the whole change or none of it. Attempt ids are primary keys and a
candidate has at most one decision row (UNIQUE), so a replayed result cannot be counted twice.
``ReadOnlyLedger`` gives the same reads over a ``mode=ro`` connection for everything that only
looks (report, dashboard, ``status/log/export --dir``): it never writes and takes no lock.

Tables (times are epoch seconds, REAL; JSON columns are TEXT):

    meta       key -> value (JSON): schema_version, settings, tag, branch, preset, ...
    candidates id, description, sha256 (UNIQUE), train_py, base_commit, commit, state,
               created_at, updated_at, hw_class (the class its runs are on, once it has
               one: a decision uses one class only), runs_wanted (runs the rule asked for
               in all, on that class), min_memory (bytes: it ran out of memory on a class
               with this much, so only workers with more take it -- coordinator.routing),
               program_sha (coordinator.identity: same program, same result), text_commit /
               text_onto / text_sha (the commit, head and sha256 of the text its runs use now:
               its own text on its base, or its change rebased onto a later head,
               coordinator.rebase). Candidate 0 is the run's baseline (state kept).
    attempts   attempt_id, candidate_id, purpose (head|candidate), worker_id, hw_class,
               commit (what was measured), leased_at, finished_at, state (leased|done|lost|
               cancelled|stale), prior_state (for stale: lost|cancelled), status (outcome:
               ok|crash|nan|oom|timeout|cancelled), val_bpb, summary (harness result JSON),
               log_tail, exit_code, wall_seconds, note, seed_index (repeat i ran with seed i
               of the run's sequence, coordinator.seeds), text_sha (sha256 of the train.py
               it ran: runs of different texts are never pooled), conditions JSON (the
               worker's machine at the start and end of the run), tok_per_sec (the run's
               average), flagged (why the machine slowed it: stored, never counted --
               coordinator.slowdown; NULL for a clean run), onto (the head the text it ran
               sat on: its base, or the head it was rebased onto; NULL for head runs)
    routes     id, candidate_id, from_class, memory (usable bytes there), reason, routed_at:
               one row per out-of-memory requeue to a class with more memory
    workers    worker_id, name, hw_class, profile JSON, first_seen, last_seen, attempt_id,
               state (connected|gone), gone_reason
    decisions  id, candidate_id (UNIQUE), hw_class (the one class whose runs decided it),
               verdict (kept|discarded|failed|stale), head_before, head_after, val_bpb (the
               candidate's mean), head_bpb (the head's mean), reason, attempt_ids JSON,
               decided_at, n_candidate, n_head (runs each side), sigma (σ used), confidence
               (that the candidate is better by more than the margin), rule (which test
               decided, e.g. sequential/paired), details JSON (coordinator.rule.Comparison
               and the paired differences; for stale: the conflicting hunks, the keep it
               conflicts with, the head to resubmit on)
    head       one row: commit, candidate_id, updated_at, text_sha (of the train.py its runs
               ran; NULL: the head candidate's own text, so all its runs are the head's)
    retries    id, candidate_id, reason, requested_by, retried_at, from_state, decision (the
               superseded decision row, JSON), attempts_before (attempts rowid at the retry:
               losses before it no longer count toward the candidate's limit)
    origins    candidate_id, tool (agents|sweep|...), proposer, host, transcript: where a
               submission came from, when its client said (the proposers do), so the log
               points at the agent's transcript on the machine that ran it

Older ledgers are upgraded in place on open (``MIGRATIONS``). Schema 1 (before repeats): the
new columns are added empty, and a run without a ``policy`` setting keeps deciding greedily
(repo.decision_settings). Schema 3 ledgers (before rebasing) gain the text and program columns
(programs computed from the stored texts; NULL text columns mean "its own text on its base")
and the 'stale' verdict.

Opening an existing ledger first runs ``check_ledger`` (read-only, before sqlite may create
or change anything): an empty file, a file that is not SQLite, a damaged database
(``PRAGMA quick_check``), one without this schema, or one whose write lock another process
holds past the busy timeout is refused with ``LedgerRefused`` -- one line naming the file and
what to do -- and the file is left exactly as it was (sqlite would otherwise turn a
zero-length file into an empty database on the first pragma).
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from coordinator.identity import program_sha

SCHEMA_VERSION = 4
DECISIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER NOT NULL UNIQUE REFERENCES candidates(id),
    hw_class     TEXT,
    verdict      TEXT NOT NULL CHECK (verdict IN ('kept', 'discarded', 'failed', 'stale')),
    head_before  TEXT,
    head_after   TEXT NOT NULL,
    val_bpb      REAL,
    head_bpb     REAL,
    reason       TEXT NOT NULL,
    attempt_ids  TEXT NOT NULL,
    decided_at   REAL NOT NULL,
    n_candidate  INTEGER,
    n_head       INTEGER,
    sigma        REAL,
    confidence   REAL,
    rule         TEXT,
    details      TEXT
);
"""
DECISION_COLUMNS = ("id, candidate_id, hw_class, verdict, head_before, head_after, val_bpb, "
                    "head_bpb, reason, attempt_ids, decided_at, n_candidate, n_head, sigma, "
                    "confidence, rule, details")


def _backfill_programs(db: sqlite3.Connection) -> None:
    """Schema 4: the program hash of every candidate so far (for same-program answers)."""
    for row in db.execute("SELECT id, train_py FROM candidates").fetchall():
        try:
            program = program_sha(row[1])
        except (SyntaxError, ValueError):
            program = None
        db.execute("UPDATE candidates SET program_sha = ? WHERE id = ?", (program, row[0]))


# What each schema version adds, applied in order to an older ledger on open: SQL statements,
# or functions of the connection for what SQL cannot compute.
MIGRATIONS: dict[int, tuple] = {
    2: ("ALTER TABLE candidates ADD COLUMN hw_class TEXT",
        "ALTER TABLE candidates ADD COLUMN runs_wanted INTEGER",
        "ALTER TABLE attempts ADD COLUMN seed_index INTEGER",
        "ALTER TABLE attempts ADD COLUMN text_sha TEXT",
        "ALTER TABLE decisions ADD COLUMN n_candidate INTEGER",
        "ALTER TABLE decisions ADD COLUMN n_head INTEGER",
        "ALTER TABLE decisions ADD COLUMN sigma REAL",
        "ALTER TABLE decisions ADD COLUMN confidence REAL",
        "ALTER TABLE decisions ADD COLUMN rule TEXT",
        "ALTER TABLE decisions ADD COLUMN details TEXT",
        "ALTER TABLE head ADD COLUMN text_sha TEXT"),
    3: ("ALTER TABLE candidates ADD COLUMN min_memory INTEGER",
        "ALTER TABLE attempts ADD COLUMN conditions TEXT",
        "ALTER TABLE attempts ADD COLUMN tok_per_sec REAL",
        "ALTER TABLE attempts ADD COLUMN flagged TEXT",
        "CREATE TABLE IF NOT EXISTS routes (id INTEGER PRIMARY KEY AUTOINCREMENT, "
        "candidate_id INTEGER NOT NULL REFERENCES candidates(id), from_class TEXT NOT NULL, "
        "memory INTEGER, reason TEXT NOT NULL, routed_at REAL NOT NULL)"),
    # rebasing (coordinator.rebase) and program identity (coordinator.identity); 'stale' is a
    # verdict now, and SQLite changes a CHECK only by rebuilding the table
    4: ("ALTER TABLE candidates ADD COLUMN program_sha TEXT",
        "ALTER TABLE candidates ADD COLUMN text_commit TEXT",
        "ALTER TABLE candidates ADD COLUMN text_onto TEXT",
        "ALTER TABLE candidates ADD COLUMN text_sha TEXT",
        "ALTER TABLE attempts ADD COLUMN onto TEXT",
        DECISIONS_TABLE.format(name="decisions_v4"),
        f"INSERT INTO decisions_v4 ({DECISION_COLUMNS}) SELECT {DECISION_COLUMNS} FROM decisions",
        "DROP TABLE decisions",
        "ALTER TABLE decisions_v4 RENAME TO decisions",
        "CREATE INDEX IF NOT EXISTS candidates_program ON candidates(program_sha)",
        _backfill_programs),
}
LEDGER_NAME = "ledger.sqlite3"
BUSY_TIMEOUT = 10.0            # seconds a statement waits for another process's write lock
TABLES = ("meta", "candidates", "attempts", "workers", "decisions", "head")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    id          INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    sha256      TEXT NOT NULL UNIQUE,
    train_py    TEXT NOT NULL,
    base_commit TEXT,
    commit_sha  TEXT,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    hw_class    TEXT,
    runs_wanted INTEGER,
    min_memory  INTEGER,
    program_sha TEXT,
    text_commit TEXT,
    text_onto   TEXT,
    text_sha    TEXT
);
CREATE INDEX IF NOT EXISTS candidates_state ON candidates(state, id);
CREATE INDEX IF NOT EXISTS candidates_program ON candidates(program_sha);
CREATE TABLE IF NOT EXISTS attempts (
    attempt_id   TEXT PRIMARY KEY,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    purpose      TEXT NOT NULL CHECK (purpose IN ('head', 'candidate')),
    worker_id    TEXT NOT NULL,
    hw_class     TEXT NOT NULL,
    commit_sha   TEXT NOT NULL,
    leased_at    REAL NOT NULL,
    finished_at  REAL,
    state        TEXT NOT NULL,
    prior_state  TEXT,
    status       TEXT,
    val_bpb      REAL,
    summary      TEXT,
    log_tail     TEXT,
    exit_code    INTEGER,
    wall_seconds REAL,
    note         TEXT,
    seed_index   INTEGER,
    text_sha     TEXT,
    conditions   TEXT,
    tok_per_sec  REAL,
    flagged      TEXT,
    onto         TEXT
);
CREATE INDEX IF NOT EXISTS attempts_cand ON attempts(candidate_id, hw_class, state);
CREATE INDEX IF NOT EXISTS attempts_worker ON attempts(worker_id, state);
CREATE TABLE IF NOT EXISTS routes (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    from_class   TEXT NOT NULL,
    memory       INTEGER,
    reason       TEXT NOT NULL,
    routed_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    worker_id   TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    hw_class    TEXT NOT NULL,
    profile     TEXT NOT NULL,
    first_seen  REAL NOT NULL,
    last_seen   REAL NOT NULL,
    attempt_id  TEXT,
    state       TEXT NOT NULL,
    gone_reason TEXT
);
""" + DECISIONS_TABLE.format(name="decisions") + """
CREATE TABLE IF NOT EXISTS head (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    commit_sha   TEXT NOT NULL,
    candidate_id INTEGER NOT NULL REFERENCES candidates(id),
    updated_at   REAL NOT NULL,
    text_sha     TEXT
);
CREATE TABLE IF NOT EXISTS retries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate_id    INTEGER NOT NULL REFERENCES candidates(id),
    reason          TEXT NOT NULL,
    requested_by    TEXT,
    retried_at      REAL NOT NULL,
    from_state      TEXT NOT NULL,
    decision        TEXT,
    attempts_before INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS origins (
    candidate_id INTEGER PRIMARY KEY REFERENCES candidates(id),
    tool         TEXT,
    proposer     TEXT,
    host         TEXT,
    transcript   TEXT
);
"""


class LedgerError(RuntimeError):
    pass


class LedgerRefused(LedgerError):
    """The ledger file cannot be used as it is; the message names it and the remedy."""


# What to do when the ledger cannot be used: the branch and candidate refs in git hold every
# candidate, so a lost ledger loses the record, not the code.
_RESTORE = ("restore it from a backup, or move it aside and start a new run in another "
            "directory (`autoresearch-coord init NEWDIR`); the file was not changed")


def check_ledger(path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
    """Refuse (LedgerRefused) a ledger file that cannot be opened as this run's ledger.

    Reads only: the checks run on a read-only connection, and the lock probe (``BEGIN
    IMMEDIATE`` then ``ROLLBACK``) on a file already known to be a sound ledger writes nothing.
    The file itself is never opened outside SQLite: closing any other descriptor of it would
    drop the POSIX locks this process's SQLite connections hold on it (the coordinator opens
    its trust list while its ledger is open), and a peer that then believes itself the last
    connection deletes the WAL under them -- SQLite's own corruption warning.
    """
    path = Path(path)
    try:
        size = path.stat().st_size   # stat, not open: see above
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise LedgerRefused(f"cannot read the ledger {path}: {exc.strerror or exc}: fix its "
                            "permissions (the coordinator's user must read and write it)") \
            from None
    if size == 0:
        raise LedgerRefused(f"the ledger {path} is empty (0 bytes; a full disk or a copy that "
                            f"failed?): {_RESTORE}")
    try:
        ro = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                             timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerRefused(f"cannot open the ledger {path}: {exc}: {_RESTORE}") from None
    try:
        try:
            rows = [r[0] for r in ro.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise _locked(path, busy_timeout) from None
            rows = [str(exc)]
        except sqlite3.DatabaseError as exc:
            if "not a database" in str(exc):
                raise LedgerRefused(f"the ledger {path} is not an SQLite database ({size} "
                                    f"bytes): {_RESTORE}") from None
            rows = [str(exc)]
        if rows != ["ok"]:
            more = f" (+{len(rows) - 1} more)" if len(rows) > 1 else ""
            raise LedgerRefused(
                f"the ledger {path} is damaged (quick_check: {rows[0]}{more}): {_RESTORE}; "
                f"`sqlite3 {path} .recover` may salvage a copy")
        have = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in TABLES if t not in have]
        if missing:
            raise LedgerRefused(f"{path} is an SQLite database but not an autoresearch ledger "
                                f"(no table {', '.join(missing)}): {_RESTORE}")
    finally:
        ro.close()
    rw = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None)
    try:
        rw.execute("BEGIN IMMEDIATE")
        rw.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise _locked(path, busy_timeout) from None
        raise LedgerRefused(f"cannot write the ledger {path}: {exc}: check the disk and the "
                            "file's permissions") from None
    finally:
        rw.close()


def _locked(path: Path, waited: float) -> LedgerRefused:
    return LedgerRefused(
        f"the ledger {path} is locked by another process (waited {waited:g}s for it): stop "
        "whatever holds it (another coordinator, an open `sqlite3` shell or a backup job) and "
        "start again; nothing was changed")


def ledger_path(state_dir: Path) -> Path:
    return Path(state_dir) / LEDGER_NAME


class Ledger:
    """One SQLite connection. Not thread-safe by itself: the Coordinator serialises calls."""

    def __init__(self, path: Path, create: bool = False, busy_timeout: float = BUSY_TIMEOUT):
        self.path = Path(path)
        if not create:
            if not self.path.exists():
                raise FileNotFoundError(f"no ledger at {self.path}: run `autoresearch-coord "
                                        "init` first")
            check_ledger(self.path, busy_timeout)   # before sqlite may write anything
        # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, so a transaction is
        # exactly what a `with ledger.tx():` block says. check_same_thread=False: the server may
        # drive the core from a thread other than the one that opened it (calls are serialised).
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=busy_timeout,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed decision survives power loss, not just a process kill.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._depth = 0
        if create:
            self.db.executescript(SCHEMA)
            with self.tx():
                if self.get_meta("schema_version") is None:
                    self.set_meta("schema_version", SCHEMA_VERSION)
        version = self.get_meta("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) \
                and 1 <= version < SCHEMA_VERSION:
            version = self._migrate(version)
        if version != SCHEMA_VERSION:
            raise LedgerError(f"{self.path}: ledger schema {version!r}, this release reads "
                              f"{SCHEMA_VERSION}: use the release that made this run")
        if not create:
            # IF NOT EXISTS: a no-op on a current ledger; adds tables added since (retries)
            # to a ledger made by an earlier build of this schema version.
            self.db.executescript(SCHEMA)

    def _migrate(self, version: int) -> int:
        """Bring an older ledger up to SCHEMA_VERSION, one transaction per version (a kill
        between two leaves a consistent older version, upgraded again on the next open)."""
        while version < SCHEMA_VERSION:
            version += 1
            with self.tx() as db:
                for step in MIGRATIONS.get(version, ()):
                    step(db) if callable(step) else db.execute(step)
                self.set_meta("schema_version", version)
        return version

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One transaction: BEGIN IMMEDIATE (takes the write lock up front) ... COMMIT."""
        if self._depth:  # nested: part of the enclosing transaction
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.db
        except BaseException:
            self._depth = 0
            self.db.execute("ROLLBACK")
            raise
        self._depth = 0
        self.db.execute("COMMIT")

    # ---- small helpers ------------------------------------------------------------------

    def one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        return self.db.execute(sql, args).fetchone()

    def all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()

    def scalar(self, sql: str, *args: Any) -> Any:
        row = self.db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def get_meta(self, key: str, default: Any = None) -> Any:
        raw = self.scalar("SELECT value FROM meta WHERE key = ?", key)
        return default if raw is None else json.loads(raw)

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, json.dumps(value, sort_keys=True)))

    # ---- reads used everywhere ----------------------------------------------------------

    def head(self) -> sqlite3.Row:
        row = self.one("SELECT * FROM head WHERE id = 1")
        if row is None:
            raise LedgerError(f"{self.path}: no head recorded (init did not finish?)")
        return row

    def candidate(self, cid: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM candidates WHERE id = ?", cid)

    def attempt(self, attempt_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM attempts WHERE attempt_id = ?", attempt_id)

    def worker(self, worker_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM workers WHERE worker_id = ?", worker_id)

    def live_lease(self, worker_id: str) -> sqlite3.Row | None:
        return self.one("SELECT * FROM attempts WHERE worker_id = ? AND state = 'leased' "
                        "ORDER BY leased_at DESC LIMIT 1", worker_id)

    def class_attempts(self, cid: int, hw_class: str) -> list[sqlite3.Row]:
        """Every attempt of one candidate on one hardware class, oldest lease first."""
        return self.all("SELECT * FROM attempts WHERE candidate_id = ? AND hw_class = ? "
                        "ORDER BY leased_at, rowid", cid, hw_class)

    def decision(self, cid: int) -> sqlite3.Row | None:
        return self.one("SELECT * FROM decisions WHERE candidate_id = ?", cid)


def loads(text: str | None, default: Any = None) -> Any:
    """JSON column -> value; tolerate NULL."""
    if text is None:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


class ReadOnlyLedger(Ledger):
    """The ledger opened for reading only: reports, the dashboard, offline ``status``/``log``.

    SQLite ``mode=ro`` (plus ``query_only``), so this connection can never change the run, and
    it takes no coordinator lock (``coord.lock``): it works while the coordinator runs -- WAL
    lets readers see the last committed state without blocking the writer -- and when it is
    stopped. (On a stopped run SQLite itself may create the empty ``-wal``/``-shm`` sidecar
    files a WAL reader needs; the database file is never written.)
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no ledger at {self.path}: not a research repo "
                                    "(run `autoresearch-coord init` first)")
        # as_uri() percent-escapes the path, so a '?' or '#' in a directory name is safe.
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10.0,
                                      check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA query_only=ON")
            self._depth = 0
            version = self.get_meta("schema_version")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: cannot read the ledger: {exc}") from None
        if version != SCHEMA_VERSION:
            self.db.close()
            if isinstance(version, int) and 1 <= version < SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema {version}, older than this "
                                  f"release's {SCHEMA_VERSION}: start the coordinator once with "
                                  "this release (it upgrades the ledger in place), or read it "
                                  "with the release that made it")
            raise LedgerError(f"{self.path}: ledger schema {version!r}, this release reads "
                              f"{SCHEMA_VERSION}: use the release that made this run")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        raise LedgerError(f"{self.path}: opened read-only; only the coordinator writes the ledger")
        yield self.db  # pragma: no cover  (makes this a generator like Ledger.tx)

    @contextmanager
    def reading(self) -> Iterator["ReadOnlyLedger"]:
        """``with ledger.reading():`` -- every read inside sees one committed state (a report
        made while the coordinator writes is never half of one decision)."""
        self.db.execute("BEGIN")
        try:
            yield self
        finally:
            self.db.execute("COMMIT")
