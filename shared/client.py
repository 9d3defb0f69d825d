"""Request/reply client for the coordinator: what the CLI, agents and scripts use.

    from shared.client import Client
    c = Client("tcp://127.0.0.1:5555")
    c.submit(open("train.py").read(), "wider MLP")   # -> {"candidate_id": ..., ...}
    c.query("status")                                # -> dict

It lives in ``shared`` because it is the third side of the wire: an agent script needs it and
nothing of the coordinator. Each request carries a fresh ``req_id`` and waits for the reply
with the same id (``shared.dealer.Requester``); one that gets no answer in ``timeout`` seconds
raises ``NoCoordinator``, and the socket is rebuilt so a late reply to the abandoned request can
never be mistaken for the next one.

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
from typing import Any

from shared.dealer import ClientError, NoCoordinator, Requester
from shared.keys import CLIENT_KEY_NAME, default_key_dir, load_or_create_keypair
from shared.pins import find_server_key
from shared.protocol import REQUEST_TIMEOUT

__all__ = ["Client", "ClientError", "NoCoordinator", "DEFAULT_ENDPOINT", "ENDPOINT_ENV",
           "default_endpoint"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
ENDPOINT_ENV = "AUTORESEARCH_COORD"


def default_endpoint() -> str:
    return os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT


class Client:
    def __init__(self, endpoint: str | None = None, timeout: float = REQUEST_TIMEOUT, *,
                 server_key: str | bytes | None = None, keypair: Any = None,
                 insecure: bool = False):
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self.server_key: bytes | None = None
        self.keypair = None
        if not insecure:
            flag = server_key.decode("ascii") if isinstance(server_key, bytes) else server_key
            self.server_key = find_server_key(self.endpoint, flag)
        if self.server_key is not None:
            self.keypair = keypair or load_or_create_keypair(default_key_dir(), CLIENT_KEY_NAME)
        self.requester = Requester(self.endpoint, keypair=self.keypair,
                                   server_key=self.server_key, timeout=timeout)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.requester.close()

    def submit(self, train_py: str, description: str, base: str | None = None,
               origin: dict | None = None) -> dict:
        """Queue a train.py variant. Raises ClientError with the reason if it is refused.
        ``origin``: where it came from ({tool, proposer, host, transcript}), kept with it."""
        extra = {"origin": origin} if origin else {}
        return self.requester.request("submit", train_py=train_py, description=description,
                                      base=base, **extra)

    def enrol(self, token: str, name: str) -> dict:
        """Redeem an invite for this client's key; returns the trust entry."""
        return self.requester.request("enrol", token=token, name=name)

    def query(self, what: str, **args: Any) -> Any:
        """``status`` -> dict, ``log`` (limit=N) -> dict, ``export`` -> results.tsv text."""
        return self.requester.ask(what, args)
