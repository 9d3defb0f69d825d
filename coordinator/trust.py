"""Who may talk to the coordinator, and what each may say: trust list, roles, invites, ZAP.

The trust list lives in the ledger's SQLite file (``DIR/.autoresearch/ledger.sqlite3``), in three
tables of its own created by ``ensure_schema`` (idempotent, ``IF NOT EXISTS``; the ledger's
schema_version is untouched):

    trust_keys     public_key (Z85, PK), name, role (worker|submitter|admin), created_at,
                   revoked_at (NULL = active), source ("cli", "invite:<id>")
                   -- a name is unique among active keys, so `revoke NAME` is unambiguous
    trust_invites  token_sha256 (PK), role, name_hint, created_at, expires_at,
                   redeemed_at, redeemed_by (public key)
                   -- only the hash of a token is stored; the token is shown once
    trust_worker_ids  worker_id (PK), public_key, bound_at
                   -- the key that first spoke for a worker id; only it may speak for that
                   worker (and its lease), also right after a coordinator restart

Because SQLite (WAL) serialises writers across processes, ``autoresearch-coord trust/revoke/
invite`` on the coordinator machine can write the list while the server runs, and the server's
next ``lookup`` sees it: nothing to reload, and a revoke cuts a key off on its next message.

How identity reaches a message: the coordinator's ROUTER is a CURVE server whose ZAP handler
(``FleetAuthenticator``) lets every well-formed key finish the handshake and sets the ZAP user id
to the client's public key. libzmq attaches that user id to every frame the connection delivers
(``frame.get("User-Id")``, see ``shared.keys.peer_key``), and the server asks ``TrustStore.check``
on every message. Unknown keys are let in on purpose: they may only ``enrol`` with an invite,
and anything else is answered with error ``untrusted`` carrying their key and the exact admin
command -- far more useful to a person at a new machine than a silent handshake timeout.

Roles (one per key; a machine that both works and submits uses two keys, ``worker`` and
``client``, see shared.keys):

    worker     hello ready heartbeat result bye; query dataset_manifest|dataset_chunk|harness
    submitter  submit; query status|log|export
    admin      what a submitter may, plus query keys|retry (retry: a failed candidate queued
               again)
    (unknown)  enrol only                      (revoked) nothing

(``PERMISSIONS`` is derived from ``shared.protocol.SCHEMA`` / ``QUERIES``, which are the truth;
this list is a summary.)

The coordinator's own public key is treated as admin (``check(server_public=...)``): whoever
can read ``DIR/.autoresearch/keys/coordinator.key_secret`` already owns the run.
"""
from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmq.auth.thread import ThreadAuthenticator

from shared import protocol
from shared.keys import ZAP_DOMAIN, fingerprint, validate_public_key
from shared.protocol import ROLES

ENROL = "enrol"
INVITE_PREFIX = "inv-"
DEFAULT_INVITE_TTL = 86400.0
MAX_NAME = 64

# role -> (message types it may send, query kinds it may ask), derived from the wire schema
# (shared.protocol.SCHEMA / QUERIES), so a new message type is permitted where it is defined.
PERMISSIONS: dict[str, tuple[frozenset, frozenset]] = {
    role: (frozenset(t for t, m in protocol.SCHEMA.items() if role in m.sent_by),
           frozenset(q for q, roles in protocol.QUERIES.items() if role in roles))
    for role in (*ROLES, protocol.UNTRUSTED, protocol.REVOKED)
}

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS trust_keys (
        public_key TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        role       TEXT NOT NULL CHECK (role IN ('worker', 'submitter', 'admin')),
        created_at REAL NOT NULL,
        revoked_at REAL,
        source     TEXT NOT NULL
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS trust_keys_active_name ON trust_keys(name) "
    "WHERE revoked_at IS NULL",
    """CREATE TABLE IF NOT EXISTS trust_invites (
        token_sha256 TEXT PRIMARY KEY,
        role         TEXT NOT NULL CHECK (role IN ('worker', 'submitter', 'admin')),
        name_hint    TEXT,
        created_at   REAL NOT NULL,
        expires_at   REAL NOT NULL,
        redeemed_at  REAL,
        redeemed_by  TEXT
    )""",
    # which key said hello with a worker id first: only that key may speak for that worker (and
    # its lease), also right after a coordinator restart, before the owner says hello again
    """CREATE TABLE IF NOT EXISTS trust_worker_ids (
        worker_id  TEXT PRIMARY KEY,
        public_key TEXT NOT NULL,
        bound_at   REAL NOT NULL
    )""",
)


