"""Request/reply client for the coordinator: what the CLI, agents and scripts use.

    from coordinator.client import Client
    c = Client("tcp://127.0.0.1:5555")
    c.submit(open("train.py").read(), "wider MLP")   # -> {"candidate_id": ..., ...}
    c.query("status")                                # -> dict

A DEALER socket sends one request carrying a fresh ``req_id`` and waits for the reply with the
same id (replies to earlier, abandoned requests are skipped). A request that gets no answer in
``timeout`` seconds raises ``NoCoordinator``; the socket is then rebuilt so a late reply to the
abandoned request can never be mistaken for the next one.
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


def make_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """Create and connect a DEALER; the one place to add CURVE client keys later."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.connect(endpoint)
    return sock


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = REQUEST_TIMEOUT):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    # ---- requests -----------------------------------------------------------------------

    def submit(self, train_py: str, description: str, base: str | None = None) -> dict:
        """Queue a train.py variant. Raises ClientError with the reason if it is refused."""
        return self._request("submit", train_py=train_py, description=description, base=base)

    def query(self, what: str, **args: Any) -> Any:
        """``status`` -> dict, ``log`` (limit=N) -> dict, ``export`` -> results.tsv text."""
        return self._request("query", what=what, args=args)

    def _request(self, type_: str, **fields: Any) -> Any:
        if self.sock is None:
            self.sock = make_dealer(self.ctx, self.endpoint)
        req_id = uuid.uuid4().hex
        self.sock.send(encode(protocol.make(type_, req_id=req_id, **fields)))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                self.close()
                raise NoCoordinator(
                    f"no coordinator answering at {self.endpoint} after {self.timeout:g} s "
                    "(is `autoresearch-coord start` running?)")
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
                raise ClientError(f"coordinator refused the request: {msg['message']}")
            if msg["type"] != "reply":
                continue
            if not msg["ok"]:
                data = msg["data"]
                text = data.get("error") if isinstance(data, dict) else data
                raise ClientError(str(text))
            return msg["data"]
