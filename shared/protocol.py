"""The messages coordinator, workers and clients exchange, and their validation.

Wire shape: ZeroMQ ROUTER (coordinator) <-> DEALER (workers, clients); one msgpack map per
frame (see ``shared.codec``). Every map carries an envelope:

    type     str   one of MESSAGES below
    v        int   PROTOCOL_VERSION of the sender
    harness  str   HARNESS_VERSION of the sender

Reliability follows the zguide's Paranoid Pirate: both sides send HEARTBEAT at least every
``HEARTBEAT_INTERVAL`` seconds while they have nothing else to say; a peer silent for
``HEARTBEAT_LIVENESS`` intervals is dead. Workers reconnect with exponential backoff from
``RECONNECT_INITIAL`` to ``RECONNECT_MAX``. Every worker message carries ``worker_id`` so the
coordinator recognises a worker across reconnects and across its own restarts.

Conversation of one worker:

    worker                          coordinator
    hello(worker_id, profile, ...)  ->
                                    <- welcome(...)            (or error: version mismatch)
    ready                           ->
                                    <- assign(attempt_id, train_py, settings, timeout)
    heartbeat(attempt_id, progress) ->  (every interval while training)
                                    <- heartbeat
    result(attempt_id, outcome)     ->
                                    <- ack(attempt_id, accepted)
    ready                           ->  ...

Clients (``autoresearch-coord submit/status/log/export``) send a request carrying ``req_id``
and wait for the reply carrying the same ``req_id``.

With keys (the default), every message is judged by the coordinator's trust list
(coordinator.trust): an unknown key may only ``enrol`` (redeem an invite; answered with
``reply``), and other refusals are ``error`` codes untrusted / revoked / forbidden. ``hello`` and
``ready`` may carry the worker's harness_fingerprint and dataset_hash, ``welcome`` the
coordinator's (plus dataset_name); a mismatch is answered with ``error`` code ``mismatch`` instead
of work. Workers fetch the dataset with ``query`` what=dataset_manifest / dataset_chunk
(shared.datasync) and ask what=harness for per-file harness hashes.
"""
from __future__ import annotations

from typing import Any

from shared.versions import HARNESS_VERSION, PROTOCOL_VERSION

HEARTBEAT_INTERVAL = 1.0   # seconds between heartbeats when otherwise silent
HEARTBEAT_LIVENESS = 5     # intervals of silence before a peer is declared dead
RECONNECT_INITIAL = 1.0    # first reconnect backoff, seconds
RECONNECT_MAX = 32.0       # backoff cap, seconds
REQUEST_TIMEOUT = 10.0     # how long a client waits for a reply

NUM = (int, float)
OPT_STR = (str, type(None))
OPT_NUM = (int, float, type(None))
OPT_MAP = (dict, type(None))

# type -> {field: accepted python types}. Fields listed are required; extra fields are
# ignored (forward compatibility within one protocol version).
MESSAGES: dict[str, dict[str, tuple]] = {
    # worker -> coordinator
    "hello": {"worker_id": (str,), "name": (str,), "profile": (dict,), "hw_class": (str,),
              "attempt_id": OPT_STR},
    "ready": {"worker_id": (str,)},
    "heartbeat": {},  # workers add worker_id, attempt_id, progress (see WORKER_HEARTBEAT)
    # outcome: shared.outcome.Outcome.to_wire() (read back with Outcome.from_wire, untrusted)
    "result": {"worker_id": (str,), "attempt_id": (str,), "outcome": (dict,)},
    "bye": {"worker_id": (str,), "reason": (str,)},
    # coordinator -> worker
    "welcome": {"heartbeat_interval": NUM, "liveness": (int,)},
    "assign": {"attempt_id": (str,), "candidate_id": (int,), "commit": (str,),
               "train_py": (str,), "settings": (dict,), "timeout": NUM},
    "ack": {"attempt_id": (str,), "accepted": (bool,), "note": (str,)},
    "cancel": {"attempt_id": (str,), "reason": (str,)},
    "error": {"code": (str,), "message": (str,)},
    # client <-> coordinator
    "submit": {"req_id": (str,), "train_py": (str,), "description": (str,), "base": OPT_STR},
    "query": {"req_id": (str,), "what": (str,), "args": (dict,)},
    "reply": {"req_id": (str,), "ok": (bool,), "data": (object,)},
    # unknown key -> coordinator: redeem an invite (coordinator.trust); answered with reply
    "enrol": {"req_id": (str,), "token": (str,), "name": (str,)},
}

