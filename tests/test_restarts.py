"""The wire across coordinator restarts: no false strikes, no forgotten workers, no stolen ids.

Real sockets on loopback throughout. The coordinator is a real ``Server`` + ``Coordinator`` in a
thread (``tests/serving.served``); a restart is closing it and starting a new one on the same
endpoint and repo, which is what a kill -9 and restart look like from the wire (the ledger is
what survives). Workers are raw DEALER peers (``test_wire.Peer``, every frame exactly what the
test says) or a real ``worker.agent.Agent``; where the worker's own behaviour is under test, a
scripted ROUTER (``test_dealer.Router``) plays the coordinator.
"""
from __future__ import annotations

import signal
import threading
import time

import pytest
import zmq

from serving import served, write_locked
from shared import protocol
from shared.client import Client
from shared.codec import encode
from test_dealer import Router
from test_fleet import fleet, submit  # noqa: F401  (fleet is a fixture)
from test_wire import Peer, hello, outcome

DEADLINE = 20.0


def recv_type(peer: Peer, want: str, timeout: float = DEADLINE) -> dict:
    """The next message of type ``want`` (others, heartbeats included, skipped)."""
    end = time.monotonic() + timeout
    while True:
        msg = peer.recv(skip=("heartbeat",), timeout=max(0.01, end - time.monotonic()))
        if msg["type"] == want:
            return msg


def attempts(core) -> list[dict]:
    return [dict(r) for r in core.ledger.all("SELECT * FROM attempts ORDER BY leased_at")]


# ---- item 1: a hello that crossed an assign is not a lost lease ---------------------------

def test_a_hello_crossing_our_assign_keeps_the_lease_and_gets_the_assign_again(
        fleet_repo, fleet_variant):
    """Worker: ready ... hello (sent before the assign arrived, e.g. its second hello after a
    restart). The coordinator must not conclude "restarted without it": it keeps the lease and
    sends the same assign again, as it does for a ready that crossed an assign."""
    with served(fleet_repo, heartbeat_interval=0.1, liveness=50) as (core, server):
        peer = Peer(server.endpoint)
        try:
            peer.send(hello("w1-cross"))
            recv_type(peer, "welcome")
            peer.send(protocol.make("ready", worker_id="w1-cross"))
            head = recv_type(peer, "assign")
            peer.send(protocol.make("result", worker_id="w1-cross",
                                    attempt_id=head["attempt_id"], outcome=outcome(1.5)))
            assert recv_type(peer, "ack")["accepted"]
            with Client(server.endpoint, timeout=10) as c:
                cid = c.submit(fleet_variant(bpb=1.4), "better")["candidate_id"]
            peer.send(protocol.make("ready", worker_id="w1-cross"))
            got = recv_type(peer, "assign")
            assert got["candidate_id"] == cid
            # the crossing: a hello carrying no attempt, sent before that assign arrived
            peer.send(hello("w1-cross"))
            recv_type(peer, "welcome")
            again = recv_type(peer, "assign")
            assert again["attempt_id"] == got["attempt_id"]     # the same lease, not a new one
            rows = {a["attempt_id"]: a for a in attempts(core)}
            assert rows[got["attempt_id"]]["state"] == "leased", rows
            assert not [a for a in rows.values() if a["state"] in ("lost", "cancelled")], rows
            peer.send(protocol.make("result", worker_id="w1-cross",
                                    attempt_id=got["attempt_id"], outcome=outcome(1.4)))
            ack = recv_type(peer, "ack")
            assert ack["accepted"] is True, ack
        finally:
            peer.close()


