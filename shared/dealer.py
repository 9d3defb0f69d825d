"""One DEALER socket to the coordinator, and request/reply over it.

Every peer of the coordinator's ROUTER is a DEALER made by ``make_dealer``: the worker's main
link, its dataset fetch, the CLI client (``shared.client``) and the agents' proposers. Each is
a CURVE client pinned to the coordinator's public key when a keypair is given (plain TCP for a
coordinator started with ``--insecure`` otherwise), with LINGER 0 and the codec's frame limit.

``Requester`` is the one request/reply loop: send a message carrying a fresh ``req_id``, wait
for the ``reply`` (or ``error``) with the same id, skipping replies to earlier, abandoned
requests and stray heartbeats. A request that gets no answer in ``timeout`` seconds is sent
again on a fresh socket (``retries`` times in all), because a late reply to the abandoned
request must never be mistaken for the next one; then ``NoCoordinator`` says why nothing
answered -- the handshake monitor tells "the machine there does not hold the pinned key" from
"nothing is listening".
"""
from __future__ import annotations

import time
import uuid
from typing import Any

import zmq

from shared import protocol
from shared.codec import MAX_FRAME_BYTES, CodecError, decode, encode
from shared.keys import HandshakeMonitor, configure_client, fingerprint
from shared.protocol import REQUEST_TIMEOUT, ProtocolError


class ClientError(RuntimeError):
    """The coordinator answered, but with a refusal or an error (or in a language we do not
    speak: another protocol version)."""


class NoCoordinator(ClientError):
    """Nothing answered in time."""


def make_dealer(ctx: zmq.Context, endpoint: str, keypair: Any = None,
                server_key: str | bytes | None = None, monitor: bool = False):
    """Create and connect a DEALER, a CURVE client pinned to ``server_key`` when a keypair is
    given. With ``monitor`` returns (socket, HandshakeMonitor): the monitor must watch the
    socket before it connects, or the handshake's outcome is missed."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # Frames above the codec's limit are dropped by libzmq before they reach Python.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if keypair is not None:
        configure_client(sock, keypair, server_key)
    mon = HandshakeMonitor(sock) if monitor else None
    sock.connect(endpoint)
    return (sock, mon) if monitor else sock


class Requester:
    """Request/reply with the coordinator over a DEALER of its own (made on first use)."""

    def __init__(self, endpoint: str, *, keypair: Any = None,
                 server_key: str | bytes | None = None, timeout: float = REQUEST_TIMEOUT,
                 retries: int = 1, ctx: zmq.Context | None = None):
        self.endpoint, self.keypair, self.server_key = endpoint, keypair, server_key
        self.timeout, self.retries = timeout, max(1, retries)
        self.ctx = ctx or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.monitor: HandshakeMonitor | None = None

    def __enter__(self) -> "Requester":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def ask(self, what: str, args: dict) -> Any:
        """``query what args`` -> the reply's data (the shape ``shared.datasync`` asks with)."""
        return self.request("query", what=what, args=args)

    def request(self, type_: str, **fields: Any) -> Any:
        """Send one request; return the reply's data. ClientError when the coordinator refuses
        (an ``error``, or a reply with ok false: the message is its ``error``), NoCoordinator
        when ``retries`` sends in a row get no answer."""
        for attempt in range(self.retries):
            if attempt:
                self.close()   # a late reply to the abandoned request must never answer this one
            if self.sock is None:
                self.sock, self.monitor = make_dealer(self.ctx, self.endpoint, self.keypair,
                                                      self.server_key, monitor=True)
            req_id = uuid.uuid4().hex
            self.sock.send(encode(protocol.make(type_, req_id=req_id, **fields)))
            answered, data = self._await(req_id)
            if answered:
                return data
        text = self.no_answer()
        self.close()
        raise NoCoordinator(text)

    def _await(self, req_id: str) -> tuple[bool, Any]:
        """(True, data of the reply to ``req_id``), or (False, None) after ``timeout``."""
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                return False, None
            try:
                msg = protocol.validate(decode(self.sock.recv()))
            except ProtocolError as exc:
                self.close()
                raise ClientError(f"coordinator at {self.endpoint}: {exc}") from None
            except CodecError:
                continue  # garbage from somewhere: keep waiting for our reply
            if msg.get("req_id") != req_id:
                continue  # a reply to an abandoned request, or a stray heartbeat
            if msg["type"] == "error":
                raise ClientError(f"coordinator refused the request ({msg['code']}): "
                                  f"{msg['message']}")
            if msg["type"] != "reply":
                continue
            if not msg["ok"]:
                data = msg["data"]
                raise ClientError(str(data.get("error") if isinstance(data, dict) else data))
            return True, msg["data"]

    def no_answer(self) -> str:
        """Why nothing answered, from what the handshake monitor saw."""
        state = self.monitor.poll(0) if self.monitor is not None else "connecting"
        if state == "server_key" and self.server_key is not None:
            return (f"the coordinator at {self.endpoint} does not have the pinned key "
                    f"{fingerprint(self.server_key)} (or runs with --insecure): refusing to "
                    "talk to it; check --server-key / the pin in known_coordinators.json")
        if state == "server_key":
            return (f"the coordinator at {self.endpoint} requires CURVE keys: pass --server-key "
                    "KEY (printed by `autoresearch-coord start`) instead of --insecure")
        tries = f" ({self.retries} tries)" if self.retries > 1 else ""
        return (f"no coordinator answering at {self.endpoint} after {self.timeout:g} s{tries} "
                "(is `autoresearch-coord start` running?)")
