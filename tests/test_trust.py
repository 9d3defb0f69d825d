"""coordinator.trust: trust list in the ledger, roles, invites, per-message checks, ZAP on loopback."""
from __future__ import annotations

import threading

import pytest
import zmq

from coordinator.ledger import SCHEMA_VERSION, Ledger
from coordinator.trust import (
    ENROL, FleetAuthenticator, InviteError, TrustError, TrustStore, allowed, trust_command,
)
from shared import keys
from shared.keys import Keypair
from handshake import curve_pair, wait_for_handshake  # noqa: E402  (tests/handshake.py)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def new_key() -> str:
    return zmq.curve_keypair()[0].decode()


@pytest.fixture
def repo(tmp_path):
    """A directory with an (empty-schema) ledger where a research repo keeps it."""
    (tmp_path / ".autoresearch").mkdir()
    Ledger(tmp_path / ".autoresearch" / "ledger.sqlite3", create=True).close()
    return tmp_path


@pytest.fixture
def ledger(repo):
    led = Ledger(repo / ".autoresearch" / "ledger.sqlite3")
    yield led
    led.close()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(ledger, clock):
    return TrustStore(ledger, clock=clock)


def test_trust_lookup_list_revoke(store, clock):
    a, b = new_key(), new_key()
    e = store.trust(a, "mini-1", "worker")
    assert (e.public_key, e.name, e.role, e.active, e.source) == (a, "mini-1", "worker", True, "cli")
    store.trust(b.encode(), "laptop", "submitter")
    assert store.lookup(a) == e and store.lookup(new_key()) is None
    assert [x.name for x in store.list()] == ["mini-1", "laptop"]
    with pytest.raises(TrustError, match="already used by key .*revoke mini-1"):
        store.trust(b, "mini-1")
    clock.t += 5
    assert store.revoke("mini-1") is True
    assert store.lookup(a).revoked == clock.t and not store.lookup(a).active
    assert store.revoke("mini-1") is False          # nothing active by that name any more
    assert store.revoke(keys.fingerprint(b)) is True
    assert store.list(include_revoked=False) == []
    # a revoked key's name is free again; re-trusting a revoked key re-activates it
    store.trust(new_key(), "mini-1")
    again = store.trust(b, "laptop2", "admin")
    assert again.active and again.role == "admin" and again.name == "laptop2"


def test_bad_input_errors(store):
    with pytest.raises(TrustError, match="40 characters"):
        store.trust("short", "x")
    with pytest.raises(TrustError, match="unknown role 'boss'"):
        store.trust(new_key(), "x", "boss")
    with pytest.raises(TrustError, match="bad name"):
        store.trust(new_key(), "has space")
    with pytest.raises(TrustError, match="lifetime"):
        store.create_invite("worker", ttl_s=0)


def test_allowed_table():
    for t in ("hello", "ready", "heartbeat", "result", "bye"):
        assert allowed("worker", t) and not allowed("submitter", t) and not allowed("untrusted", t)
    assert allowed("worker", "query", "dataset_chunk") and allowed("worker", "query", "harness")
    assert not allowed("worker", "submit") and not allowed("worker", "query", "status")
    assert allowed("submitter", "submit") and allowed("submitter", "query", "export")
    assert not allowed("submitter", "query", "dataset_manifest")
    assert not allowed("submitter", "query", "keys") and allowed("admin", "query", "keys")
    # no handler answers these over the wire, so nobody is permitted to ask them
    assert not any(allowed("admin", "query", q) for q in ("trust", "revoke", "invite"))
    assert allowed("admin", "submit") and not allowed("admin", "hello")
    assert allowed("untrusted", ENROL) and not allowed("untrusted", "query", "status")
    assert not allowed("revoked", ENROL) and not allowed("nobody", "hello")