class TrustError(ValueError):
    """A trust-list operation was refused; the message says why and what to do."""


class InviteError(TrustError):
    """An invite could not be redeemed (unknown, used, expired)."""


def allowed(role: str, message_type: str, what: str | None = None) -> bool:
    """May a peer of ``role`` (a ROLES entry, "untrusted" or "revoked") send this message?
    For ``query`` messages ``what`` is the query name."""
    return protocol.may_send(role, message_type, what)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the trust tables if missing. Safe to call on every open, from any process."""
    for stmt in SCHEMA:
        conn.execute(stmt)


def trust_command(public_key: str, role: str = "worker") -> str:
    """The exact admin command that trusts ``public_key`` (what an untrusted peer is told)."""
    import shlex  # Z85 keys contain shell characters ( ) $ & ...: paste-safe quoting

    return f"autoresearch-coord trust {shlex.quote(public_key)} --name NAME --role {role}"


def _fmt(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


@dataclass(frozen=True)
class Entry:
    public_key: str
    name: str
    role: str
    created: float
    revoked: float | None = None
    source: str = "cli"

    @property
    def active(self) -> bool:
        return self.revoked is None

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def to_dict(self) -> dict:
        return {"public_key": self.public_key, "fingerprint": self.fingerprint,
                "name": self.name, "role": self.role, "created": self.created,
                "revoked": self.revoked, "source": self.source}


@dataclass(frozen=True)
class Invite:
    invite_id: str          # first 8 hex of the token's sha256: safe to show and list
    role: str
    name_hint: str | None
    created: float
    expires: float
    redeemed: float | None
    redeemed_by: str | None


@dataclass(frozen=True)
class Verdict:
    """What the server should do with one message from one peer."""
    ok: bool
    status: str                 # trusted | coordinator | untrusted | revoked
    entry: Entry | None
    code: str | None = None     # error code when not ok: untrusted | revoked | forbidden
    message: str | None = None  # one line for the peer when not ok

    @property
    def role(self) -> str:
        return self.entry.role if self.entry is not None else self.status


class TrustStore:
    """The trust list and invites, on the ledger's SQLite connection.

    ``db`` is a ``coordinator.ledger.Ledger`` (its ``tx()`` is used, so trust changes can join
    a ledger transaction) or a ``sqlite3.Connection`` opened with ``isolation_level=None``.
    ``TrustStore.open(repo_dir)`` opens its own connection (for CLI commands run beside a live
    server). Not thread-safe by itself, like the ledger.
    """

    def __init__(self, db: Any, clock: Callable[[], float] = time.time):
        self._ledger = db if hasattr(db, "tx") and hasattr(db, "db") else None
        self.conn: sqlite3.Connection = db.db if self._ledger is not None else db
        if self._ledger is None and self.conn.isolation_level is not None:
            raise ValueError("TrustStore needs a connection opened with isolation_level=None")
        self.clock = clock
        self._owned = False
        ensure_schema(self.conn)

    @classmethod
    def open(cls, repo_dir: Path, clock: Callable[[], float] = time.time) -> "TrustStore":
        """Open the trust list of research repo ``repo_dir`` with a private connection."""
        from coordinator.ledger import check_ledger, ledger_path
        from coordinator.repo import state_dir

        path = ledger_path(state_dir(Path(repo_dir).expanduser()))
        if not path.exists():
            raise FileNotFoundError(f"no ledger at {path}: run `autoresearch-coord init` first")
        check_ledger(path)   # a damaged/empty/locked ledger is refused before sqlite writes
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=10.0,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        store = cls(conn, clock)
        store._owned = True
        return store

    def close(self) -> None:
        if self._owned:
            self.conn.close()
            self._owned = False

    def __enter__(self) -> "TrustStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tx(self):
        if self._ledger is not None:
            return self._ledger.tx()
        return _Tx(self.conn)

    # ---- keys ---------------------------------------------------------------------------

    def trust(self, public_key: str | bytes, name: str, role: str = "worker") -> Entry:
        """Add (or re-activate, rename, change the role of) a key. Returns its entry."""
        key = _key_str(public_key)
        name = _check_name(name)
        _check_role(role)
        with self._tx() as db:
            other = db.execute("SELECT public_key FROM trust_keys WHERE name = ? AND "
                               "revoked_at IS NULL AND public_key != ?", (name, key)).fetchone()
            if other is not None:
                raise TrustError(f"name {name!r} is already used by key {fingerprint(other[0])}; "
                                 f"choose another name or `autoresearch-coord revoke {name}` first")
            now = self.clock()
            db.execute("INSERT INTO trust_keys(public_key, name, role, created_at, revoked_at, "
                       "source) VALUES (?, ?, ?, ?, NULL, 'cli') ON CONFLICT(public_key) DO UPDATE "
                       "SET name = excluded.name, role = excluded.role, revoked_at = NULL, "
                       "source = 'cli', created_at = CASE WHEN trust_keys.revoked_at IS NULL "
                       "THEN trust_keys.created_at ELSE excluded.created_at END",
                       (key, name, role, now))
        return self.lookup(key)

    def revoke(self, key_or_name: str | bytes) -> bool:
        """Revoke an active key given as Z85 key, fingerprint or name. False if none matched."""
        ident = key_or_name.decode() if isinstance(key_or_name, bytes) else str(key_or_name)
        ident = ident.strip()
        with self._tx() as db:
            rows = db.execute("SELECT public_key, name FROM trust_keys "
                              "WHERE revoked_at IS NULL").fetchall()
            hits = [r[0] for r in rows
                    if ident in (r[0], r[1]) or ident == fingerprint(r[0])]
            for key in hits:
                db.execute("UPDATE trust_keys SET revoked_at = ? WHERE public_key = ?",
                           (self.clock(), key))
        return bool(hits)

    def lookup(self, public_key: str | bytes | None) -> Entry | None:
        """The entry for this key (active or revoked), or None if never trusted."""
        if not public_key:
            return None
        key = public_key.decode("ascii", "replace") if isinstance(public_key, bytes) \
            else public_key
        row = self.conn.execute("SELECT public_key, name, role, created_at, revoked_at, source "
                                "FROM trust_keys WHERE public_key = ?", (key,)).fetchone()
        return None if row is None else Entry(*row)

    def list(self, include_revoked: bool = True) -> list[Entry]:
        sql = ("SELECT public_key, name, role, created_at, revoked_at, source FROM trust_keys"
               + ("" if include_revoked else " WHERE revoked_at IS NULL")
               + " ORDER BY revoked_at IS NOT NULL, created_at, rowid")
        return [Entry(*r) for r in self.conn.execute(sql).fetchall()]

    # ---- invites ------------------------------------------------------------------------

    def create_invite(self, role: str = "worker", name_hint: str | None = None,
                      ttl_s: float = DEFAULT_INVITE_TTL) -> str:
        """A one-time token (128 random bits) an unknown machine can enrol with. Only its hash
        is stored: show the token to the admin once."""
        _check_role(role)
        if name_hint is not None:
            name_hint = _check_name(name_hint)
        if not ttl_s > 0:
            raise TrustError(f"invite lifetime must be positive seconds, got {ttl_s}")
        token = INVITE_PREFIX + secrets.token_hex(16)
        now = self.clock()
        with self._tx() as db:
            db.execute("INSERT INTO trust_invites(token_sha256, role, name_hint, created_at, "
                       "expires_at) VALUES (?, ?, ?, ?, ?)",
                       (_token_hash(token), role, name_hint, now, now + ttl_s))
        return token

    def list_invites(self, include_done: bool = False) -> list[Invite]:
        sql = ("SELECT token_sha256, role, name_hint, created_at, expires_at, redeemed_at, "
               "redeemed_by FROM trust_invites")
        args: tuple = ()
        if not include_done:
            sql += " WHERE redeemed_at IS NULL AND expires_at > ?"
            args = (self.clock(),)
        rows = self.conn.execute(sql + " ORDER BY created_at, rowid", args).fetchall()
        return [Invite(r[0][:8], *r[1:]) for r in rows]

    def redeem_invite(self, token: str, public_key: str | bytes, name: str) -> Entry:
        """Trust ``public_key`` with the invite's role; the invite is then used up.

        One transaction (BEGIN IMMEDIATE), so two redeems of one token -- from two processes
        even -- cannot both succeed. The same key redeeming its own invite again (a retried
        enrol whose reply was lost) gets its entry back; a key that is already trusted gets its
        entry back without using the invite. A revoked key cannot enrol itself back in.
        """
        key = _key_str(public_key)
        if not isinstance(token, str) or not token.strip():
            raise InviteError("no invite token given")
        digest = _token_hash(token.strip())
        with self._tx() as db:
            now = self.clock()
            existing = self.lookup(key)
            if existing is not None and not existing.active:
                raise InviteError(f"key {existing.fingerprint} ({existing.name}) was revoked at "
                                  f"{_fmt(existing.revoked)}; an admin must trust it again")
            if existing is not None:
                return existing
            row = db.execute("SELECT role, name_hint, expires_at, redeemed_at, redeemed_by "
                             "FROM trust_invites WHERE token_sha256 = ?", (digest,)).fetchone()
            if row is None:
                raise InviteError("invite not recognised (mistyped, or made by another "
                                  "coordinator); ask for a new one: autoresearch-coord invite")
            role, hint, expires, redeemed, by = row
            if redeemed is not None:
                who = self.lookup(by)
                raise InviteError(f"invite already used at {_fmt(redeemed)}"
                                  + (f" by {who.name}" if who else "")
                                  + "; ask for a new one: autoresearch-coord invite")
            if now >= expires:
                raise InviteError(f"invite expired at {_fmt(expires)}; ask for a new one: "
                                  "autoresearch-coord invite")
            final = self._free_name(db, hint or _clean_name(name))
            db.execute("INSERT INTO trust_keys(public_key, name, role, created_at, revoked_at, "
                       "source) VALUES (?, ?, ?, ?, NULL, ?)",
                       (key, final, role, now, f"invite:{digest[:8]}"))
            cur = db.execute("UPDATE trust_invites SET redeemed_at = ?, redeemed_by = ? "
                             "WHERE token_sha256 = ? AND redeemed_at IS NULL", (now, key, digest))
            if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; refuse rather than guess
                raise InviteError("invite was used concurrently; ask for a new one")
        return self.lookup(key)

    @staticmethod
    def _free_name(db: sqlite3.Connection, base: str) -> str:
        """``base``, or ``base-2``, ``base-3``... whichever no active key uses."""
        taken = {r[0] for r in db.execute("SELECT name FROM trust_keys WHERE revoked_at IS NULL")}
        name, n = base, 2
        while name in taken:
            suffix = f"-{n}"
            name = base[: MAX_NAME - len(suffix)] + suffix
            n += 1
        return name

    # ---- worker ids -----------------------------------------------------------------------

    def worker_owner(self, worker_id: str) -> str | None:
        """The key a worker id is bound to, or None if no key has spoken for it yet."""
        row = self.conn.execute("SELECT public_key FROM trust_worker_ids WHERE worker_id = ?",
                                (worker_id,)).fetchone()
        return None if row is None else row[0]

    def bind_worker(self, worker_id: str, public_key: str | bytes) -> str:
        """Bind ``worker_id`` to ``public_key`` unless it is bound already; returns the owner.
        The first key to speak for a worker id keeps it (a key may own several ids: several
        workers on one machine)."""
        key = _key_str(public_key)
        with self._tx() as db:
            db.execute("INSERT INTO trust_worker_ids(worker_id, public_key, bound_at) "
                       "VALUES (?, ?, ?) ON CONFLICT(worker_id) DO NOTHING",
                       (worker_id, key, self.clock()))
        return self.worker_owner(worker_id)

    # ---- per-message decision -----------------------------------------------------------

    def check(self, user_id: str | bytes | None, message_type: str, what: str | None = None,
              server_public: str | bytes | None = None) -> Verdict:
        """Decide one inbound message. ``user_id`` is ``peer_key(frame)`` (the ZAP user id =
        the sender's public key); ``what`` is the query name for ``query`` messages;
        ``server_public`` is the coordinator's own key (treated as admin)."""
        key = user_id.decode("ascii", "replace") if isinstance(user_id, bytes) else user_id
        desc = f"query {what!r}" if message_type == "query" else message_type
        try:
            key = validate_public_key(key).decode("ascii") if key else None
        except ValueError:
            key = None   # not a CURVE user id: the socket is not behind FleetAuthenticator
        if not key:
            return Verdict(False, "untrusted", None, "untrusted",
                           "connection is not authenticated: this coordinator requires CURVE "
                           "keys (pass --server-key and use a keypair)")
        if server_public is not None and key == _key_str(server_public):
            entry = Entry(key, "coordinator", "admin", 0.0, None, "coordinator key")
            return self._judge(entry, "coordinator", message_type, what, desc)
        entry = self.lookup(key)
        if entry is None:
            if allowed("untrusted", message_type, what):
                return Verdict(True, "untrusted", None)
            # the role to suggest: worker, unless only clients may send this
            client_only = not allowed("worker", message_type, what) and any(
                allowed(r, message_type, what) for r in protocol.CLIENTS)
            role = "submitter" if client_only else "worker"
            return Verdict(False, "untrusted", None, "untrusted",
                           f"this coordinator does not trust your key {key} (fingerprint "
                           f"{fingerprint(key)}); on the coordinator machine run: "
                           f"{trust_command(key, role)} -- or join with an invite token")
        if not entry.active:
            return Verdict(False, "revoked", entry, "revoked",
                           f"your key {entry.fingerprint} ({entry.name}) was revoked at "
                           f"{_fmt(entry.revoked)}; ask the coordinator's admin")
        return self._judge(entry, "trusted", message_type, what, desc)

    @staticmethod
    def _judge(entry: Entry, status: str, message_type: str, what: str | None,
               desc: str) -> Verdict:
        if allowed(entry.role, message_type, what):
            return Verdict(True, status, entry)
        may = sorted(r for r in ROLES if allowed(r, message_type, what))
        need = f"needs role {' or '.join(may)}" if may else "is not accepted from anyone"
        return Verdict(False, status, entry, "forbidden",
                       f"key {entry.name} ({entry.fingerprint}) has role {entry.role}; "
                       f"{desc} {need}")


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT on a bare autocommit connection (what Ledger.tx() does)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def _key_str(public_key: str | bytes) -> str:
    try:
        return validate_public_key(public_key).decode("ascii")
    except ValueError as e:
        raise TrustError(str(e)) from None


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise TrustError(f"unknown role {role!r}: one of {', '.join(ROLES)}")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TrustError("a name is required (e.g. the machine's short hostname)")
    name = name.strip()
    if len(name) > MAX_NAME or not all(c.isalnum() or c in "-_." for c in name):
        raise TrustError(f"bad name {name!r}: up to {MAX_NAME} letters, digits, '-', '_', '.'")
    return name


def _clean_name(name: Any) -> str:
    """A peer-supplied name made acceptable (hostnames like "Ann's MacBook Pro" happen)."""
    text = "".join(c if (c.isascii() and c.isalnum()) or c in "-_." else "-"
                   for c in str(name or "").strip())
    text = "-".join(p for p in text.split("-") if p)[:MAX_NAME].strip(".")
    return text or "worker"


# --------------------------------------------------------------------------- ZAP

class FleetAuthenticator(ThreadAuthenticator):
    """ZAP handler for the coordinator's CURVE ROUTER: every well-formed client key completes
    the handshake, and the ZAP user id is that key (Z85), so each received frame says who sent
    it (``shared.keys.peer_key``). Authorisation is per message (``TrustStore.check``).

    ``deny(key) -> bool``, if given, refuses keys at the handshake (e.g. a key list that must
    never even connect). It runs in the authenticator's thread, so it must not use the
    server's SQLite connection; an exception in it refuses the key (fails closed).

    Only one ZAP handler may exist per zmq.Context (it binds inproc://zeromq.zap.01). Start it
    before the server socket binds; stop it after the socket is closed.
    """

    def __init__(self, context=None, domain: str = ZAP_DOMAIN,
                 deny: Callable[[str], bool] | None = None):
        super().__init__(context=context)
        self.domain = domain
        self._deny = deny

    def start(self) -> None:
        super().start()
        self.configure_curve_callback(domain=self.domain, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: True lets the handshake complete."""
        if self._deny is None:
            return True
        try:
            return not self._deny(key.decode("ascii"))
        except Exception as exc:  # never let a bug kill the ZAP thread (all handshakes hang)
            self.log.error("deny(%s) failed, refusing: %s", key, exc)
            return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        # Explicit (pyzmq's default happens to agree): the server relies on user id == key.
        from zmq.utils import z85

        return z85.encode(client_public_key).decode("ascii")

    def __enter__(self) -> "FleetAuthenticator":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