def test_a_hello_without_a_lease_from_an_earlier_incarnation_is_no_strike(
        fleet_repo, fleet_variant):
    """After a restart there is no assign to re-send: a hello without the lease the ledger
    holds for that worker means the assign never reached it -- cancelled (requeued, no strike),
    never lost: the same worker id is the same live process."""
    with served(fleet_repo, heartbeat_interval=0.1, liveness=50) as (core, server):
        endpoint = server.endpoint
        peer = Peer(endpoint)
        peer.send(hello("w1-early"))
        recv_type(peer, "welcome")
        peer.send(protocol.make("ready", worker_id="w1-early"))
        head = recv_type(peer, "assign")
        peer.send(protocol.make("result", worker_id="w1-early", attempt_id=head["attempt_id"],
                                outcome=outcome(1.5)))
        recv_type(peer, "ack")
        with Client(endpoint, timeout=10) as c:
            cid = c.submit(fleet_variant(bpb=1.4), "better")["candidate_id"]
        peer.send(protocol.make("ready", worker_id="w1-early"))
        lease = recv_type(peer, "assign")["attempt_id"]
    with served(fleet_repo, bind=endpoint, heartbeat_interval=0.1, liveness=50) as (core, _):
        peer.send(hello("w1-early"))     # its assign was lost with the old coordinator
        recv_type(peer, "welcome")
        row = core.ledger.attempt(lease)
        assert row["state"] == "cancelled" and "never reached" in row["note"], dict(row)
        assert core.ledger.candidate(cid)["state"] in ("queued", "running")
        peer.send(protocol.make("ready", worker_id="w1-early"))
        assert recv_type(peer, "assign")["candidate_id"] == cid
    peer.close()


# ---- item 1: one hello per coordinator incarnation ------------------------------------------

def test_the_worker_says_hello_once_per_coordinator_incarnation(tmp_path):
    """A scripted coordinator answers every heartbeat with hello_first and welcomes the first
    hello only after a while (as a busy, just-restarted coordinator does); then it "restarts"
    (a new incarnation that knows nobody) and does the same again. A real Agent must send
    exactly one hello to each incarnation, not one per hello_first error."""
    from worker.agent import Agent, AgentConfig

    phase = {"incarnation": "inc-A"}
    knows_at: dict[str, float] = {}   # incarnation -> when it has processed our hello
    hellos: list[tuple[float, str]] = []

    def answer(msg):
        inc, now = phase["incarnation"], time.monotonic()
        if msg["type"] == "hello":
            hellos.append((now, inc))
            knows_at.setdefault(inc, now + 0.8)
            welcome = protocol.make("welcome", heartbeat_interval=0.1, liveness=30,
                                    incarnation=inc)
            return [(max(0.0, knows_at[inc] - now), encode(welcome))]
        if msg["type"] in ("heartbeat", "ready") and now < knows_at.get(inc, float("inf")):
            return [(0, encode(protocol.make("error", code=protocol.ERROR_HELLO_FIRST,
                                             message="unknown here: send hello",
                                             incarnation=inc)))]
        return []

    router = Router(answer)
    said: list[str] = []
    agent = Agent(AgentConfig(router.endpoint, "once", tmp_path / "c", heartbeat_interval=0.1,
                              liveness=30, ready_resend=0.2),
                  {"hw_class": "Test/8GB/cpu"}, event=said.append,
                  run_root=tmp_path / "runs", env={})
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and agent.state != "idle":
            time.sleep(0.02)
        assert agent.state == "idle", said
        time.sleep(0.5)                       # ready + heartbeats: no more hellos
        assert [inc for _, inc in hellos] == ["inc-A"], said
        phase["incarnation"] = "inc-B"        # a restart: nobody is known there
        while time.monotonic() < end and len(hellos) < 2:
            time.sleep(0.02)
        time.sleep(1.5)                       # welcome B after 0.8 s, errors meanwhile
        assert agent.state == "idle", said
        assert [inc for _, inc in hellos] == ["inc-A", "inc-B"], (hellos, said)
    finally:
        agent.interrupts = 2
        thread.join(DEADLINE)
        router.close()


# ---- item 3: after a restart every worker believed alive is watched ------------------------

