"""The worker's state machine: what ``worker.agent.Agent`` is doing, one state at a time.

    connecting  a fresh connection said hello; no welcome yet (also: waiting to reconnect)
    enrolling   the coordinator does not know our key: enrol sent with the invite token
    idle        welcomed, holds nothing: sends ``ready`` every READY_RESEND seconds
    fetching    welcomed, lacks the coordinator's dataset: fetching it (or waiting to retry)
    blocked     welcomed, this machine's trainer harness differs: takes no work
    holding     welcomed, backing off (low disk, a mismatch refusal) until a deadline
    paused      welcomed, the machine's conditions say no new work (on battery, in use:
                ``worker.gate``); re-read every POLL_SECONDS, idle again when they allow
    running     a trainer subprocess runs the assigned attempt
    reporting   the attempt's result is sent (and re-sent) until the coordinator acks it
    stopped     leaving: bye sent or a refusal that retrying cannot fix (final)

``idle``, ``fetching``, ``blocked``, ``holding`` and ``paused`` are the *waiting* states: the
worker holds nothing and was welcomed. Losing the link (or a ``hello_first`` error: the
coordinator does not know us) sends a waiting worker back to ``connecting``; ``running`` and
``reporting`` outlive the link -- the trainer keeps going, the next hello carries the attempt,
and the result is re-sent until acked. When an attempt is acked, the next waiting state follows
from the facts the welcome brought (harness, dataset), the back-off deadline and the machine's
conditions (``Agent._settle``) -- or ``connecting``, if a hello of ours is still unanswered
(one hello per coordinator incarnation: further ``hello_first`` errors meanwhile are ignored).
An operator's first Ctrl-C does not change the state; it makes the next settle ``stopped``.

Every change goes through ``check`` (``IllegalTransition`` otherwise), as the coordinator's
machines do (``coordinator.states``). ``python -m worker.states`` prints the table.
"""
from __future__ import annotations

from shared import machine
from shared.machine import IllegalTransition  # noqa: F401  (raised by check)

CONNECTING, ENROLLING, IDLE, FETCHING, BLOCKED, HOLDING, PAUSED, RUNNING, REPORTING, STOPPED = (
    "connecting", "enrolling", "idle", "fetching", "blocked", "holding", "paused", "running",
    "reporting", "stopped")

STATES = (CONNECTING, ENROLLING, IDLE, FETCHING, BLOCKED, HOLDING, PAUSED, RUNNING, REPORTING,
          STOPPED)
WAITING = frozenset({IDLE, FETCHING, BLOCKED, HOLDING, PAUSED})
# Where an assign is taken (it is checked before the run: a blocked or dataset-less worker
# reports it cancelled at once, which is ``reporting``).
TAKES_WORK = frozenset({CONNECTING}) | WAITING
HOLDS_ATTEMPT = frozenset({RUNNING, REPORTING})

_SETTLE = WAITING | {STOPPED}   # where a welcome or an ack leads (``Agent._settle``)

TRANSITIONS: dict[str, frozenset[str]] = {
    # welcome -> a waiting state; untrusted + invite -> enrolling; an assign that crossed the
    # welcome -> running (or reporting, when it cannot start)
    CONNECTING: _SETTLE | {ENROLLING, RUNNING, REPORTING},
    # the enrol reply: accepted -> hello again; refused -> stopped
    ENROLLING: frozenset({CONNECTING, STOPPED}),
    # waiting: the link lost -> connecting; a welcome or a deadline -> re-settle; an assign ->
    # running, or reporting (refused before the run: a blocked or dataset-less worker never runs)
    IDLE: _SETTLE | {CONNECTING, RUNNING, REPORTING},
    HOLDING: _SETTLE | {CONNECTING, RUNNING, REPORTING},
    FETCHING: _SETTLE | {CONNECTING, REPORTING},
    # paused: an assign that crossed the pause is refused (cancelled: requeued, no strike)
    PAUSED: _SETTLE | {CONNECTING, REPORTING},
    BLOCKED: _SETTLE | {CONNECTING, REPORTING},
    RUNNING: frozenset({REPORTING, STOPPED}),
    # acked -> whichever waiting state the facts say (or stopped, if the operator asked), or
    # connecting when the ack beat the welcome of a hello we sent meanwhile
    REPORTING: _SETTLE | {CONNECTING},
    STOPPED: frozenset(),
}
TRANSITIONS = {s: frozenset(t - {s}) for s, t in TRANSITIONS.items()}   # staying is implicit


def check(old: str, new: str) -> str:
    """Return ``new`` if the worker may go from ``old`` to ``new``; else IllegalTransition.
    Staying in a state is always allowed (a waiting worker re-settling, say)."""
    if new == old and old in TRANSITIONS:
        return new
    return machine.check("worker", TRANSITIONS, old, new)


def describe() -> str:
    """The machine as text, one transition per line."""
    return "\n".join(["worker states:", *machine.describe(STATES, TRANSITIONS)])


if __name__ == "__main__":
    print(describe())
