"""What a ready worker runs next: pure functions over ledger rows (no SQL, no git, no clock).

The policy is split from the state changes so it can be read, tested and grown on its own:
``coordinator.core.Coordinator.next_assignment`` gathers the rows (the head's attempts on the
worker's hardware class, the candidates waiting for repeats there, the queued candidates),
calls ``choose``, and applies the answer (one lease, in one ledger transaction).
``coordinator.reports`` uses ``head_on_class`` to say where the head stands on every class.

The order for a worker of hardware class C (DESIGN.md, *The path of one candidate*, step 2):

  1. the head, while it has fewer than ``head_runs`` runs on C (ok runs plus live head
     leases): numbers are only compared within a class, and the head's mean is what every
     candidate there is judged against;
  2. the head again when a re-measurement is due on C (``remeasure_due``: every N decisions
     there, or when its newest run there is older than S seconds) and nobody is running it;
  3. a repeat of a candidate already in progress on C (oldest first) that the rule asked more
     runs of than it has or is running: a decision in flight is worth more than a new screen;
  4. otherwise the oldest queued candidate (while the head is being measured on C by other
     workers, candidates still run: they wait in ``measured`` for its runs);
  5. nothing, if the head failed ``HEAD_FAILURES_LIMIT`` measurements on C and has no run
     there: a candidate measured there could never be compared, so C's workers would only waste
     runs (``reports.status`` lists it as a problem until the head changes).

``class_can_decide`` says when a class can no longer decide what is bound to it (no live
worker, or the head blocked there): the coordinator then sends those candidates back to the
queue, unbound.

``is_run`` is the one place that says which attempts are runs: done, ok, and not flagged (an
attempt flagged as slowed by its machine is stored but never counted).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from coordinator.rule import Run
from coordinator.seeds import next_index
from coordinator.states import DONE, LEASED, PURPOSE_CANDIDATE, PURPOSE_HEAD
from shared.outcome import OK

# Failed head measurements on one class after which the head is not measured there again.
HEAD_FAILURES_LIMIT = 2

# Where the head stands on one class (reports.status shows it).
MEASURED, MEASURING, BLOCKED, UNMEASURED = "measured", "measuring", "blocked", "unmeasured"


def field_of(row: Mapping, key: str) -> Any:
    """``row[key]``, or None where the row has no such column (a dict from a test, a ledger
    made before the column existed)."""
    try:
        return row[key]
    except (KeyError, IndexError):
        return None


def is_run(row: Mapping) -> bool:
    """Does this attempt count as a run? Done, ok, and not flagged: the place where an attempt
    the worker's machine slowed (throttling, swapping) is left out of every decision."""
    return row["state"] == DONE and row["status"] == OK and not field_of(row, "flagged")


def runs_of(rows: Iterable[Mapping], text_sha: str | None = None) -> tuple[Run, ...]:
    """The runs (oldest first) among attempt rows of one text. ``text_sha`` None takes every
    row; a row without a text_sha (a schema-1 ledger) is taken as of the candidate's own text.
    A row without a seed index ran with the run's seed: index 0."""
    out = []
    for r in rows:
        if not is_run(r):
            continue
        sha = field_of(r, "text_sha")
        if text_sha is not None and sha is not None and sha != text_sha:
            continue
        idx = field_of(r, "seed_index")
        out.append((field_of(r, "finished_at") or 0.0,
                    Run(float(r["val_bpb"]), int(idx) if idx is not None else 0,
                        r["attempt_id"])))
    out.sort(key=lambda t: t[0])
    return tuple(run for _, run in out)


def busy_seeds(rows: Iterable[Mapping], text_sha: str | None = None) -> frozenset[int]:
    """Seed indices a text already has a run or a live lease with (the next lease takes the
    smallest free one, ``seeds.next_index``)."""
    busy = {run.seed_index for run in runs_of(rows, text_sha)}
    for r in rows:
        sha = field_of(r, "text_sha")
        if r["state"] == LEASED and (text_sha is None or sha is None or sha == text_sha):
            idx = field_of(r, "seed_index")
            busy.add(int(idx) if idx is not None else 0)
    return frozenset(busy)


@dataclass(frozen=True)
class HeadOnClass:
    """The head's attempts on one hardware class, summarised."""
    values: tuple[float, ...] = ()        # val_bpb of its runs there (any purpose), oldest first
    attempt_ids: tuple[str, ...] = ()     # the attempts those values came from
    live: int = 0                         # head measurements leased there right now
    failed: int = 0                       # head measurements there that failed
    runs: tuple[Run, ...] = ()            # the same runs with their seed indices
    seeds: frozenset[int] = frozenset()   # seed indices with a run or a live head lease
    last_run_at: float | None = None      # when its newest run there finished

    @property
    def state(self) -> str:
        """measured (has a number) | measuring (no number, a head run in flight) | blocked
        (no number, failed HEAD_FAILURES_LIMIT times) | unmeasured (measure it next)."""
        if self.values or self.live:
            return MEASURED if self.values else MEASURING
        return BLOCKED if self.failed >= HEAD_FAILURES_LIMIT else UNMEASURED

    def can_run(self) -> bool:
        """May the head be leased on this class again? Not after HEAD_FAILURES_LIMIT failures
        (it may be what breaks these machines)."""
        return self.failed < HEAD_FAILURES_LIMIT

    def needs(self, head_runs: int) -> int:
        """Head runs still to lease here before candidates can be decided (live ones count)."""
        return max(0, head_runs - len(self.values) - self.live) if self.can_run() else 0

    def enough(self, head_runs: int) -> bool:
        """Are the head's runs here what decisions should use? ``head_runs`` of them, or all it
        will ever get (it cannot be measured here again and nothing is running)."""
        return len(self.values) >= head_runs or (bool(self.values) and not self.can_run()
                                                 and not self.live)


