"""The wire schema is the one definition: handlers and permissions on both sides derive from it.

Every message type and query kind in ``shared.protocol`` has a handler on the side that receives
it and a role allowed to send it; a type or kind the schema lists but no handler answers (or the
reverse) fails when the module is imported -- tried here in a fresh interpreter, for real.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from coordinator import server, trust
from shared import protocol
from shared.protocol import COORDINATOR, QUERIES, SCHEMA, WORKER
from worker import agent


def test_every_message_the_coordinator_receives_has_a_handler_and_a_sender_role():
    received = protocol.received_by(COORDINATOR)
    assert received == {"hello", "ready", "heartbeat", "result", "bye", "submit", "query",
                        "enrol"}
    assert set(server.HANDLERS) == received
    for t in received - {"query"}:   # query: per kind, below
        roles = [r for r in (*protocol.ROLES, protocol.UNTRUSTED) if trust.allowed(r, t)]
        assert roles, f"{t}: nobody may send it"
    # what only the coordinator sends is accepted from no peer, whatever its role
    for t in set(SCHEMA) - received:
        assert not any(trust.allowed(r, t) for r in (*protocol.ROLES, protocol.UNTRUSTED)), t


def test_every_query_kind_has_a_handler_and_a_role():
    assert set(server.QUERY_HANDLERS) == set(QUERIES)
    for what, roles in QUERIES.items():
        assert roles and all(trust.allowed(r, "query", what) for r in roles), what
        assert not trust.allowed(protocol.UNTRUSTED, "query", what)


def test_every_message_the_worker_receives_has_a_handler():
    assert set(agent.HANDLERS) == protocol.received_by(WORKER) == {
        "welcome", "assign", "ack", "cancel", "error", "heartbeat", "reply"}


def test_permissions_are_the_schema_read_per_role():
    for role, (types, queries) in trust.PERMISSIONS.items():
        assert types == {t for t, m in SCHEMA.items() if role in m.sent_by}, role
        assert queries == {q for q, r in QUERIES.items() if role in r}, role
    assert trust.PERMISSIONS[protocol.REVOKED] == (frozenset(), frozenset())
    # query is sendable by exactly the roles that may ask some kind
    assert SCHEMA["query"].sent_by == frozenset().union(*QUERIES.values())


def test_check_handlers_names_what_is_missing_or_extra():
    h, q = dict(server.HANDLERS), dict(server.QUERY_HANDLERS)
    protocol.check_handlers(COORDINATOR, h, q)   # the real tables pass
    with pytest.raises(RuntimeError, match="no handler for message type\\(s\\) bye"):
        protocol.check_handlers(COORDINATOR, {k: v for k, v in h.items() if k != "bye"}, q)
    with pytest.raises(RuntimeError, match="handler\\(s\\) for welcome, which coordinator never"):
        protocol.check_handlers(COORDINATOR, {**h, "welcome": print}, q)
    with pytest.raises(RuntimeError, match="no handler for query kind\\(s\\) log"):
        protocol.check_handlers(COORDINATOR, h, {k: v for k, v in q.items() if k != "log"})
    with pytest.raises(RuntimeError, match="query kind\\(s\\) revoke not in"):
        protocol.check_handlers(COORDINATOR, h, {**q, "revoke": print})
    with pytest.raises(RuntimeError, match="no handler for message type\\(s\\) assign"):
        protocol.check_handlers(WORKER, {k: v for k, v in agent.HANDLERS.items()
                                         if k != "assign"})


def _import_with(patch: str, module: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from shared import protocol
        {patch}
        import {module}
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("patch, module, missing", [
    # a new worker -> coordinator type with no handler in the server
    ("protocol.SCHEMA['ping'] = protocol.Message({'worker_id': (str,)}, frozenset({'worker'}))",
     "coordinator.server", "no handler for message type(s) ping"),
    # a new coordinator -> worker type with no handler in the agent
    ("protocol.SCHEMA['pause'] = protocol.Message({}, frozenset({'coordinator'}))",
     "worker.agent", "no handler for message type(s) pause"),
    # a new query kind nobody answers
    ("protocol.QUERIES['frobnicate'] = frozenset({'admin'})",
     "coordinator.server", "no handler for query kind(s) frobnicate"),
])
def test_an_unhandled_schema_entry_fails_the_import(patch, module, missing):
    r = _import_with(patch, module)
    assert r.returncode != 0 and missing in r.stderr, r.stderr[-2000:]


def test_a_new_type_is_permitted_where_the_schema_says():
    """Adding a type is one schema entry (+ one handler): the trust check follows it."""
    spec = protocol.Message({"worker_id": (str,)}, frozenset({WORKER}))
    SCHEMA["ping"] = spec
    try:
        assert trust.allowed(WORKER, "ping") and not trust.allowed(protocol.SUBMITTER, "ping")
        assert protocol.validate(protocol.make("ping", worker_id="w"))["type"] == "ping"
    finally:
        del SCHEMA["ping"]
    assert not trust.allowed(WORKER, "ping")
