"""shared.dealer over real loopback sockets: the DEALER factory and the request/reply loop.

A scripted ROUTER in a thread plays the coordinator: each request it receives is answered by a
function of the test (reply, refuse, stay silent, answer late, send noise first), so every frame
the Requester sees is exactly what the test says.
"""
from __future__ import annotations

import threading
import time

import pytest
import zmq

from shared import keys, protocol
from shared.codec import MAX_FRAME_BYTES, decode, encode
from shared.dealer import ClientError, NoCoordinator, Requester, make_dealer


class Router:
    """A ROUTER on a random loopback port; ``answer(msg) -> list of (delay_s, frame)``."""

    def __init__(self, answer, keypair=None):
        self.ctx = zmq.Context()
        self.auth = None
        if keypair is not None:
            from coordinator.trust import FleetAuthenticator
            self.auth = FleetAuthenticator(self.ctx)
            self.auth.start()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        if keypair is not None:
            keys.configure_server(self.sock, keypair)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.answer, self.seen, self.stop = answer, [], False
        self.identities: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        later: list[tuple[float, bytes, bytes]] = []
        while not self.stop:
            if self.sock.poll(20):
                ident, raw = self.sock.recv_multipart()
                msg = decode(raw)
                self.seen.append(msg)
                self.identities.append(ident)
                for delay, frame in self.answer(msg):
                    later.append((time.monotonic() + delay, ident, frame))
            now = time.monotonic()
            for item in [x for x in later if x[0] <= now]:
                later.remove(item)
                self.sock.send_multipart([item[1], item[2]])

    def close(self) -> None:
        self.stop = True
        self.thread.join(10)
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def reply(msg, data, ok=True, delay=0.0):
    return (delay, encode(protocol.make("reply", req_id=msg["req_id"], ok=ok, data=data)))


@pytest.fixture
def router_factory():
    made = []

    def make(answer, keypair=None):
        r = Router(answer, keypair)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_reply_data_is_returned_and_noise_before_it_is_skipped(router_factory):
    def answer(msg):
        return [(0, encode(protocol.make("heartbeat"))),                       # stray heartbeat
                (0, b"\xc1 not msgpack"),                                      # garbage frame
                (0, encode(protocol.make("reply", req_id="someone-else", ok=True, data=1))),
                reply(msg, {"echo": msg.get("what", msg["type"]), "args": msg.get("args")})]
    r = router_factory(answer)
    with Requester(r.endpoint, timeout=10) as req:
        assert req.ask("status", {"n": 3}) == {"echo": "status", "args": {"n": 3}}
        assert req.request("submit", train_py="x", description="d", base=None)["echo"] \
            == "submit"
    assert [m["type"] for m in r.seen] == ["query", "submit"]
    assert all(m["v"] == protocol.PROTOCOL_VERSION and m["req_id"] for m in r.seen)


def test_refusals_raise_client_error_with_the_coordinators_words(router_factory):
    def answer(msg):
        if msg["what"] == "keys":
            return [(0, encode(protocol.make("error", req_id=msg["req_id"], code="forbidden",
                                             message="role submitter may not")))]
        return [reply(msg, {"error": "this coordinator serves no dataset"}, ok=False)]
    r = router_factory(answer)
    with Requester(r.endpoint, timeout=10) as req:
        with pytest.raises(ClientError, match=r"refused the request \(forbidden\): role submitter"):
            req.ask("keys", {})
        with pytest.raises(ClientError, match="^this coordinator serves no dataset$"):
            req.ask("dataset_manifest", {})


def test_other_protocol_version_is_an_error_not_a_wait(router_factory):
    def answer(msg):
        bad = dict(protocol.make("reply", req_id=msg["req_id"], ok=True, data=1),
                   v=protocol.PROTOCOL_VERSION + 1)
        return [(0, encode(bad))]
    r = router_factory(answer)
    with Requester(r.endpoint, timeout=10) as req:
        with pytest.raises(ClientError, match="protocol version"):
            req.ask("status", {})
        assert req.sock is None   # closed: the next request starts clean


def test_silence_raises_no_coordinator_after_every_try(router_factory):
    r = router_factory(lambda msg: [])
    with Requester(r.endpoint, timeout=0.3, retries=2) as req:
        with pytest.raises(NoCoordinator) as info:
            req.ask("status", {})
    assert str(info.value) == (f"no coordinator answering at {r.endpoint} after 0.3 s (2 tries) "
                               "(is `autoresearch-coord start` running?)")
    assert len(r.seen) == 2 and len(set(r.identities)) == 2   # each try on a fresh socket


def test_a_late_reply_never_answers_the_next_request(router_factory):
    """The first request is answered only after the Requester gave up on it; the retry (on a
    fresh socket) must get its own answer, and the next request its own too."""
    def answer(msg):
        n = len(r.seen)
        if n == 1:
            return [reply(msg, "late answer to try 1", delay=0.8)]
        return [reply(msg, f"answer {n}")]
    r = router_factory(answer)
    with Requester(r.endpoint, timeout=0.4, retries=2) as req:
        assert req.ask("status", {}) == "answer 2"
        time.sleep(0.8)   # the late reply is sent now, to the abandoned socket's identity
        assert req.ask("status", {}) == "answer 3"
    assert r.seen[0]["req_id"] != r.seen[1]["req_id"]


def test_curve_dealer_talks_to_the_pinned_key_and_names_an_impostor(router_factory, tmp_path):
    server_kp = keys.load_or_create_keypair(tmp_path / "s", "coordinator")
    client_kp = keys.load_or_create_keypair(tmp_path / "c", "client")
    other = keys.load_or_create_keypair(tmp_path / "o", "other")
    r = router_factory(lambda msg: [reply(msg, "over curve")], keypair=server_kp)
    with Requester(r.endpoint, keypair=client_kp, server_key=server_kp.public,
                   timeout=10) as req:
        assert req.ask("status", {}) == "over curve"
    with Requester(r.endpoint, keypair=client_kp, server_key=other.public, timeout=1) as req:
        with pytest.raises(NoCoordinator, match="does not have the pinned key"):
            req.ask("status", {})
    with Requester(r.endpoint, timeout=1) as req:   # plain TCP to a CURVE server
        with pytest.raises(NoCoordinator, match="requires CURVE keys"):
            req.ask("status", {})


def test_make_dealer_sets_the_frame_limit_and_no_linger(router_factory):
    r = router_factory(lambda msg: [])
    ctx = zmq.Context.instance()
    sock, mon = make_dealer(ctx, r.endpoint, monitor=True)
    try:
        assert sock.getsockopt(zmq.LINGER) == 0
        assert sock.getsockopt(zmq.MAXMSGSIZE) == MAX_FRAME_BYTES
        assert sock.type == zmq.DEALER
    finally:
        mon.close()
        sock.close(0)