def head_on_class(rows: Iterable[Mapping], text_sha: str | None = None) -> HeadOnClass:
    """Summarise the head candidate's attempt rows on one class (columns attempt_id, purpose,
    state, status, val_bpb; seed_index, text_sha, finished_at where the ledger has them). A
    kept candidate's own runs count as the head's (its repeats become the head's runs); only
    runs made *to measure the head* count as live or failed head measurements. ``text_sha``:
    the head's text (a candidate's runs of another text, before a rebase, are not the head's)."""
    rows = list(rows)
    runs = runs_of(rows, text_sha)
    ids = {x.attempt_id for x in runs}
    finished = [field_of(r, "finished_at") for r in rows if r["attempt_id"] in ids]
    return HeadOnClass(
        values=tuple(r.value for r in runs),
        attempt_ids=tuple(r.attempt_id for r in runs),
        live=sum(1 for r in rows if r["state"] == LEASED and r["purpose"] == PURPOSE_HEAD),
        failed=sum(1 for r in rows if r["state"] == DONE and r["status"] != OK
                   and r["purpose"] == PURPOSE_HEAD),
        runs=runs, seeds=busy_seeds(rows, text_sha),
        last_run_at=max((f for f in finished if f is not None), default=None))


def remeasure_due(head: HeadOnClass, decisions_since: int, now: float, every: int,
                  seconds: float) -> bool:
    """Is a fresh head run due on this class? After ``every`` decisions there since its newest
    run, or when that run is older than ``seconds`` (0 disables either). Only once the head
    has runs there (the first ones are ``needs``'s business) and none is running."""
    if not head.values or head.live or not head.can_run():
        return False
    if every and decisions_since >= every:
        return True
    return bool(seconds) and head.last_run_at is not None and now - head.last_run_at >= seconds


@dataclass(frozen=True)
class InProgress:
    """A candidate bound to one class, with the runs the rule asked for there."""
    candidate_id: int
    runs_wanted: int        # runs in all the rule asked for (its ok runs plus the more)
    runs: int               # ok runs it has there
    live: int               # leases of it running there now

    @property
    def short(self) -> int:
        return max(0, self.runs_wanted - self.runs - self.live)


@dataclass(frozen=True)
class Choice:
    """Run ``candidate_id`` for ``purpose`` (PURPOSE_HEAD: measure the head on this class)."""
    purpose: str
    candidate_id: int


def choose(head_candidate: int, head: HeadOnClass, queued: Sequence[int], *,
           head_runs: int = 1, remeasure: bool = False,
           in_progress: Sequence[InProgress] = ()) -> Choice | None:
    """What a ready, idle worker runs next (see the module doc for the order), or None.

    ``head_candidate``: the head's candidate id; ``head``: its attempts on the worker's class;
    ``queued``: ids of the queued candidates, oldest first; ``head_runs``: the run setting;
    ``remeasure``: ``remeasure_due``'s answer; ``in_progress``: candidates bound to this class,
    oldest first."""
    if head.needs(head_runs):
        return Choice(PURPOSE_HEAD, head_candidate)
    if head.state == BLOCKED:
        return None
    if remeasure:
        return Choice(PURPOSE_HEAD, head_candidate)
    for c in in_progress:
        if c.short:
            return Choice(PURPOSE_CANDIDATE, c.candidate_id)
    if not queued:
        return None
    return Choice(PURPOSE_CANDIDATE, queued[0])


def class_can_decide(live_workers: int, head: HeadOnClass) -> bool:
    """Can a class still decide the candidates bound to it? Not with no live worker left (a
    laptop closed for the night), nor when the head cannot be measured there (BLOCKED): its
    candidates could only wait, so they go back to the queue, unbound, for another class."""
    return live_workers > 0 and head.state != BLOCKED


def seed_index_for(seeds: Iterable[int]) -> int:
    """The seed index of the next lease of a text whose runs and live leases hold ``seeds``:
    the smallest free one, so a lost run's index is run again and pairs stay aligned."""
    return next_index(set(seeds))


__all__ = ["HEAD_FAILURES_LIMIT", "HeadOnClass", "head_on_class", "Choice", "choose",
           "class_can_decide",
           "InProgress", "remeasure_due", "is_run", "runs_of", "busy_seeds", "seed_index_for",
           "field_of", "MEASURED", "MEASURING", "BLOCKED", "UNMEASURED"]