def test_invite_redeem_single_use(store, clock):
    token = store.create_invite("worker", ttl_s=60)
    assert token.startswith("inv-") and len(token) == 36
    assert token not in repr(store.conn.execute("SELECT * FROM trust_invites").fetchall())
    assert len(store.list_invites()) == 1
    k1, k2 = new_key(), new_key()
    e = store.redeem_invite(token, k1, "Ann's MacBook Pro")
    assert (e.name, e.role, e.active) == ("Ann-s-MacBook-Pro", "worker", True)
    assert e.source.startswith("invite:")
    assert store.redeem_invite(token, k1, "whatever") == e   # retried enrol: same answer
    with pytest.raises(InviteError, match="already used .* by Ann-s-MacBook-Pro"):
        store.redeem_invite(token, k2, "other")
    assert store.lookup(k2) is None and store.list_invites() == []
    with pytest.raises(InviteError, match="not recognised"):
        store.redeem_invite("inv-" + "0" * 32, k2, "other")


def test_invite_expiry_hint_dedupe_and_revoked(store, clock):
    late = store.create_invite("submitter", ttl_s=10)
    clock.t += 10
    with pytest.raises(InviteError, match="expired"):
        store.redeem_invite(late, new_key(), "x")
    store.trust(new_key(), "mini")
    e = store.redeem_invite(store.create_invite("submitter"), new_key(), "mini")
    assert (e.name, e.role) == ("mini-2", "submitter")
    hinted = store.redeem_invite(store.create_invite("worker", name_hint="rack-3"), new_key(), "x")
    assert hinted.name == "rack-3"
    gone = new_key()
    store.trust(gone, "gone")
    store.revoke(gone)
    with pytest.raises(InviteError, match="was revoked"):
        store.redeem_invite(store.create_invite(), gone, "gone")


def test_concurrent_redeem_only_one_wins(repo):
    token = TrustStore.open(repo).create_invite("worker")
    stores = [TrustStore.open(repo) for _ in range(4)]
    barrier, wins, errors = threading.Barrier(4), [], []

    def redeem(s):
        barrier.wait()
        try:
            wins.append(s.redeem_invite(token, new_key(), "racer"))
        except InviteError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=redeem, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(wins) == 1 and len(errors) == 3
    assert all("already used" in e for e in errors)


def test_cli_store_writes_are_seen_by_server_store(repo, store):
    """autoresearch-coord trust/revoke run beside a live server: no reload needed."""
    key = new_key()
    assert store.check(key, "hello").code == "untrusted"
    with TrustStore.open(repo) as cli:
        cli.trust(key, "mini")
    assert store.check(key, "hello").ok
    with TrustStore.open(repo) as cli:
        assert cli.revoke(key)
    assert store.check(key, "hello").code == "revoked"


def test_check_verdicts(store):
    w, s, unknown, server = new_key(), new_key(), new_key(), new_key()
    store.trust(w, "w1", "worker")
    store.trust(s, "agent", "submitter")
    assert store.check(w, "hello").ok and store.check(w, "hello").role == "worker"
    assert store.check(w, "query", "dataset_manifest").ok
    v = store.check(w, "submit")
    assert (v.ok, v.code) == (False, "forbidden") and "needs role admin or submitter" in v.message
    assert store.check(s, "query", "log").ok and not store.check(s, "ready").ok
    v = store.check(unknown, "hello")
    assert (v.ok, v.status, v.code) == (False, "untrusted", "untrusted")
    assert unknown in v.message and trust_command(unknown, "worker") in v.message
    assert "--role submitter" in store.check(unknown, "submit").message
    assert store.check(unknown, ENROL).ok and store.check(unknown, ENROL).status == "untrusted"
    v = store.check(server, "query", "keys", server_public=server)
    assert v.ok and v.status == "coordinator" and v.role == "admin"
    assert store.check(None, "hello").code == "untrusted"
    assert "not authenticated" in store.check("", ENROL).message
    assert store.check("anonymous", "hello").code == "untrusted"
    store.revoke("w1")
    v = store.check(w, ENROL)
    assert (v.ok, v.code, v.entry.name) == (False, "revoked", "w1")


def test_schema_is_idempotent_and_leaves_ledger_version(ledger):
    TrustStore(ledger)
    TrustStore(ledger)
    assert ledger.get_meta("schema_version") == SCHEMA_VERSION


# ---- real sockets: ROUTER with FleetAuthenticator, DEALER clients ---------------------------