def test_an_idle_worker_that_died_before_a_restart_is_marked_gone(fleet_repo):
    """An idle worker (no lease) dies; the coordinator restarts before noticing. The new one
    must watch every worker row it believes alive, not only lease holders: after the window
    plus the restart grace the row is gone, not idle forever with a frozen last-seen."""
    with served(fleet_repo, heartbeat_interval=0.1, liveness=50) as (core, server):
        endpoint = server.endpoint
        peer = Peer(endpoint)
        peer.send(hello("w1-idle"))
        recv_type(peer, "welcome")
        peer.close()    # dies idle; the coordinator is gone before its window ends
    events: list[str] = []
    with served(fleet_repo, bind=endpoint, heartbeat_interval=0.1, liveness=3,
                restart_grace=0.3, event=events.append) as (core, server):
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and not any("w1-idle lost" in e for e in events):
            time.sleep(0.05)
        workers = {w["worker_id"] if "worker_id" in w else w["name"]: w
                   for w in core.status()["workers"]}
    assert any("waiting" in e and "w1-idle" in e for e in events), events
    assert any("w1-idle lost: did not return after restart" in e for e in events), events
    assert [w["state"] for w in workers.values()] == ["gone"], workers


# ---- item 2: a failed ledger write in a timer path does not stop the coordinator -----------

def test_a_write_locked_ledger_while_a_worker_goes_silent_is_waited_out(fleet_repo):
    """Another process holds BEGIN IMMEDIATE on the ledger while the only worker goes silent:
    recording the lost lease fails (database is locked) in the server's timer path. The
    coordinator keeps serving, says what it is waiting to record, and records it once the
    lock is gone."""
    from coordinator.ledger import ledger_path
    from coordinator.repo import state_dir

    events: list[str] = []
    with served(fleet_repo, heartbeat_interval=0.1, liveness=3,
                event=events.append) as (core, server):
        core.ledger.db.execute("PRAGMA busy_timeout = 100")   # fail in 0.1 s, not 10 s
        peer = Peer(server.endpoint)
        peer.send(hello("w1-quiet"))
        recv_type(peer, "welcome")
        peer.send(protocol.make("ready", worker_id="w1-quiet"))
        lease = recv_type(peer, "assign")["attempt_id"]
        with write_locked(ledger_path(state_dir(fleet_repo))):
            peer.close()                                    # the only worker goes silent
            end = time.monotonic() + DEADLINE
            while time.monotonic() < end and not any("not yet recorded" in e for e in events):
                time.sleep(0.05)
            waiting = [e for e in events if "not yet recorded" in e]
            assert waiting and "w1-quiet" in waiting[0] and "locked" in waiting[0], events
            time.sleep(1.0)                                 # several failed retries
            assert sum("not yet recorded" in e for e in events) == 1   # said once, not per tick
            with Client(server.endpoint, timeout=10) as c:  # still serving meanwhile
                assert c.query("status")["workers"][0]["state"] != "gone"
            assert core.ledger.attempt(lease)["state"] == "leased"
        while time.monotonic() < end and not any("recorded worker" in e for e in events):
            time.sleep(0.05)
        assert any("recorded worker w1 (w1-quiet) lost" in e for e in events), events
        assert core.ledger.attempt(lease)["state"] == "lost"
        with Client(server.endpoint, timeout=10) as c:
            assert c.query("status")["workers"][0]["state"] == "gone"


# ---- the worker id -> key binding survives a restart ---------------------------------------

class KeyedPeer(Peer):
    """A CURVE DEALER with its own key, pinned to the coordinator's."""

    def __init__(self, endpoint: str, keypair, server_key):
        from shared.dealer import make_dealer
        self.sock = make_dealer(zmq.Context.instance(), endpoint, keypair, server_key)