# Optional fields that, when present, must have these types.
OPTIONAL: dict[str, dict[str, tuple]] = {
    "heartbeat": {"worker_id": (str,), "attempt_id": OPT_STR, "progress": OPT_MAP},
    "error": {"req_id": (str,)},
    "assign": {"purpose": (str,)},   # "head" (measure the head on this class) | "candidate"
    # What the worker will train with; the coordinator gives no work on a mismatch (error
    # "mismatch"). dataset_hash null = it holds none of the coordinator's yet.
    "hello": {"harness_fingerprint": (str,), "dataset_hash": OPT_STR},
    "ready": {"harness_fingerprint": (str,), "dataset_hash": OPT_STR},
    # What the coordinator runs: its harness fingerprint (shared.datasync) and, when it serves a
    # dataset, that dataset's hash and name (workers fetch it with query dataset_manifest/chunk).
    "welcome": {"harness_fingerprint": (str,), "dataset_hash": (str,), "dataset_name": (str,)},
}

# ``error`` code a coordinator sends to a worker it does not know (it restarted, or the worker's
# lease was lost): the worker answers with ``hello`` carrying the attempt it holds.
ERROR_HELLO_FIRST = "hello_first"

# ``error`` codes of the security and data layer (coordinator.trust, coordinator.server):
# untrusted (key not on the trust list: message carries the key and the admin command),
# revoked, forbidden (role may not send this), mismatch (harness or dataset differs: no work).
ERROR_UNTRUSTED = "untrusted"
ERROR_REVOKED = "revoked"
ERROR_FORBIDDEN = "forbidden"
ERROR_MISMATCH = "mismatch"


class ProtocolError(ValueError):
    """A decoded map is not a valid message. ``code`` is sent back to the peer."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def make(type_: str, **fields: Any) -> dict:
    """Build a message with the envelope filled in."""
    return {"type": type_, "v": PROTOCOL_VERSION, "harness": HARNESS_VERSION, **fields}


def validate(msg: dict) -> dict:
    """Check envelope and field types; return ``msg`` or raise ProtocolError.

    Version mismatches raise code ``version`` with a message that says what to upgrade.
    """
    t = msg.get("type")
    if not isinstance(t, str) or t not in MESSAGES:
        raise ProtocolError("unknown_type", f"unknown message type {t!r}")
    v = msg.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            "version",
            f"protocol version {v!r} from peer, this side speaks {PROTOCOL_VERSION}: "
            "upgrade autoresearch-fleet on the older machine so both match",
        )
    h = msg.get("harness")
    if h != HARNESS_VERSION:
        raise ProtocolError(
            "version",
            f"harness version {h!r} from peer, this side has {HARNESS_VERSION}: "
            "install the same autoresearch-fleet release on every machine",
        )
    for fields, required in ((MESSAGES[t], True), (OPTIONAL.get(t, {}), False)):
        for name, types in fields.items():
            if name not in msg:
                if required:
                    raise ProtocolError("bad_field", f"{t}: missing field {name!r}")
                continue
            value = msg[name]
            # bool is an int subclass: never accept True where a number is wanted.
            if isinstance(value, bool) and bool not in types and object not in types:
                raise ProtocolError("bad_field", f"{t}.{name}: expected {_names(types)}, got bool")
            if not isinstance(value, types):
                raise ProtocolError(
                    "bad_field", f"{t}.{name}: expected {_names(types)}, got {type(value).__name__}"
                )
    return msg


def _names(types: tuple) -> str:
    return "/".join("null" if t is type(None) else t.__name__ for t in types)
