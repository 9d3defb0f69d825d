"""How fast proposers may propose: backpressure and restart backoff. Pure functions.

Backpressure: a candidate proposed long before a worker can run it is measured against a head
that may have moved on (and is rebased or goes stale), and it was written without knowing the
results that arrive meanwhile. So proposers keep the candidates *in flight* -- submitted and not
yet decided: queued, running, measured and waiting (for the head, or for repeats) -- plus the
proposals their agents are writing right now, within the workers that can take work plus a
little slack, which keeps a worker that finishes from ever waiting for a proposal:

    in_flight + proposing <= workers + slack

With no worker connected the limit is just ``slack``, so a queue is ready when workers join.

Backoff: an agent that crashes, hangs (killed at its timeout) or returns nothing usable is
restarted after ``initial * 2**(failures-1)`` seconds, capped; one good proposal resets it.
"""
from __future__ import annotations

from coordinator.states import CANDIDATE_FINAL, CANDIDATE_STATES

DEFAULT_SLACK = 1
BACKOFF_INITIAL = 5.0     # seconds before restarting an agent after its first failure
BACKOFF_MAX = 300.0       # never wait longer than this between tries


def in_flight(counts: dict) -> int:
    """Submitted candidates not yet decided, from a ``counts`` map (state -> number, as in
    the coordinator's status; the baseline #0 is not in it). Any non-final state counts, so a
    state added later (e.g. awaiting repeats) is in flight without changing this."""
    return sum(int(n) for state, n in counts.items()
               if state in CANDIDATE_STATES and state not in CANDIDATE_FINAL
               and isinstance(n, int) and not isinstance(n, bool))


def room(in_flight_now: int, workers: int, slack: int, proposing: int = 0) -> int:
    """How many new proposals may start now (never negative)."""
    return max(0, max(0, workers) + max(0, slack) - max(0, in_flight_now) - max(0, proposing))


def backoff(failures: int, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_MAX) -> float:
    """Seconds to wait before the next try after ``failures`` consecutive failures."""
    if failures <= 0:
        return 0.0
    return min(cap, initial * 2 ** min(failures - 1, 30))


__all__ = ["in_flight", "room", "backoff", "DEFAULT_SLACK", "BACKOFF_INITIAL", "BACKOFF_MAX"]