def test_a_worker_id_stays_bound_to_its_key_across_a_restart(fleet_repo, tmp_path):
    """Right after a restart, before the owner says hello again, another trusted worker key
    must not be able to claim (and so speak for the lease of) its worker id."""
    from coordinator.trust import TrustStore
    from shared.keys import coordinator_key_dir, load_or_create_keypair

    server_kp = load_or_create_keypair(coordinator_key_dir(fleet_repo), "coordinator")
    owner_kp = load_or_create_keypair(tmp_path / "a", "worker")
    other_kp = load_or_create_keypair(tmp_path / "b", "worker")
    with TrustStore.open(fleet_repo) as store:
        store.trust(owner_kp.public, "owner", "worker")
        store.trust(other_kp.public, "other", "worker")
    kw = dict(heartbeat_interval=0.1, liveness=50, keypair=server_kp)
    with served(fleet_repo, **kw) as (core, server):
        endpoint = server.endpoint
        owner = KeyedPeer(endpoint, owner_kp, server_kp.public)
        owner.send(hello("wa-1"))
        recv_type(owner, "welcome")
        other = KeyedPeer(endpoint, other_kp, server_kp.public)
        other.send(hello("wa-1"))
        err = recv_type(other, "error")
        assert err["code"] == "forbidden" and "belongs to another key" in err["message"]
        other.close()
        owner.close()
    with served(fleet_repo, bind=endpoint, **kw) as (core, server):
        other = KeyedPeer(endpoint, other_kp, server_kp.public)
        for msg in (hello("wa-1"), protocol.make("ready", worker_id="wa-1"),
                    protocol.make("result", worker_id="wa-1", attempt_id="0" * 32,
                                  outcome=outcome(1.0))):
            other.send(msg)
            err = recv_type(other, "error")
            assert err["code"] == "forbidden" and "belongs to another key" in err["message"]
        other.close()
        owner = KeyedPeer(endpoint, owner_kp, server_kp.public)
        owner.send(hello("wa-1"))
        assert recv_type(owner, "welcome")["incarnation"] == server.incarnation
        owner.close()


# ---- a worker blocked for a harness mismatch unblocks on a matching welcome ----------------

def test_a_blocked_worker_takes_work_after_a_welcome_that_matches(fleet_repo, tmp_path):
    """The coordinator runs another harness: the worker is blocked. The coordinator is upgraded
    (restarted with the worker's harness): the next welcome matches and the worker asks for,
    and gets, work."""
    from worker.agent import Agent, AgentConfig
    from worker.runner import LowDiskSpace

    started: list[str] = []

    def start(spec, run_root, env):
        started.append(spec.attempt_id)
        raise LowDiskSpace("stand-in: no trainer in this test")

    said: list[str] = []
    with served(fleet_repo, heartbeat_interval=0.1, liveness=50) as (core, server):
        endpoint = server.endpoint
        server.harness_fingerprint = "f" * 64          # an older coordinator release
        agent = Agent(AgentConfig(endpoint, "blk", tmp_path / "c", heartbeat_interval=0.1,
                                  ready_resend=0.2),
                      {"hw_class": "Test/8GB/cpu"}, event=said.append, start_attempt=start,
                      run_root=tmp_path / "runs", env={})
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and agent.state != "blocked":
            time.sleep(0.02)
        assert agent.state == "blocked", said
        time.sleep(0.5)
        assert not started
    try:
        with served(fleet_repo, bind=endpoint, heartbeat_interval=0.1, liveness=50) as _:
            while time.monotonic() < end and not started:
                time.sleep(0.02)
            assert started, said                       # it asked for work and got an assign
            assert any("matches the coordinator's now" in s for s in said), said
    finally:
        agent.interrupts = 2
        thread.join(DEADLINE)


# ---- end to end: the sequence with the real CLI ------------------------------------

