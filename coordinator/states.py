r"""The two state machines of the coordinator: candidates and attempts.

A *candidate* is one submitted train.py. It waits in the queue, is screened by one run on one
worker, may be repeated (more runs on the same hardware class, paired by seed with the head's,
several at once on idle workers), and ends kept (the branch advanced to it), discarded (not
shown better than the head) or failed (crashed, went nan/oom/timeout, or took a worker down too
often):

    queued -> running -> kept | discarded | failed
                 |  ^ \-> repeating      the rule asked for more runs: waits for workers
                 |  |        |  \-> measured, kept, discarded (decided by new head runs)
                 |  \--------/          (a repeat is leased: running again)
                 |-> measured          its runs are in, the head's are not (yet) enough
                 |                     on that class: decided when they are
                 \-> queued            its only lease was lost or left: try again elsewhere
    measured | repeating -> queued     its class can decide nothing more (its last worker is
                                       gone, or the head fails there): unbound, so another
                                       class decides it (its runs there are kept)
    failed -> queued                   (an admin's `retry`, with the reason recorded)

A candidate is *running* while it holds at least one live lease; it is decided only when all of
its leases are in (coordinator.rule on its runs and the head's, on its class).

Every run of a candidate uses its change *on top of the current head*: a candidate based on an
older head is rebased before it runs (coordinator.rebase), and when the head moves while its
runs are in flight it is rebased again and screened afresh on the new text (runs of different
texts are never pooled). A change that does not replay onto the head ends it:

    queued | running | measured | repeating -> stale   conflicts with a keep since its base
                                                       (resubmit on top of the head), or is
                                                       already there (the head's program)

An *attempt* is one lease of a candidate (or of the head, to measure it) to one worker:

    leased -> done        a result arrived from that worker while the lease was live
    leased -> lost        the worker went silent: not counted
    leased -> cancelled   the worker left cleanly (bye), cancelled it itself, or never got
                          it (its hello did not carry it), or the candidate was decided
                          (failed) while it ran: not counted
    lost | cancelled -> stale   a result arrived anyway, too late: stored, never counted

Only ``coordinator.core`` moves these states (one ledger transaction per change). It asks
``coordinator.scheduling`` which candidate (or the head) a ready worker leases next, and
``coordinator.decide`` whether a measured candidate is kept or discarded; a failed outcome's
status and note come from the worker (``shared.outcome``).

Every state change in the ledger goes through ``check_candidate`` / ``check_attempt``, so an
illegal move (say, a discarded candidate being kept) raises ``IllegalTransition`` instead of
silently corrupting the run. ``describe()`` prints both machines (``python -m
coordinator.states``).
"""
from __future__ import annotations

from shared import machine
from shared.machine import IllegalTransition  # noqa: F401  (raised by check_*; callers catch it)

# ---- candidates ----------------------------------------------------------------------------

QUEUED, RUNNING, MEASURED, REPEATING, KEPT, DISCARDED, FAILED = (
    "queued", "running", "measured", "repeating", "kept", "discarded", "failed")
# Stale: its change cannot be replayed onto the current head (a conflict with a keep since its
# base), or replays to the head's own program (already there). The same word as the attempt
# state STALE below, in the other machine.
STALE = "stale"

CANDIDATE_STATES = (QUEUED, RUNNING, MEASURED, REPEATING, KEPT, DISCARDED, FAILED, STALE)
CANDIDATE_FINAL = frozenset({KEPT, DISCARDED, FAILED, STALE})

CANDIDATE_TRANSITIONS: dict[str, frozenset[str]] = {
    # stale when it is rebased onto the head to run and does not replay (coordinator.rebase)
    QUEUED: frozenset({RUNNING, STALE}),
    # decided when its last lease is in; back to the queue when its only lease is lost (or its
    # run flagged as slowed by the machine) with no run counted, or when it ran out of memory
    # and a connected class has more (coordinator.routing); failed on a bad outcome or too
    # many losses; repeating, or stale, when the head moved under its runs (rebased again)
    RUNNING: frozenset({MEASURED, REPEATING, KEPT, DISCARDED, FAILED, QUEUED, STALE}),
    # waits here until the head has enough runs on the candidate's hardware class; back to
    # the queue, unbound, when that class can decide nothing more (last worker gone, or the
    # head cannot be measured there)
    MEASURED: frozenset({REPEATING, KEPT, DISCARDED, STALE, QUEUED}),
    # waits for idle workers of its class to run the repeats the rule asked for; a new head
    # (or new head runs) on its class can decide it, or make it wait for the head's runs; back
    # to the queue, unbound, as from measured
    REPEATING: frozenset({RUNNING, MEASURED, KEPT, DISCARDED, STALE, QUEUED}),
    KEPT: frozenset(),
    DISCARDED: frozenset(),
    # Final for the machine; only an admin's retry (Coordinator.retry) takes it back.
    FAILED: frozenset({QUEUED}),
    # final: resubmit the change on top of the head instead
    STALE: frozenset(),
}

# Candidates an admin may send back to the queue (``autoresearch-coord retry``): a failure can
# be the fleet's fault (lost leases on a flaky machine), not the candidate's.
RETRYABLE = frozenset({FAILED})

# ---- attempts ------------------------------------------------------------------------------

LEASED, DONE, LOST, CANCELLED = "leased", "done", "lost", "cancelled"

ATTEMPT_STATES = (LEASED, DONE, LOST, CANCELLED, STALE)
ATTEMPT_TRANSITIONS: dict[str, frozenset[str]] = {
    LEASED: frozenset({DONE, LOST, CANCELLED}),
    LOST: frozenset({STALE}),
    CANCELLED: frozenset({STALE}),
    DONE: frozenset(),
    STALE: frozenset(),
}

# Attempt purposes: measure a submitted candidate, or re-measure the current head on a class.
PURPOSE_HEAD, PURPOSE_CANDIDATE = "head", "candidate"

# Decision verdicts (the decisions table), and the results.tsv words upstream uses for them. A
# stale candidate never ran, so it has no results.tsv row (its decision is in the log).
VERDICTS = (KEPT, DISCARDED, FAILED, STALE)
TSV_STATUS = {KEPT: "keep", DISCARDED: "discard", FAILED: "crash"}


def check_candidate(old: str, new: str) -> str:
    """Return ``new`` if a candidate may go from ``old`` to ``new``; else IllegalTransition."""
    return machine.check("candidate", CANDIDATE_TRANSITIONS, old, new)


def check_attempt(old: str, new: str) -> str:
    """Return ``new`` if an attempt may go from ``old`` to ``new``; else IllegalTransition."""
    return machine.check("attempt", ATTEMPT_TRANSITIONS, old, new)


def describe() -> str:
    """Both state machines as text, one transition per line."""
    return "\n".join(["candidate states:",
                      *machine.describe(CANDIDATE_STATES, CANDIDATE_TRANSITIONS),
                      "", "attempt states:",
                      *machine.describe(ATTEMPT_STATES, ATTEMPT_TRANSITIONS)])


if __name__ == "__main__":
    print(describe())