def _recv(srv, timeout_ms=5000):
    assert srv.poll(timeout_ms), "nothing arrived at the server"
    frames = srv.recv_multipart(copy=False)
    return frames[0].bytes, frames[1]


@pytest.fixture
def curve_server(tmp_path):
    ctx = zmq.Context()
    auth = FleetAuthenticator(ctx)
    auth.start()
    server_kp = keys.load_or_create_keypair(tmp_path / "coord", "coordinator")
    srv = ctx.socket(zmq.ROUTER)
    srv.linger = 0
    keys.configure_server(srv, server_kp)
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    clients = []

    def connect(kp: Keypair, pin: bytes):
        cli = ctx.socket(zmq.DEALER)
        cli.linger = 0
        keys.configure_client(cli, kp, pin)
        mon = keys.HandshakeMonitor(cli)
        cli.connect(f"tcp://127.0.0.1:{port}")
        clients.append((cli, mon))
        return cli, mon

    yield srv, server_kp, connect
    for cli, mon in clients:
        mon.close()
        cli.close()
    srv.close()
    auth.stop()
    ctx.term()


def test_zap_identity_per_message(curve_server, store):
    srv, server_kp, connect = curve_server
    trusted = Keypair(*zmq.curve_keypair())
    stranger = Keypair(*zmq.curve_keypair())
    store.trust(trusted.public, "mini", "worker")

    cli, _ = connect(trusted, server_kp.public)
    cli.send(b"hello")
    ident, frame = _recv(srv)
    who = keys.peer_key(frame)
    assert who == trusted.public.decode()
    assert store.check(who, "hello").ok

    other, _ = connect(stranger, server_kp.public)
    other.send(b"hello")
    sident, frame = _recv(srv)
    v = store.check(keys.peer_key(frame), "hello")
    assert (v.ok, v.code) == (False, "untrusted") and stranger.public.decode() in v.message
    assert store.check(keys.peer_key(frame), ENROL).ok
    srv.send_multipart([sident, b"untrusted"])   # the unknown key can be answered
    assert other.poll(5000) and other.recv() == b"untrusted"

    # revoke while the connection stays open: its very next message is identified as revoked
    assert store.revoke("mini")
    cli.send(b"ready")
    ident2, frame = _recv(srv)
    assert ident2 == ident
    v = store.check(keys.peer_key(frame), "ready")
    assert (v.ok, v.code) == (False, "revoked")


def test_wrong_server_key_never_connects(curve_server):
    srv, server_kp, connect = curve_server
    me = Keypair(*zmq.curve_keypair())
    cli, mon = connect(me, zmq.curve_keypair()[0])   # pinned to a key the server lacks
    cli.send(b"hello")
    assert wait_for_handshake(mon, "server_key") == "server_key"
    assert not srv.poll(300)


def test_deny_predicate_refuses_at_handshake(tmp_path):
    ctx = zmq.Context()
    banned = Keypair(*zmq.curve_keypair())
    auth = FleetAuthenticator(ctx, deny=lambda key: key == banned.public.decode())
    auth.start()
    try:
        server_kp = Keypair(*zmq.curve_keypair())
        srv, cli, mon = curve_pair(ctx, server_kp, banned, server_kp.public)
        cli.send(b"hello")
        assert wait_for_handshake(mon, "refused") == "refused"
        assert not srv.poll(300)
        mon.close()
        cli.close()
        srv.close()
    finally:
        auth.stop()
        ctx.term()


def test_a_worker_id_is_bound_to_the_first_key_and_the_binding_is_in_the_ledger(store, repo):
    a, b = new_key(), new_key()
    assert store.worker_owner("w-1") is None
    assert store.bind_worker("w-1", a) == a
    assert store.bind_worker("w-1", b) == a          # the first key keeps it
    assert store.bind_worker("w-2", b) == b          # a key may own several ids
    store.revoke(store.trust(a, "wa").name)
    with TrustStore.open(repo) as again:             # another connection (a restarted server)
        assert again.worker_owner("w-1") == a        # still a's, even after a's revoke
        assert again.worker_owner("w-2") == b