@pytest.mark.slow
def test_coordinator_kill9_and_restart_inside_the_window_costs_no_lease(fleet, fleet_variant):
    """Coordinator + one worker as real processes; four variants; while they run, the
    coordinator is kill -9'd and restarted on the same endpoint three times, each time back
    inside the worker's liveness window. The one worker process never dies, so no lease may be
    lost, no result may be stale (a run repeated for nothing) and every variant is decided.
    (The crossing that cost leases here is a race this sequence hits only now and then; the
    tests above force it deterministically. This one checks the whole path end to end.)"""
    from coordinator.core import Coordinator

    slow = ["--heartbeat-interval", "0.2", "--liveness", "25"]    # a 5 s window
    coord, ep = fleet.started_coord()
    coord.stop()
    coord = fleet.coord(ep, *slow)
    coord.wait_for(r"listening on")
    worker = fleet.worker(ep, "w1")
    coord.wait_for(r"result \S+ from \S+: ok val_bpb 1\.5000, accepted")
    # Distinct programs that each change one knob (and none is kept), so no variant conflicts
    # with a keep (coordinator.rebase) and every one runs: what is tested here is the restarts.
    ids = [submit(ep, fleet_variant(sleep=2.0, knob=i + 1), f"v{i}")["candidate_id"]
           for i in range(4)]
    for _ in range(3):
        # a candidate is running: just assigned, or re-attached after the last restart
        coord.wait_for(r"assign \S+ candidate #|joined .*, holding ")
        time.sleep(1.0)
        coord.signal(signal.SIGKILL)
        coord.wait()
        time.sleep(0.5)
        coord = fleet.coord(ep, *slow)
        coord.wait_for(r"listening on")
    coord.wait_for(rf"(KEEP|DISCARD) #{ids[-1]}\b", timeout=90)   # the queue runs in order
    assert worker.p.poll() is None
    coord.stop()
    worker.stop()
    with Coordinator(fleet.repo) as core:
        rows = [dict(r) for r in core.ledger.all("SELECT * FROM attempts")]
        assert all(core.ledger.decision(cid) is not None for cid in ids)
    assert not [r for r in rows if r["state"] == "lost"], rows
    assert not [r for r in rows if r["state"] == "stale"], rows
    # never offered another attempt while busy (a duplicate of the one it runs is harmless)
    assert worker.count(r"ignoring assign (\S+): busy with (?!\1)") == 0, worker.text


def test_the_restart_grace_expiry_waits_out_a_locked_ledger(fleet_repo):
    """The restart-grace expiry writes the ledger from the timer path too: with the ledger
    write-locked by another process when an awaited worker's grace ends, the coordinator keeps
    running, says what it waits to record, and records it once the lock is gone."""
    from coordinator.ledger import ledger_path
    from coordinator.repo import state_dir

    with served(fleet_repo, heartbeat_interval=0.1, liveness=50) as (core, server):
        endpoint = server.endpoint
        peer = Peer(endpoint)
        peer.send(hello("w1-late"))
        recv_type(peer, "welcome")
        peer.close()
    events: list[str] = []
    with served(fleet_repo, bind=endpoint, heartbeat_interval=0.1, liveness=5,
                restart_grace=1.0, event=events.append) as (core, server):
        core.ledger.db.execute("PRAGMA busy_timeout = 100")
        with write_locked(ledger_path(state_dir(fleet_repo))):
            end = time.monotonic() + DEADLINE
            while time.monotonic() < end and not any("not yet recorded" in e for e in events):
                time.sleep(0.05)
            assert any("w1-late" in e and "not yet recorded" in e for e in events), events
            with Client(endpoint, timeout=10) as c:      # still serving
                assert c.query("status")["workers"][0]["state"] != "gone"
        while time.monotonic() < end and not any("recorded worker" in e for e in events):
            time.sleep(0.05)
        assert any("recorded worker w1-late (w1-late) gone: did not return" in e
                   for e in events), events
        assert [w["state"] for w in core.status()["workers"]] == ["gone"]
