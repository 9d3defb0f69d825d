"""Request/reply client for the coordinator: what the CLI, agents and scripts use.

    from coordinator.client import Client
    c = Client("tcp://127.0.0.1:5555")
    c.submit(open("train.py").read(), "wider MLP")   # -> {"candidate_id": ..., ...}
    c.query("status")                                # -> dict

A DEALER socket sends one request carrying a fresh ``req_id`` and waits for the reply with the
same id (replies to earlier, abandoned requests are skipped). A request that gets no answer in
``timeout`` seconds raises ``NoCoordinator``; the socket is then rebuilt so a late reply to the
abandoned request can never be mistaken for the next one.

Keys: ``Client(endpoint, server_key=KEY)`` talks CURVE with this user's client keypair
(``shared.keys.default_key_dir()/client``, created on first use), pinned to the coordinator's
public key. Without ``server_key`` the key is looked up as ``shared.pins`` describes
($AUTORESEARCH_SERVER_KEY, then the pin for the endpoint); if none is found, or with
``insecure=True``, the client speaks plain TCP (what a coordinator started with ``--insecure``
expects). The CLI is stricter: it refuses to guess and asks for ``--server-key`` or
``--insecure``. A coordinator that does not hold the pinned key never completes the handshake;
the timeout error then says so instead of "no coordinator answering".
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Any

import zmq

from shared import protocol
from shared.codec import MAX_FRAME_BYTES, CodecError, decode, encode
from shared.protocol import REQUEST_TIMEOUT, ProtocolError

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
ENDPOINT_ENV = "AUTORESEARCH_COORD"


def default_endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


class ClientError(RuntimeError):
    """The coordinator answered, but with a refusal or an error."""


class NoCoordinator(ClientError):
    """Nothing answered in time."""


def make_dealer(ctx: zmq.Context, endpoint: str, keypair: Any = None,
                server_key: str | bytes | None = None, monitor: bool = False):
    """Create and connect a DEALER, a CURVE client pinned to ``server_key`` when a keypair is
    given. With ``monitor`` returns (socket, HandshakeMonitor)."""
    from shared.keys import HandshakeMonitor, configure_client

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if keypair is not None:
        configure_client(sock, keypair, server_key)
    mon = HandshakeMonitor(sock) if monitor else None
    sock.connect(endpoint)
    return (sock, mon) if monitor else sock


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = REQUEST_TIMEOUT, *,
                 server_key: str | bytes | None = None, keypair: Any = None,
                 insecure: bool = False):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.monitor = None
        self.server_key: bytes | None = None
        self.keypair = None
        if not insecure:
            from shared.pins import find_server_key

            flag = server_key.decode("ascii") if isinstance(server_key, bytes) else server_key
            self.server_key = find_server_key(self.endpoint, flag)
        if self.server_key is not None:
            from shared.keys import CLIENT_KEY_NAME, default_key_dir, load_or_create_keypair

            self.keypair = keypair or load_or_create_keypair(default_key_dir(), CLIENT_KEY_NAME)

    def __enter__(self) -> "Client":
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

    def _no_answer(self) -> str:
        state = self.monitor.poll(0) if self.monitor is not None else "connecting"
        if state == "server_key" and self.server_key is not None:
            from shared.keys import fingerprint
            return (f"the coordinator at {self.endpoint} does not have the pinned key "
                    f"{fingerprint(self.server_key)} (or runs with --insecure): refusing to "
                    "talk to it; check --server-key / the pin in known_coordinators.json")
        if state == "server_key":
            return (f"the coordinator at {self.endpoint} requires CURVE keys: pass --server-key "
                    "KEY (printed by `autoresearch-coord start`) instead of --insecure")
        return (f"no coordinator answering at {self.endpoint} after {self.timeout:g} s "
                "(is `autoresearch-coord start` running?)")

    # ---- requests -----------------------------------------------------------------------

    def submit(self, train_py: str, description: str, base: str | None = None) -> dict:
        """Queue a train.py variant. Raises ClientError with the reason if it is refused."""
        return self._request("submit", train_py=train_py, description=description, base=base)

    def enrol(self, token: str, name: str) -> dict:
        """Redeem an invite for this client's key; returns the trust entry."""
        return self._request("enrol", token=token, name=name)

    def query(self, what: str, **args: Any) -> Any:
        """``status`` -> dict, ``log`` (limit=N) -> dict, ``export`` -> results.tsv text."""
        return self._request("query", what=what, args=args)

    def _request(self, type_: str, **fields: Any) -> Any:
        if self.sock is None:
            self.sock, self.monitor = make_dealer(self.ctx, self.endpoint, self.keypair,
                                                  self.server_key, monitor=True)
        req_id = uuid.uuid4().hex
        self.sock.send(encode(protocol.make(type_, req_id=req_id, **fields)))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                text = self._no_answer()
                self.close()
                raise NoCoordinator(text)
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
                text = data.get("error") if isinstance(data, dict) else data
                raise ClientError(str(text))
            return msg["data"]
