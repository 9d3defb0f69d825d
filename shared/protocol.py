"""The wire contract: every message coordinator, workers and clients exchange, who may send
it, and its validation. The one definition both sides import.

``SCHEMA`` names each message type's required and optional fields and the roles that may send
it; ``QUERIES`` names each ``query`` kind and the roles that may ask it. Everything else derives
from these two tables: the coordinator's permissions (``coordinator.trust.PERMISSIONS``), and the
handler tables of ``coordinator.server`` and ``worker.agent``, which ``check_handlers`` compares
with the schema when those modules are imported. Adding a message type is one entry here plus
one handler on the side that receives it.

Wire shape: ZeroMQ ROUTER (coordinator) <-> DEALER (workers, clients); one msgpack map per
frame (see ``shared.codec``). Every map carries an envelope:

    type     str   one of SCHEMA below
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
    heartbeat(attempt_id, progress) ->  (every interval while training; ``paused``: why not
                                         taking work, while the worker's machine says no)
                                    <- heartbeat
    result(attempt_id, outcome)     ->
                                    <- ack(attempt_id, accepted)
    ready                           ->  ...

Clients (``autoresearch-coord submit/status/log/export``, and the proposers ``agents`` and
``sweep``, which ask ``query head`` and ``query brief``) send a request carrying ``req_id`` and
wait for the reply carrying the same ``req_id``.

With keys (the default), every message is judged by the coordinator's trust list
(coordinator.trust): an unknown key may only ``enrol`` (redeem an invite; answered with
``reply``), and other refusals are ``error`` codes untrusted / revoked / forbidden. ``hello`` and
``ready`` may carry the worker's harness_fingerprint and dataset_hash, ``welcome`` the
coordinator's (plus dataset_name); a mismatch is answered with ``error`` code ``mismatch`` instead
of work. Workers fetch the dataset with ``query`` what=dataset_manifest / dataset_chunk
(shared.datasync) and ask what=harness for per-file harness hashes.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
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

# Who sends what. The three trust-list roles (coordinator.trust keeps which key has which),
# the state of a key the trust list does not know (it may only enrol), and the coordinator
# itself. A revoked key may send nothing, so it appears in no ``sent_by``.
WORKER, SUBMITTER, ADMIN = "worker", "submitter", "admin"
ROLES = (WORKER, SUBMITTER, ADMIN)
UNTRUSTED, REVOKED = "untrusted", "revoked"
COORDINATOR = "coordinator"
CLIENTS = frozenset({SUBMITTER, ADMIN})


@dataclass(frozen=True)
class Message:
    """One message type: its required fields (name -> accepted python types), the optional
    fields that, when present, must have these types, and who may send it. Extra fields are
    ignored (forward compatibility within one protocol version)."""

    fields: Mapping[str, tuple]
    sent_by: frozenset[str]
    optional: Mapping[str, tuple] = field(default_factory=dict)


def _by(*roles: str) -> frozenset[str]:
    return frozenset(roles)


# The query kinds (``query.what``) and the roles that may ask each. Every kind has a handler in
# coordinator.server (checked when it is imported); a kind no handler answers is not listed.
QUERIES: dict[str, frozenset[str]] = {
    "status": CLIENTS,
    "log": CLIENTS,
    "export": CLIENTS,
    "keys": _by(ADMIN),
    # args candidate_id (int), reason (str): queue a failed candidate again (Coordinator.retry)
    "retry": _by(ADMIN),
    # proposers (autoresearch-coord agents / sweep): the head's train.py, commit and program.md;
    # and what a brief needs (decisions, in flight, failures, noise, workers connected), with
    # args decisions (int) and watch (candidate ids whose fate the proposer follows)
    "head": CLIENTS,
    "brief": CLIENTS,
    # the worker's dataset fetch (shared.datasync) and its harness diagnosis
    "dataset_manifest": _by(WORKER),
    "dataset_chunk": _by(WORKER),
    "harness": _by(WORKER),
}

# The keys of a submit's optional ``origin`` map (the coordinator keeps these, as text).
ORIGIN_FIELDS = ("tool", "proposer", "host", "transcript")

SCHEMA: dict[str, Message] = {
    # worker -> coordinator
    "hello": Message(
        {"worker_id": (str,), "name": (str,), "profile": (dict,), "hw_class": (str,),
         "attempt_id": OPT_STR}, _by(WORKER),
        # What the worker will train with; the coordinator gives no work on a mismatch (error
        # "mismatch"). dataset_hash null = it holds none of the coordinator's yet.
        {"harness_fingerprint": (str,), "dataset_hash": OPT_STR}),
    "ready": Message({"worker_id": (str,)}, _by(WORKER),
                     {"harness_fingerprint": (str,), "dataset_hash": OPT_STR}),
    # both ways; a worker's carries its worker_id, the attempt it runs and its progress
    # ... and, while it takes no new work because of its machine (worker.gate), why
    "heartbeat": Message({}, _by(WORKER, COORDINATOR),
                         {"worker_id": (str,), "attempt_id": OPT_STR, "progress": OPT_MAP,
                          "paused": OPT_STR}),
    # outcome: shared.outcome.Outcome.to_wire(); read back only with Outcome.from_wire
    "result": Message({"worker_id": (str,), "attempt_id": (str,), "outcome": (dict,)},
                      _by(WORKER)),
    "bye": Message({"worker_id": (str,), "reason": (str,)}, _by(WORKER)),
    # coordinator -> worker
    # What the coordinator runs: its harness fingerprint (shared.datasync) and, when it serves
    # a dataset, that dataset's hash and name (workers fetch it with query dataset_manifest/chunk).
    # ``incarnation`` names this coordinator process (new on every start): a worker says
    # hello once per incarnation (see ERROR_HELLO_FIRST).
    "welcome": Message({"heartbeat_interval": NUM, "liveness": (int,)}, _by(COORDINATOR),
                       {"harness_fingerprint": (str,), "dataset_hash": (str,),
                        "dataset_name": (str,), "incarnation": (str,)}),
    "assign": Message({"attempt_id": (str,), "candidate_id": (int,), "commit": (str,),
                       "train_py": (str,), "settings": (dict,), "timeout": NUM},
                      _by(COORDINATOR),
                      {"purpose": (str,)}),  # "head" (measure the head on this class) | "candidate"
    "ack": Message({"attempt_id": (str,), "accepted": (bool,), "note": (str,)},
                   _by(COORDINATOR)),
    "cancel": Message({"attempt_id": (str,), "reason": (str,)}, _by(COORDINATOR)),
    "error": Message({"code": (str,), "message": (str,)}, _by(COORDINATOR),
                     {"req_id": (str,), "incarnation": (str,)}),
    # client <-> coordinator (workers also query: their dataset fetch)
    "submit": Message({"req_id": (str,), "train_py": (str,), "description": (str,),
                       "base": OPT_STR}, CLIENTS,
                      # where it came from (ORIGIN_FIELDS, str each); the proposers send it
                      # so the log can point at the agent's transcript
                      {"origin": OPT_MAP}),
    "query": Message({"req_id": (str,), "what": (str,), "args": (dict,)},
                     frozenset().union(*QUERIES.values())),
    "reply": Message({"req_id": (str,), "ok": (bool,), "data": (object,)}, _by(COORDINATOR)),
    # any key -> coordinator: redeem an invite (coordinator.trust); answered with reply. A
    # trusted key that enrols again just gets its entry back.
    "enrol": Message({"req_id": (str,), "token": (str,), "name": (str,)},
                     _by(WORKER, SUBMITTER, ADMIN, UNTRUSTED)),
}


def may_send(role: str, type_: str, what: str | None = None) -> bool:
    """May a peer of ``role`` send this message (``what``: the kind of a ``query``)?"""
    spec = SCHEMA.get(type_)
    if spec is None or role not in spec.sent_by:
        return False
    return type_ != "query" or role in QUERIES.get(what, ())


def received_by(side: str) -> frozenset[str]:
    """The message types ``side`` (COORDINATOR, or WORKER for what a worker hears) receives."""
    if side == COORDINATOR:
        return frozenset(t for t, m in SCHEMA.items() if m.sent_by - {COORDINATOR})
    return frozenset(t for t, m in SCHEMA.items() if COORDINATOR in m.sent_by)


def check_handlers(side: str, handlers: Mapping[str, Any],
                   queries: Mapping[str, Any] | None = None) -> None:
    """Import-time check of a handler table against the schema: every message ``side``
    receives (and, for the coordinator, every query kind) has exactly one handler, and no
    handler answers a type or kind the schema does not define. Raises RuntimeError naming
    what is missing or extra, so a forgotten handler fails at import, not on the wire."""
    problems = []
    want = received_by(side)
    if missing := sorted(want - set(handlers)):
        problems.append(f"no handler for message type(s) {', '.join(missing)}")
    if extra := sorted(set(handlers) - want):
        problems.append(f"handler(s) for {', '.join(extra)}, which {side} never receives "
                        "(add them to shared.protocol.SCHEMA)")
    if queries is not None:
        if missing := sorted(set(QUERIES) - set(queries)):
            problems.append(f"no handler for query kind(s) {', '.join(missing)}")
        if extra := sorted(set(queries) - set(QUERIES)):
            problems.append(f"handler(s) for query kind(s) {', '.join(extra)} not in "
                            "shared.protocol.QUERIES (so nobody would be allowed to ask)")
    if problems:
        raise RuntimeError(f"{side} handler table does not match the wire schema: "
                           + "; ".join(problems))


def _check_schema() -> None:
    for t, m in SCHEMA.items():
        if not m.sent_by:
            raise RuntimeError(f"message type {t} has no sender: nobody could send it")
    for q, roles in QUERIES.items():
        if not roles:
            raise RuntimeError(f"query {q} has no role that may ask it")


_check_schema()

# ``error`` code a coordinator sends to a worker it does not know (it restarted, or it declared
# the worker lost), carrying its incarnation: the worker answers with one ``hello`` carrying the
# attempt it holds -- one, not one per error: the messages it sent before that hello was
# processed are answered with hello_first too, and a second hello (still without the attempt an
# assign is bringing it) would read as a worker that dropped its lease.
ERROR_HELLO_FIRST = "hello_first"

# ``error`` codes of the security and data layer (coordinator.trust, coordinator.server):
# untrusted (key not on the trust list: message carries the key and the admin command),
# revoked, forbidden (role may not send this), mismatch (harness or dataset differs: no work).
ERROR_UNTRUSTED = UNTRUSTED
ERROR_REVOKED = REVOKED
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
    if not isinstance(t, str) or t not in SCHEMA:
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
    spec = SCHEMA[t]
    for fields, required in ((spec.fields, True), (spec.optional, False)):
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
