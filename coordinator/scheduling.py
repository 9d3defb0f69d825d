"""What a ready worker runs next: pure functions over ledger rows (no SQL, no git, no clock).

The policy is split from the state changes so it can be read, tested and grown on its own:
``coordinator.core.Coordinator.next_assignment`` gathers the rows (the head's attempts on the
worker's hardware class, the queued candidates), calls ``choose``, and applies the answer (one
lease, in one ledger transaction). ``coordinator.reports`` uses ``head_on_class`` to say where
the head stands on every class.

The order for a worker of hardware class C (DESIGN.md, *The path of one candidate*, step 2):

  1. the head, if it has no ok measurement on C and nobody is measuring it there: numbers are
     only compared within a class, so nothing on C can be decided before the head's number;
  2. otherwise the oldest queued candidate (while the head is being measured on C by another
     worker, candidates still run: they wait in ``measured`` for its number);
  3. nothing, if the head failed ``HEAD_FAILURES_LIMIT`` measurements on C and has none: a
     candidate measured there could never be compared, so C's workers would only waste runs
     (``reports.status`` lists it as a problem until the head changes).

Repeats of candidates in progress on C (paired seeds, DESIGN.md step 5) belong between 1 and 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from coordinator.states import DONE, LEASED, PURPOSE_CANDIDATE, PURPOSE_HEAD
from shared.outcome import OK

# Failed head measurements on one class after which the head is not measured there again.
HEAD_FAILURES_LIMIT = 2

# Where the head stands on one class (reports.status shows it).
MEASURED, MEASURING, BLOCKED, UNMEASURED = "measured", "measuring", "blocked", "unmeasured"


@dataclass(frozen=True)
class HeadOnClass:
    """The head's attempts on one hardware class, summarised."""
    values: tuple[float, ...] = ()        # val_bpb of its ok runs there (any purpose)
    attempt_ids: tuple[str, ...] = ()     # the attempts those values came from
    live: int = 0                         # head measurements leased there right now
    failed: int = 0                       # head measurements there that failed

    @property
    def state(self) -> str:
        """measured (has a number) | measuring (no number, a head run in flight) | blocked
        (no number, failed HEAD_FAILURES_LIMIT times) | unmeasured (measure it next)."""
        if self.values or self.live:
            return MEASURED if self.values else MEASURING
        return BLOCKED if self.failed >= HEAD_FAILURES_LIMIT else UNMEASURED


def head_on_class(rows: Iterable[Mapping]) -> HeadOnClass:
    """Summarise the head candidate's attempt rows on one class (columns attempt_id, purpose,
    state, status, val_bpb). A kept candidate's own ok run counts as the head's number; only
    runs made *to measure the head* count as live or failed head measurements."""
    rows = list(rows)
    ok = [r for r in rows if r["state"] == DONE and r["status"] == OK]
    return HeadOnClass(
        values=tuple(r["val_bpb"] for r in ok),
        attempt_ids=tuple(r["attempt_id"] for r in ok),
        live=sum(1 for r in rows if r["state"] == LEASED and r["purpose"] == PURPOSE_HEAD),
        failed=sum(1 for r in rows if r["state"] == DONE and r["status"] != OK
                   and r["purpose"] == PURPOSE_HEAD))


@dataclass(frozen=True)
class Choice:
    """Run ``candidate_id`` for ``purpose`` (PURPOSE_HEAD: measure the head on this class)."""
    purpose: str
    candidate_id: int


def choose(head_candidate: int, head: HeadOnClass, queued: Sequence[int]) -> Choice | None:
    """What a ready, idle worker runs next (see the module doc for the order), or None.

    ``head_candidate``: the head's candidate id; ``head``: its attempts on the worker's class;
    ``queued``: ids of the queued candidates, oldest first."""
    state = head.state
    if state == UNMEASURED:
        return Choice(PURPOSE_HEAD, head_candidate)
    if state == BLOCKED or not queued:
        return None
    return Choice(PURPOSE_CANDIDATE, queued[0])


__all__ = ["HEAD_FAILURES_LIMIT", "HeadOnClass", "head_on_class", "Choice", "choose",
           "MEASURED", "MEASURING", "BLOCKED", "UNMEASURED"]
