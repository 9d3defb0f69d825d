"""The coordinator's ROUTER loop over real loopback sockets, driven by raw DEALER peers.

The server runs in a thread of the test process over a real ``Coordinator`` (real git, real
SQLite) on a stand-in research repo; peers are bare DEALER sockets speaking msgpack, so every
frame is exactly what the test says. Heartbeats are fast (0.1 s x 3).

``Server`` without a keypair is the plain-TCP (``--insecure``) server, which is what these raw
peers speak; the keyed wire is covered at the end of this file and in test_security_fleet.py.
Every test gets its own key directory (AUTORESEARCH_KEYS): nothing touches ~/.config.
"""
from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from shared.client import Client, ClientError, NoCoordinator
from coordinator.server import Server, is_loopback_endpoint
from shared import protocol
from shared.codec import MAX_FRAME_BYTES, decode, encode

INTERVAL, LIVENESS = 0.1, 3
DEADLINE = 20.0  # only turns a hang into a failure


class Peer:
    """A raw DEALER connected to the server."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else encode(msg))

    def send_parts(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def recv(self, skip=("heartbeat",), timeout: float = DEADLINE) -> dict:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                raise AssertionError("no message from the server")
            msg = decode(self.sock.recv())
            if msg.get("type") not in skip:
                return msg

    def close(self) -> None:
        self.sock.close(linger=0)


class Events(list):
    def wait_for(self, needle: str, timeout: float = DEADLINE) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self):
                if needle in line:
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no event containing {needle!r}; events: {list(self)}")


class Running:
    def __init__(self, repo, bind: str = "tcp://127.0.0.1:*", restart_grace: float = 0.5):
        from coordinator.core import Coordinator

        self.core = Coordinator(repo)
        self.events = Events()
        self.server = Server(self.core, bind=bind, heartbeat_interval=INTERVAL,
                             liveness=LIVENESS, event=self.events.append,
                             restart_grace=restart_grace)
        self.endpoint = self.server.endpoint
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.peers: list[Peer] = []

    def peer(self) -> Peer:
        self.peers.append(Peer(self.endpoint))
        return self.peers[-1]

    def stop(self) -> None:
        for p in self.peers:
            p.close()
        self.server.stop()
        self.thread.join(DEADLINE)
        self.server.close()
        self.core.close()


@pytest.fixture
def running(fleet_repo):
    r = Running(fleet_repo)
    yield r
    r.stop()


def hello(worker_id: str, attempt_id=None, **over) -> dict:
    profile = {"chip": "Test Chip", "backend": "cpu"}
    return protocol.make("hello", worker_id=worker_id, name=worker_id.split("-")[0],
                         profile=profile, hw_class="Test Chip/8GB/cpu/1t",
                         attempt_id=attempt_id, **over)


def outcome(bpb: float) -> dict:
    return {"status": "ok", "val_bpb": bpb, "result": {"status": "ok", "val_bpb": bpb},
            "log_tail": "", "exit_code": 0, "wall_seconds": 0.3, "note": ""}


# ---- hostile and broken input ---------------------------------------------------------------

BAD_FRAMES = [
    (b"\xc1garbage", "bad_frame", "undecodable"),
    (msgpack.packb([1, 2, 3]), "bad_frame", "must be a map"),
    (msgpack.packb({1: "int key"}), "bad_frame", "undecodable"),
    (encode({"type": "launch_missiles", "v": 1, "harness": "1"}), "unknown_type", "launch"),
    (encode(protocol.make("hello")), "bad_field", "missing field 'worker_id'"),
    (encode(protocol.make("ready", worker_id=7)), "bad_field", "expected str"),
    (encode(protocol.make("welcome", heartbeat_interval=1.0, liveness=3)), "unexpected", "welcome"),
    (encode(protocol.make("heartbeat")), "bad_field", "worker_id"),
]


def test_malformed_frames_get_errors_and_the_loop_survives(running):
    peer = running.peer()
    for payload, code, text in BAD_FRAMES:
        peer.send(payload)
        reply = peer.recv()
        assert reply["type"] == "error" and reply["code"] == code, (payload, reply)
        assert text in reply["message"], reply
    peer.send_parts([b"one", b"two"])
    assert peer.recv()["code"] == "bad_frame"
    # A bad query carries its req_id back, so a client can match the refusal.
    peer.send(protocol.make("query", req_id="r1", what="log", args={"limit": "all"}))
    reply = peer.recv()
    assert reply["type"] == "error" and reply["req_id"] == "r1"
    # A frame above the limit never reaches Python: libzmq drops that connection.
    big = running.peer()
    big.send(b"\x00" * (MAX_FRAME_BYTES + 1))
    # Still serving everyone else, including a fresh client.
    with Client(running.endpoint, timeout=5) as c:
        assert isinstance(c.query("status"), dict)
        with pytest.raises(ClientError, match="unknown query"):
            c.query("everything")
    assert any("refused message" in e for e in running.events)


def test_version_mismatch_refused_with_upgrade_message(running):
    peer = running.peer()
    peer.send({**hello("old-1"), "v": protocol.PROTOCOL_VERSION + 1})
    reply = peer.recv()
    assert reply["type"] == "error" and reply["code"] == "version"
    assert "upgrade" in reply["message"]
    peer.send({**hello("old-1"), "harness": "0"})
    reply = peer.recv()
    assert reply["code"] == "version" and "same autoresearch-fleet release" in reply["message"]


def test_unknown_worker_is_told_to_say_hello(running):
    peer = running.peer()
    peer.send(protocol.make("heartbeat", worker_id="ghost-1", attempt_id=None, progress=None))
    assert peer.recv()["code"] == "hello_first"
    peer.send(protocol.make("ready", worker_id="ghost-1"))
    assert peer.recv()["code"] == "hello_first"


def test_client_timeout_names_the_endpoint():
    with zmq.Context.instance().socket(zmq.ROUTER) as silent:  # accepts, never answers
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        ep = f"tcp://127.0.0.1:{port}"
        with pytest.raises(NoCoordinator) as info:
            Client(ep, timeout=0.3).query("status")
    assert str(info.value) == (f"no coordinator answering at {ep} after 0.3 s "
                               "(is `autoresearch-coord start` running?)")


def test_loopback_detection():
    assert is_loopback_endpoint("tcp://127.0.0.1:5555")
    assert is_loopback_endpoint("tcp://localhost:*")
    assert is_loopback_endpoint("tcp://[::1]:5555")
    assert is_loopback_endpoint("ipc:///tmp/x")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5555")
    assert not is_loopback_endpoint("tcp://*:5555")
    assert not is_loopback_endpoint("tcp://192.168.1.10:5555")
    assert not is_loopback_endpoint("tcp://eth0:5555")


# ---- a worker's conversation ----------------------------------------------------------------

def join(running, worker_id: str, attempt_id=None) -> Peer:
    peer = running.peer()
    peer.send(hello(worker_id, attempt_id))
    welcome = peer.recv()
    assert welcome["type"] == "welcome", welcome
    assert welcome["heartbeat_interval"] == INTERVAL and welcome["liveness"] == LIVENESS
    return peer


def take_assignment(peer: Peer, worker_id: str) -> dict:
    peer.send(protocol.make("ready", worker_id=worker_id))
    msg = peer.recv()
    assert msg["type"] == "assign", msg
    return msg


def test_hello_ready_assign_result_ack(running, fleet_train_py):
    peer = join(running, "w1-aaaa")
    head = take_assignment(peer, "w1-aaaa")
    assert head["purpose"] == "head" and head["train_py"] == fleet_train_py
    assert head["settings"] and head["timeout"] > 0
    # Heartbeats both ways; the server's reach the worker every interval.
    peer.send(protocol.make("heartbeat", worker_id="w1-aaaa", attempt_id=head["attempt_id"],
                            progress={"step": 1, "progress": 0.5, "loss": 3.0}))
    assert peer.recv(skip=())["type"] == "heartbeat"
    # A second ready while the attempt is out gets the same assign again, never a second one.
    peer.send(protocol.make("ready", worker_id="w1-aaaa"))
    resent = peer.recv()
    assert resent["type"] == "assign" and resent["attempt_id"] == head["attempt_id"]
    peer.send(protocol.make("result", worker_id="w1-aaaa", attempt_id=head["attempt_id"],
                            outcome=outcome(1.5)))
    ack = peer.recv()
    assert ack == {**ack, "type": "ack", "attempt_id": head["attempt_id"], "accepted": True}
    # The same result again (a worker resending after a lost ack) is acked, not counted twice.
    peer.send(protocol.make("result", worker_id="w1-aaaa", attempt_id=head["attempt_id"],
                            outcome=outcome(1.5)))
    again = peer.recv()
    assert again["type"] == "ack" and again["attempt_id"] == head["attempt_id"]
    running.events.wait_for(f"result {head['attempt_id']} from w1: ok val_bpb 1.5000, accepted")
    assert sum(f"result {head['attempt_id']}" in e and ", accepted" in e
               for e in running.events) <= 2
    peer.send(protocol.make("bye", worker_id="w1-aaaa", reason="done for today"))
    running.events.wait_for("worker w1 left: done for today")


def test_silent_worker_is_lost_and_its_candidate_requeued(running, fleet_variant):
    peer = join(running, "w1-bbbb")
    head = take_assignment(peer, "w1-bbbb")
    peer.send(protocol.make("result", worker_id="w1-bbbb", attempt_id=head["attempt_id"],
                            outcome=outcome(1.5)))
    assert peer.recv()["type"] == "ack"
    with Client(running.endpoint, timeout=5) as c:
        cand = c.submit(fleet_variant(bpb=1.4), "better")["candidate_id"]
    got = take_assignment(peer, "w1-bbbb")
    assert got["candidate_id"] == cand and got["purpose"] == "candidate"
    # Now silence: after interval * liveness the lease is lost and the candidate requeued.
    line = running.events.wait_for("w1 (w1-bbbb) lost")
    assert f"requeued #{cand}" in line
    # A late result for the lost attempt is stored as stale, not counted.
    peer.send(protocol.make("result", worker_id="w1-bbbb", attempt_id=got["attempt_id"],
                            outcome=outcome(1.4)))
    late = peer.recv()
    assert late["type"] == "ack" and late["accepted"] is False
    # Saying hello again gets the requeued candidate back.
    peer2 = join(running, "w1-bbbb")
    again = take_assignment(peer2, "w1-bbbb")
    assert again["candidate_id"] == cand and again["attempt_id"] != got["attempt_id"]


def test_reconnect_with_new_identity_replaces_the_old_mapping(running):
    first = join(running, "w1-cccc")
    head = take_assignment(first, "w1-cccc")
    # The worker presumed us dead, opened a new socket and says hello with its attempt.
    second = join(running, "w1-cccc", attempt_id=head["attempt_id"])
    assert not any("cancel" in e for e in running.events)
    # Server heartbeats now go to the new socket only; keep it alive and watch the old one.
    while first.sock.poll(0):
        first.sock.recv()  # anything queued before the switch
    to_old, to_new = 0, 0
    stop = time.monotonic() + 3 * INTERVAL * LIVENESS
    while time.monotonic() < stop:
        second.send(protocol.make("heartbeat", worker_id="w1-cccc",
                                  attempt_id=head["attempt_id"], progress=None))
        time.sleep(INTERVAL / 2)
        while first.sock.poll(0):
            first.sock.recv()
            to_old += 1
        while second.sock.poll(0):
            second.sock.recv()
            to_new += 1
    assert to_old == 0 and to_new >= 2
    assert not any("lost" in e for e in running.events)
    second.send(protocol.make("result", worker_id="w1-cccc", attempt_id=head["attempt_id"],
                              outcome=outcome(1.5)))
    assert second.recv()["accepted"] is True


def test_hello_with_an_attempt_it_no_longer_holds_is_cancelled(running):
    peer = join(running, "w1-dddd")
    peer.send(hello("w1-dddd", attempt_id="0123456789abcdef"))
    msgs = [peer.recv(), peer.recv()]
    assert msgs[0]["type"] == "welcome"
    assert msgs[1]["type"] == "cancel" and msgs[1]["attempt_id"] == "0123456789abcdef"


def test_lost_assign_is_resent_when_the_worker_says_ready(running):
    # ZeroMQ re-makes a dropped TCP connection silently and drops what was queued on the old
    # one: the worker never sees its assign and keeps saying ready. It must get the same
    # assign again, not a second lease and not silence.
    peer = join(running, "w1-lost")
    first = take_assignment(peer, "w1-lost")       # "lost": the peer acts as if it never came
    again = take_assignment(peer, "w1-lost")
    assert again["attempt_id"] == first["attempt_id"] and again["train_py"] == first["train_py"]
    running.events.wait_for(f"re-sent assign {first['attempt_id']}")
    peer.send(protocol.make("result", worker_id="w1-lost", attempt_id=first["attempt_id"],
                            outcome=outcome(1.5)))
    assert peer.recv()["accepted"] is True


def test_restart_gives_leased_workers_one_window(fleet_repo):
    first = Running(fleet_repo)
    try:
        head = take_assignment(join(first, "w1-eeee"), "w1-eeee")
    finally:
        first.stop()
    # Same repo, new server: the lease is remembered and w1 returns in time to keep it.
    second = Running(fleet_repo)
    try:
        second.events.wait_for("waiting")
        back = join(second, "w1-eeee", attempt_id=head["attempt_id"])
        back.send(protocol.make("result", worker_id="w1-eeee", attempt_id=head["attempt_id"],
                                outcome=outcome(1.5)))
        assert back.recv()["accepted"] is True
    finally:
        second.stop()


def test_restart_loses_workers_that_do_not_return(fleet_repo, fleet_variant):
    first = Running(fleet_repo)
    try:
        peer = join(first, "w9-ffff")
        head = take_assignment(peer, "w9-ffff")
        peer.send(protocol.make("result", worker_id="w9-ffff", attempt_id=head["attempt_id"],
                                outcome=outcome(1.5)))
        assert peer.recv()["accepted"] is True
        with Client(first.endpoint, timeout=5) as c:
            cand = c.submit(fleet_variant(bpb=1.3), "never finished")["candidate_id"]
        assert take_assignment(peer, "w9-ffff")["candidate_id"] == cand
    finally:
        first.stop()
    second = Running(fleet_repo)
    try:
        line = second.events.wait_for("w9-ffff lost: did not return after restart")
        assert f"requeued #{cand}" in line
        # Our restart is not the candidate's fault: the lease is cancelled, not lost (no strike).
        states = [r[0] for r in second.core.ledger.all(
            "SELECT state FROM attempts WHERE candidate_id = ?", cand)]
        assert states == ["cancelled"]
    finally:
        second.stop()


# ---- CLI surface --------------------------------------------------------------------------

def test_every_command_has_help():
    from click.testing import CliRunner

    from coordinator.cli import main as coord
    from worker.cli import main as worker

    runner = CliRunner()
    for group in (coord, worker):
        assert runner.invoke(group, ["--help"]).exit_code == 0
        for name in group.commands:
            result = runner.invoke(group, [name, "--help"])
            assert result.exit_code == 0 and "Usage:" in result.output, (name, result.output)
    assert {"init", "start", "submit", "status", "log", "export", "key", "trust", "revoke",
            "keys", "invite", "enrol"} <= set(coord.commands)
    assert {"join", "profile", "key"} <= set(worker.commands)


def test_init_and_profile_commands(tmp_path, fleet_train_py):
    from click.testing import CliRunner

    from coordinator.cli import main as coord
    from worker.cli import main as worker

    base = tmp_path / "base.py"
    base.write_text(fleet_train_py)
    runner = CliRunner()
    made = runner.invoke(coord, ["init", str(tmp_path / "r"), "--tag", "t1", "--preset", "tiny",
                                 "--budget", "7", "--train-py", str(base)])
    assert made.exit_code == 0, made.output
    assert "autoresearch/t1" in made.output and "time_budget" in made.output
    # init made the coordinator's keypair, secret readable by the owner only
    secret = tmp_path / "r" / ".autoresearch" / "keys" / "coordinator.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert "server key" in made.output
    # Same directory, different settings: refused with the reason, exit 1.
    again = runner.invoke(coord, ["init", str(tmp_path / "r"), "--tag", "t1", "--preset", "tiny",
                                  "--budget", "8", "--train-py", str(base)])
    assert again.exit_code == 1 and "time_budget" in again.output
    prof = runner.invoke(worker, ["profile", "--threads", "1"])
    assert prof.exit_code == 0 and "hardware class:" in prof.output


# ---- keyed wire (CURVE + trust list) in process ---------------------------------------------

def test_keyed_server_checks_every_message(fleet_repo, tmp_path):
    """A CURVE server: an untrusted client is told its key and the trust command; once
    trusted as submitter it may query status but not say hello; a pinned client to the
    wrong key gets the 'does not have the pinned key' error."""
    from coordinator.core import Coordinator
    from coordinator.trust import TrustStore
    from shared.keys import coordinator_key_dir, load_or_create_keypair

    server_kp = load_or_create_keypair(coordinator_key_dir(fleet_repo), "coordinator")
    client_kp = load_or_create_keypair(tmp_path / "k", "client")
    core = Coordinator(fleet_repo)
    events = Events()
    server = Server(core, bind="tcp://127.0.0.1:*", heartbeat_interval=INTERVAL,
                    liveness=LIVENESS, event=events.append, keypair=server_kp)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        with Client(server.endpoint, timeout=5, server_key=server_kp.public,
                    keypair=client_kp) as c:
            with pytest.raises(ClientError, match="does not trust your key") as err:
                c.query("status")
            assert client_kp.public_str in str(err.value)
            assert "autoresearch-coord trust" in str(err.value)
            with TrustStore.open(fleet_repo) as store:
                store.trust(client_kp.public, "alice", "submitter")
            data = c.query("status")
            assert data["security"] == "curve"
            assert {"name": "alice", "role": "submitter"}.items() <= data["trusted"][0].items()
            with pytest.raises(ClientError, match="forbidden"):
                c.requester.request("hello", worker_id="x-1", name="x", profile={}, hw_class="c",
                                    attempt_id=None)
        wrong = load_or_create_keypair(tmp_path / "k", "other").public
        with pytest.raises(NoCoordinator, match="does not have the pinned key"):
            Client(server.endpoint, timeout=1.0, server_key=wrong, keypair=client_kp) \
                .query("status")
    finally:
        server.stop()
        t.join(DEADLINE)
        server.close()
        core.close()
