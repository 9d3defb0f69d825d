"""The coordinator's state layer: queue, leases, results, decisions, the branch. No sockets.

This module holds state changes only. What runs next is decided by ``coordinator.scheduling``
(pure functions over the rows gathered here), keep/discard and the reasons by
``coordinator.decide``, and the reports (status, log, results.tsv) are ``coordinator.reports``
(read-only functions over the ledger, also usable on a stopped run). A worker's result arrives
as a ``shared.outcome.Outcome`` (or a wire map, read with ``Outcome.from_wire``).

``coordinator.server`` drives one ``Coordinator`` from its poll loop; tests drive it directly.
Every public method is one state change of the ledger (one ``BEGIN IMMEDIATE ... COMMIT``), and
the git side follows a fixed order so a ``kill -9`` at any instant is harmless:

  * a submit writes its commit object, then the ledger row, then the candidate ref;
  * a keep writes the keep commit object (unreferenced objects are harmless), then ONE ledger
    transaction (attempt done + candidate kept + decision row + new head), then moves the
    branch with ``update-ref`` (expected old value);
  * on every start ``reconcile()`` points the branch at the ledger's head and recreates missing
    candidate refs, and says what it fixed.

Results are idempotent by attempt id: only the live lease of the reporting worker counts; a
late result for a lost/cancelled lease is stored as stale; a repeat of a counted one is acked and
changes nothing.

A candidate measured on hardware class C before the head is decided when the head's number on
C arrives (``_decide_waiting``). The worker's note (why its status) is stored on the attempt and
leads a failure's reason.

The worker's machine readings at the start and end of a run (``Outcome.conditions``) and the
run's tok/s are stored on the attempt; an ok run its machine slowed (``coordinator.slowdown``)
is marked ``flagged`` -- stored, never counted (``scheduling.is_run``) -- and the candidate is
leased again (``_requeue``). An ``oom`` candidate is routed (``coordinator.routing``): requeued,
unbound from its class, for workers with more usable memory than the class it failed on
(``candidates.min_memory``, a ``routes`` row), or failed when no connected class has more.

Choices worth knowing:
  * candidate 0 is the baseline (state kept, with a "baseline" decision row) so head
    assignments carry an integer candidate id like everything else;
  * ``worker_bye`` (a clean leave) and a worker's own "cancelled" outcome cancel the lease and
    requeue without a strike; ``worker_lost`` and a hello without the leased attempt count as
    lost (``LOST_LIMIT`` losses fail the candidate);
  * a candidate is decided on the runs of one hardware class (coordinator.rule, the runs
    ``coordinator.scheduling`` leased there); when that class can decide nothing more (its
    last worker gone, or the head failing there), the candidates waiting there go back to
    the queue, unbound (``_release_class``);
  * the same program (coordinator.identity) is never queued twice, whatever its earlier fate;
    only an admin's ``retry`` queues a failed candidate again (the reason and the superseded
    decision go to the ``retries`` table, its attempts stay, and losses toward ``LOST_LIMIT``
    count anew);
  * a candidate runs its change on top of the current head (coordinator.rebase): rebased at
    assignment, and again if the head moves under its runs; the rebased text is a commit whose
    parent is the head (object first, then the ledger row, then its ref: reconcile() recreates
    a missing ref), and a keep commits that text as measured.

Heartbeats (``worker_seen``) are kept in memory only: liveness is the server's business and
writing SQLite once a second per worker would buy nothing after a restart.

Timestamps come from ``clock`` (default ``time.time``), used only for the record, never to decide.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
import unicodedata
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from coordinator import (
    decide, rebase, reports, routing, rule, scheduling, seeds, slowdown,
)
from coordinator import noise as noise_model
from coordinator import states as st
from coordinator.identity import program_sha, text_sha
from coordinator.ledger import Ledger, LedgerError, ledger_path, loads
from coordinator.repo import (
    CANDIDATE_REFS, DISPLACED_REFS, REBASED_REFS, RUN_FIELDS, ZERO, CoordinatorBusy, GitError,
    acquire_lock, candidate_ref, clear_stale_ref_locks, commit_object, commit_tree_of,
    decision_settings, is_ancestor, list_refs, load_run, make_tree, read_blob, rebased_ref,
    rev_parse, state_dir, sync_worktree, update_ref, write_results_tsv,
)
from shared.outcome import CANCELLED, OK, OOM, Outcome, plain
from shared.protocol import ORIGIN_FIELDS

__all__ = ["Coordinator", "CoordinatorBusy", "SubmitRejected", "RetryRefused", "HelloReply",
           "Assignment", "Decision", "ResultAck", "clean_description"]

MAX_DESCRIPTION = 200                 # characters kept of a submission's description
MAX_TRAIN_PY_BYTES = 1_000_000        # a train.py is a few hundred lines; refuse a megabyte
MAX_BASE = 256                        # characters of a submission's base (a ref or sha)
# Kept by clean_description although they are format characters: they join emoji and
# shape scripts (Persian, Indic). Every other Cf -- bidi overrides/isolates (U+202A-E,
# U+2066-9), zero-width spaces, BOMs -- can make a description display as something else.
KEEP_FORMAT_CHARS = {"\u200c", "\u200d"}


class SubmitRejected(ValueError):
    """A submission the coordinator refuses; the message says why (e.g. the syntax error)."""


class RetryRefused(ValueError):
    """A retry the coordinator refuses (unknown candidate, not failed); the message says why."""


@dataclass
class HelloReply:
    cancel_attempt: str | None = None   # tell the worker to cancel this attempt
    reattached: bool = False            # the worker's attempt is still its live lease
    requeued: list[int] = field(default_factory=list)


@dataclass
class Assignment:
    attempt_id: str
    candidate_id: int
    commit: str
    train_py: str
    settings: dict
    timeout: float
    purpose: str                        # "head" | "candidate"


@dataclass
class Decision:
    candidate_id: int
    verdict: str                        # kept | discarded | failed
    hw_class: str | None
    val_bpb: float | None
    head_bpb: float | None
    head_before: str | None
    head_after: str
    reason: str
    description: str = ""
    runs: str | None = None             # the candidate's runs: "1.4100 ± 0.0141 (2)"
    head_runs: str | None = None        # the head's: "1.5000 ± 0.0115 (3)"
    confidence: float | None = None     # that it is better by more than the margin
    rule: str | None = None             # which test decided, e.g. "sequential/welch"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResultAck:
    accepted: bool
    note: str
    decisions: list[Decision] = field(default_factory=list)


def clean_description(text: Any) -> str:
    """Any unicode, minus control characters, whitespace collapsed, capped."""
    text = "" if text is None else str(text)
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r\v\f":
            out.append(" ")
        elif cat == "Cc" or cat in ("Cs", "Zl", "Zp"):
            continue  # control chars, lone surrogates, line/paragraph separators
        elif cat == "Cf" and ch not in KEEP_FORMAT_CHARS:
            continue  # bidi overrides, zero-width spaces, ...
        else:
            out.append(ch)
    clean = " ".join("".join(out).split())
    if len(clean) > MAX_DESCRIPTION:
        clean = clean[: MAX_DESCRIPTION - 1].rstrip() + "…"
    return clean or "(no description)"


def clean_origin(origin: Any) -> dict[str, str]:
    """The ``ORIGIN_FIELDS`` of a submission's origin map that are text, each cleaned like a
    description (one line, no control or bidi characters, capped); anything else dropped."""
    if not isinstance(origin, dict):
        return {}
    return {k: clean_description(origin[k]) for k in ORIGIN_FIELDS
            if isinstance(origin.get(k), str) and origin[k].strip()}


def _json(obj: Any) -> str:
    """What a worker sent (msgpack: bytes, bytes keys, any nesting, any int) as JSON text."""
    return json.dumps(plain(obj), sort_keys=True)


def _compile_error(text: str) -> str | None:
    try:
        compile(text, "train.py", "exec")
    except SyntaxError as exc:
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        src = f"\n    {exc.text.rstrip()}" if exc.text and exc.text.strip() else ""
        return f"train.py does not compile: {type(exc).__name__}: {exc.msg} ({where}){src}"
    except ValueError as exc:  # e.g. NUL bytes in the source
        return f"train.py does not compile: {exc}"
    return None


class Coordinator(contextlib.AbstractContextManager):
    """The research run's state: open it on a research repo made by ``init_repo``."""

    def __init__(self, repo_dir: Path, clock: Callable[[], float] = time.time):
        self.repo_dir = Path(repo_dir).expanduser().resolve()
        self.clock = clock
        self.config = load_run(self.repo_dir)            # FileNotFoundError if not a run
        self._file_lock = acquire_lock(self.repo_dir)    # CoordinatorBusy if taken
        self._mutex = threading.RLock()
        self._tsv_rows: dict[int, str] = {}  # decision id -> rendered results.tsv line
        # Refs to point once the ledger transaction that made their commits has committed.
        self._pending_refs: list[tuple[str, str]] = []
        # Stale decisions the last next_assignment made on its way (the server prints them).
        self._assign_decisions: list[Decision] = []
        self._seen: dict[str, dict] = {}
        self.problems: list[str] = []
        self.ledger: Ledger | None = None
        try:
            self.ledger = Ledger(ledger_path(state_dir(self.repo_dir)))
            stored = self.ledger.get_meta("settings")
            if stored != self.config.settings:
                raise RuntimeError(f"{self.repo_dir}: run.json and the ledger disagree on the run "
                                   f"settings ({self.config.settings} vs {stored})")
            self.settings: dict = dict(stored)
            # How this run decides (defaults filled in; a schema-1 run stays greedy).
            self.decision: dict = decision_settings(self.settings)
            self.rule_settings = rule.RuleSettings.from_settings(self.decision)
            self.tag: str = self.ledger.get_meta("tag")
            self.branch: str = self.ledger.get_meta("branch")
            self.fixed: list[str] = self.reconcile()
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        if self._file_lock is not None and self._file_lock.is_locked:
            self._file_lock.release()
        self._file_lock = None

    def __exit__(self, *exc: Any) -> None:   # __enter__ (returns self): AbstractContextManager
        self.close()

    @property
    def branch_ref(self) -> str:
        return f"refs/heads/{self.branch}"

    def reconcile(self) -> list[str]:
        """Make git agree with the ledger (the truth); return one line per thing fixed."""
        with self._mutex:
            fixes: list[str] = clear_stale_ref_locks(self.repo_dir, self.branch)
            head = self.ledger.head()
            want = head["commit_sha"]
            if rev_parse(self.repo_dir, want) != want:
                raise LedgerError(f"the ledger's head {want} is missing from {self.repo_dir}'s "
                                  "git objects: the repo was damaged; restore it from a clone")
            fixes += self._fix_branch(want)
            have = list_refs(self.repo_dir, CANDIDATE_REFS)
            for row in self.ledger.all("SELECT id, commit_sha FROM candidates "
                                       "WHERE commit_sha IS NOT NULL ORDER BY id"):
                ref = candidate_ref(row["id"])
                if have.get(ref) != row["commit_sha"]:
                    update_ref(self.repo_dir, ref, row["commit_sha"], reason="reconcile")
                    fixes.append(f"{'recreated' if ref not in have else 'reset'} {ref} -> "
                                 f"{row['commit_sha'][:10]}")
            # Rebased texts (a kill -9 between a rebase's ledger commit and its ref).
            have = list_refs(self.repo_dir, REBASED_REFS)
            for row in self.ledger.all(
                    "SELECT id, text_commit AS sha FROM candidates WHERE text_commit IS NOT NULL "
                    "AND text_commit != commit_sha UNION SELECT a.candidate_id, a.commit_sha "
                    "FROM attempts a JOIN candidates c ON c.id = a.candidate_id WHERE "
                    "a.purpose = 'candidate' AND a.commit_sha != c.commit_sha"):
                ref = rebased_ref(row[0], row[1])
                if have.get(ref) != row[1]:
                    update_ref(self.repo_dir, ref, row[1], reason="reconcile")
                    fixes.append(f"recreated {ref[:len(REBASED_REFS) + 20]}...")
            self._after_change(wrote_decision=True)
            return fixes

    def _fix_branch(self, want: str) -> list[str]:
        cur = rev_parse(self.repo_dir, self.branch_ref)
        if cur == want:
            return []
        fixes = []
        if cur and not is_ancestor(self.repo_dir, cur, want):
            # Someone committed to the branch by hand, or it points at junk: keep it reachable.
            n = len(list_refs(self.repo_dir, DISPLACED_REFS))
            update_ref(self.repo_dir, f"{DISPLACED_REFS}{n}", cur, ZERO, reason="reconcile")
            fixes.append(f"saved the displaced branch tip {cur[:10]} as {DISPLACED_REFS}{n}")
        update_ref(self.repo_dir, self.branch_ref, want, reason="reconcile with ledger")
        fixes.append(f"moved {self.branch} from {cur[:10] if cur else '(missing)'} to "
                     f"{want[:10]} (the ledger's head)")
        return fixes

    def _after_change(self, wrote_decision: bool, head_moved: bool = True) -> None:
        """Side effects that follow a committed ledger change: worktree and results.tsv."""
        if head_moved:
            problem = sync_worktree(self.repo_dir, self.branch)
            self.problems = [p for p in self.problems if not p.startswith("could not sync")]
            if problem:
                self.problems.append(problem)
        if wrote_decision:
            try:
                write_results_tsv(self.repo_dir, self.export_tsv())
            except OSError as exc:
                self.problems.append(f"could not write results.tsv: {exc}")

    def _move_branch(self, old: str, new: str) -> None:
        """Advance the branch after the ledger committed a keep (old -> new)."""
        try:
            update_ref(self.repo_dir, self.branch_ref, new, old, reason="autoresearch keep")
        except GitError:
            # The branch was not where we left it (moved by hand?): the ledger wins.
            self.problems.append(f"branch {self.branch} was moved outside the coordinator; "
                                 f"reset to the ledger's head {new[:10]}")
            self._fix_branch(new)

    # ---- small ledger helpers (call inside a transaction) -------------------------------

    def _now(self) -> float:
        return float(self.clock())

    def _set_candidate(self, cid: int, new: str) -> None:
        old = self.ledger.scalar("SELECT state FROM candidates WHERE id = ?", cid)
        st.check_candidate(old, new)
        self.ledger.db.execute("UPDATE candidates SET state = ?, updated_at = ? WHERE id = ?",
                               (new, self._now(), cid))

    def _set_attempt(self, attempt_id: str, new: str, note: str | None = None) -> None:
        old = self.ledger.scalar("SELECT state FROM attempts WHERE attempt_id = ?", attempt_id)
        st.check_attempt(old, new)
        self.ledger.db.execute(
            "UPDATE attempts SET state = ?, finished_at = COALESCE(finished_at, ?), "
            "note = COALESCE(?, note) WHERE attempt_id = ?", (new, self._now(), note, attempt_id))
        self.ledger.db.execute("UPDATE workers SET attempt_id = NULL WHERE attempt_id = ?",
                               (attempt_id,))

    def _head_on(self, hw_class: str) -> scheduling.HeadOnClass:
        """The current head's attempts on one class, summarised (scheduling.head_on_class)."""
        return reports.head_on_class(self.ledger, hw_class)

    def _insert_decision(self, cid: int, verdict: str, hw_class: str | None,
                         head_before: str | None, head_after: str, val_bpb: float | None,
                         head_bpb: float | None, reason: str, attempt_ids: list[str],
                         numbers: dict | None = None) -> Decision:
        """One decision row; ``numbers`` (from ``_numbers``) holds the test that decided it."""
        n = numbers or {}
        self.ledger.db.execute(
            "INSERT INTO decisions(candidate_id, hw_class, verdict, head_before, head_after, "
            "val_bpb, head_bpb, reason, attempt_ids, decided_at, n_candidate, n_head, sigma, "
            "confidence, rule, details) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (cid, hw_class, verdict, head_before, head_after, val_bpb, head_bpb, reason,
             json.dumps(attempt_ids), self._now(), n.get("n_candidate"), n.get("n_head"),
             n.get("sigma"), n.get("confidence"), n.get("rule"),
             json.dumps(n["details"]) if n.get("details") else None))
        desc = self.ledger.scalar("SELECT description FROM candidates WHERE id = ?", cid)
        details = n.get("details") or {}
        return Decision(cid, verdict, hw_class, val_bpb, head_bpb, head_before, head_after,
                        reason, desc or "", reports.runs_text(details, "candidate"),
                        reports.runs_text(details, "head"), n.get("confidence"), n.get("rule"))

    def _fail_candidate(self, cid: int, hw_class: str, reason: str,
                        attempt_ids: list[str]) -> Decision:
        head = self.ledger.head()
        hv = decide.head_value(list(self._head_on(hw_class).values))
        # Its other repeats still running count for nothing now: their results become stale.
        self._cancel_leases(cid, "candidate failed on another run")
        self._set_candidate(cid, st.FAILED)
        return self._insert_decision(cid, st.FAILED, hw_class, head["commit_sha"],
                                     head["commit_sha"], None, hv, reason, attempt_ids)

    def _lose(self, att, new_state: str, reason: str) -> tuple[int | None, Decision | None]:
        """A live lease ends without a counted result (lost or cancelled). Returns
        (requeued candidate id, failure decision) -- at most one of them."""
        self._set_attempt(att["attempt_id"], new_state, note=reason)
        if att["purpose"] != st.PURPOSE_CANDIDATE:
            return None, None  # a head lease: the next worker of that class measures it
        cid = att["candidate_id"]
        if new_state == st.LOST:
            # Losses since the candidate's last retry (an admin's retry starts a fresh count).
            times = self.ledger.scalar(
                "SELECT COUNT(*) FROM attempts WHERE candidate_id = ? AND purpose = 'candidate' "
                "AND (state = 'lost' OR (state = 'stale' AND prior_state = 'lost')) AND rowid > "
                "(SELECT COALESCE(MAX(attempts_before), 0) FROM retries WHERE candidate_id = ?)",
                cid, cid)
            if times >= decide.LOST_LIMIT:
                ids = [r[0] for r in self.ledger.all(
                    "SELECT attempt_id FROM attempts WHERE candidate_id = ? ORDER BY leased_at",
                    cid)]
                return None, self._fail_candidate(cid, att["hw_class"],
                                                  decide.lost_reason(times), ids)
        self._requeue(cid, att["hw_class"])
        return cid, None

    def _live_leases(self, cid: int) -> list[str]:
        """Attempt ids of the candidate's leases still running."""
        return [r[0] for r in self.ledger.all("SELECT attempt_id FROM attempts WHERE "
                                              "candidate_id = ? AND state = 'leased'", cid)]

    def _cancel_leases(self, cid: int, note: str) -> None:
        """The candidate was decided or moved on while some of its runs were still running:
        those count for nothing now (a result that still arrives is stored as stale)."""
        for attempt_id in self._live_leases(cid):
            self._set_attempt(attempt_id, st.CANCELLED, note=note)

    def _unbind(self, cid: int) -> None:
        """Back to the queue, bound to no class: its next run, on any class, is a screen."""
        if self.ledger.candidate(cid)["state"] != st.QUEUED:
            self._set_candidate(cid, st.QUEUED)
        self.ledger.db.execute("UPDATE candidates SET hw_class = NULL, runs_wanted = NULL "
                               "WHERE id = ?", (cid,))

    def _requeue(self, cid: int, hw: str) -> None:
        """A run of candidate ``cid`` on ``hw`` did not count (lost, cancelled, flagged as
        slowed by its machine): lease it again."""
        if self._live_leases(cid):
            return  # other repeats of it are still running: it stays running
        if self._candidate_runs(self.ledger.candidate(cid), hw):
            # It has runs on its class: the missing repeat is leased again there.
            self._set_candidate(cid, st.REPEATING)
            return
        self._unbind(cid)

    # ---- workers ------------------------------------------------------------------------

    def worker_hello(self, worker_id: str, name: str, profile: dict, hw_class: str,
                     attempt_id: str | None, in_flight: str | None = None) -> HelloReply:
        """A worker (re)joins, saying which attempt it is running (or None).

        ``in_flight``: the attempt the server has just sent this worker an assign for, which
        this hello may have crossed -- still its lease (the server sends the assign again). A
        live lease the worker does not hold otherwise never reached it (an assign lost with a
        connection or with the previous coordinator process): cancelled, requeued, no strike.
        The same worker id is the same worker process, so this is never the candidate's fault.
        """
        with self._mutex:
            now = self._now()
            requeued: list[int] = []
            decided = False
            reply = HelloReply()
            with self.ledger.tx() as db:
                db.execute(
                    "INSERT INTO workers(worker_id, name, hw_class, profile, first_seen, "
                    "last_seen, attempt_id, state) VALUES (?,?,?,?,?,?,NULL,'connected') "
                    "ON CONFLICT(worker_id) DO UPDATE SET name = excluded.name, "
                    "hw_class = excluded.hw_class, profile = excluded.profile, "
                    "last_seen = excluded.last_seen, state = 'connected', gone_reason = NULL",
                    (worker_id, name, hw_class, _json(profile if isinstance(profile, dict) else {}),
                     now, now))
                lease = self.ledger.live_lease(worker_id)
                held = attempt_id if attempt_id is not None else in_flight
                if lease is not None and held == lease["attempt_id"]:
                    db.execute("UPDATE workers SET attempt_id = ? WHERE worker_id = ?",
                               (held, worker_id))
                    reply.reattached = True
                else:
                    if lease is not None:  # it came back without the attempt we leased it
                        cid, dec = self._lose(lease, st.CANCELLED,
                                              "the worker does not hold it: the assign never "
                                              "reached it")
                        requeued += [cid] if cid is not None else []
                        decided = dec is not None
                    if attempt_id:
                        reply.cancel_attempt = attempt_id
            reply.requeued = requeued
            self._seen[worker_id] = {"last_seen": now, "progress": None}
            if decided:
                self._after_change(wrote_decision=True, head_moved=False)
            return reply

    def worker_seen(self, worker_id: str, attempt_id: str | None = None,
                    progress: dict | None = None, paused: str | None = None) -> None:
        """A heartbeat (or ready): remember when, the attempt's progress, and why the worker
        takes no new work now (``paused``: its machine says no -- worker.gate; memory only)."""
        with self._mutex:
            seen = self._seen.setdefault(worker_id, {"progress": None})
            seen["last_seen"] = self._now()
            seen["paused"] = paused if isinstance(paused, str) else None
            if attempt_id is not None and isinstance(progress, dict):
                seen["progress"] = dict(progress, attempt_id=attempt_id)

    def worker_lost(self, worker_id: str, reason: str) -> list[int]:
        """The worker went silent: its live lease is lost; returns candidate ids requeued."""
        return self._worker_gone(worker_id, reason, st.LOST)

    def worker_bye(self, worker_id: str, reason: str) -> list[int]:
        """The worker left cleanly: its lease is cancelled (not held against the candidate)."""
        return self._worker_gone(worker_id, reason, st.CANCELLED)

    def _worker_gone(self, worker_id: str, reason: str, lease_state: str) -> list[int]:
        with self._mutex:
            requeued: list[int] = []
            decided = False
            with self.ledger.tx() as db:
                lease = self.ledger.live_lease(worker_id)
                if lease is not None:
                    cid, dec = self._lose(lease, lease_state, f"worker gone: {reason}")
                    requeued += [cid] if cid is not None else []
                    decided = dec is not None
                db.execute("UPDATE workers SET state = 'gone', gone_reason = ?, attempt_id = NULL "
                           "WHERE worker_id = ?", (reason, worker_id))
                w = self.ledger.worker(worker_id)
                if w is not None and w["hw_class"]:
                    requeued += [c for c in self._release_class(w["hw_class"])
                                 if c not in requeued]
            self._seen.pop(worker_id, None)
            if decided:
                self._after_change(wrote_decision=True, head_moved=False)
            return requeued

    def _release_class(self, hw: str) -> list[int]:
        """When class ``hw`` can decide nothing more (``scheduling.class_can_decide``: its last
        live worker is gone, a lid-closed laptop, or the head cannot be measured there) the
        candidates bound there (waiting for repeats, or for the head's runs) could only
        wait, all night. They go back to the queue, unbound, so another class decides them;
        their runs on ``hw`` stay in the ledger (and count again, with the same text, if it
        is bound there again). Returns the ids released."""
        alive = self.ledger.scalar("SELECT COUNT(*) FROM workers WHERE hw_class = ? AND "
                                   "state != 'gone'", hw)
        if scheduling.class_can_decide(alive, self._head_on(hw)):
            return []
        out = []
        for c in self.ledger.all("SELECT id FROM candidates WHERE hw_class = ? AND state IN "
                                 "('measured', 'repeating') ORDER BY id", hw):
            if self._live_leases(c["id"]):
                continue  # a lease elsewhere is still live: it is not stuck
            self._unbind(c["id"])
            out.append(c["id"])
        return out

    def leased_workers(self) -> set[str]:
        with self._mutex:
            return {r[0] for r in self.ledger.all(
                "SELECT DISTINCT worker_id FROM attempts WHERE state = 'leased'")}

    def live_workers(self) -> set[str]:
        """Workers the ledger believes alive: not marked gone, or holding a live lease. After a
        restart each gets one window to say hello, else it is marked gone."""
        with self._mutex:
            return self.leased_workers() | {r[0] for r in self.ledger.all(
                "SELECT worker_id FROM workers WHERE state != 'gone'")}

    # ---- scheduling ---------------------------------------------------------------------

    def next_assignment(self, worker_id: str) -> Assignment | None:
        """The next thing this worker should run, or None (nothing useful, or it holds one).
        The choice is ``scheduling.choose``'s; this gathers its rows and applies it. A chosen
        candidate runs its change on top of the current head: rebased first if its text sits on
        an older one; one that does not replay ends stale and the choice is made again."""
        with self._mutex:
            stale: list[Decision] = []
            with self._refs_after():
                with self.ledger.tx():
                    assignment = self._next_assignment(worker_id, stale)
            if stale:
                self._after_change(wrote_decision=True, head_moved=False)
            self._assign_decisions += stale
            return assignment

    def take_assign_decisions(self) -> list[Decision]:
        """The decisions (stale candidates) made while choosing assignments since the last
        call; the server prints them like a result's."""
        with self._mutex:
            out, self._assign_decisions = self._assign_decisions, []
            return out

    def _next_assignment(self, worker_id: str, stale: list[Decision]) -> Assignment | None:
        w = self.ledger.worker(worker_id)
        if w is None:
            raise ValueError(f"unknown worker {worker_id}: it must say hello first")
        if self.ledger.live_lease(worker_id) is not None:
            return None  # one lease per worker
        hw = w["hw_class"]
        head = self.ledger.head()
        on_head = self._head_on(hw)
        memory = routing.worker_memory(loads(w["profile"], {}))
        skip: set[int] = set()  # went stale just now
        while True:
            queued = [r[0] for r in self.ledger.all(
                "SELECT id, min_memory FROM candidates WHERE state = 'queued' ORDER BY id")
                if r[0] not in skip
                and routing.fits(r[1], memory)]   # routed here for more memory, or not
            choice = scheduling.choose(
                head["candidate_id"], on_head, queued,
                head_runs=int(self.decision["head_runs"]),
                remeasure=self._remeasure_due(hw, on_head),
                in_progress=[p for p in self._in_progress(hw) if p.candidate_id not in skip])
            if choice is None:
                return None
            cand = self.ledger.candidate(choice.candidate_id)
            if choice.purpose == st.PURPOSE_HEAD:
                train_py = self._text_of(head["commit_sha"], cand["train_py"])
                return self._lease(worker_id, hw, cand["id"], head["commit_sha"], train_py,
                                   st.PURPOSE_HEAD, on_head.seeds)
            decision = self._onto_head(cand)
            if decision is not None:
                stale.append(decision)
                skip.add(cand["id"])
                continue
            cand = self.ledger.candidate(cand["id"])  # its text may have just been rebased
            if cand["state"] == st.QUEUED:  # its first run binds it to this class
                self.ledger.db.execute("UPDATE candidates SET hw_class = ?, runs_wanted = 1 "
                                       "WHERE id = ?", (hw, cand["id"]))
            if cand["state"] != st.RUNNING:
                self._set_candidate(cand["id"], st.RUNNING)
            busy = scheduling.busy_seeds(self.ledger.class_attempts(cand["id"], hw),
                                         self._candidate_sha(cand))
            commit, onto = self._text_commit(cand)
            return self._lease(worker_id, hw, cand["id"], commit, self._candidate_text(cand),
                               st.PURPOSE_CANDIDATE, busy, onto=onto)

    # ---- rebasing (coordinator.rebase decides; this applies it) -------------------------

    @staticmethod
    def _text_commit(cand) -> tuple[str, str]:
        """(the commit of the text its runs use now, the head that text sits on)."""
        return (scheduling.field_of(cand, "text_commit") or cand["commit_sha"],
                scheduling.field_of(cand, "text_onto") or cand["base_commit"])

    def _candidate_text(self, cand) -> str:
        commit, _ = self._text_commit(cand)
        return cand["train_py"] if commit == cand["commit_sha"] else read_blob(self.repo_dir,
                                                                                 commit)

    def _onto_head(self, cand) -> Decision | None:
        """Make the candidate's text sit on the current head: nothing if it already does, else
        its change (base -> its train.py) rebased onto the head and stored as a commit whose
        parent is the head. Runs of its earlier text stay stored but no longer count: it is
        screened afresh (one run wanted) on the new text. Returns the stale decision when the
        change does not replay (conflict, or already on the head)."""
        head = self.ledger.head()
        _, onto = self._text_commit(cand)
        if onto == head["commit_sha"]:
            return None
        base = cand["base_commit"]
        r = rebase.rebase(
            self.repo_dir, base_text=read_blob(self.repo_dir, base), text=cand["train_py"],
            head_commit=head["commit_sha"],
            head_text=read_blob(self.repo_dir, head["commit_sha"]),
            keeps=lambda: self._keeps_since(base), head_candidate=head["candidate_id"],
            label=f"#{cand['id']} {cand['description']}")
        if r.kind in (rebase.CONFLICT, rebase.ALREADY):
            return self._stale(cand, r)
        sha = text_sha(r.text)
        message = (f"candidate #{cand['id']} rebased: {cand['description']}\n\n"
                   f"based on: {base}\nrebased onto: {head['commit_sha']} "
                   f"(#{head['candidate_id']})\ncandidate: {cand['commit_sha']}\n"
                   f"sha256(train.py): {sha}\n")
        # Object first: if we die before the ledger commits, it is unreferenced junk.
        commit = commit_object(self.repo_dir,
                               make_tree(self.repo_dir, head["commit_sha"], {"train.py": r.text}),
                               [head["commit_sha"]], message)
        self.ledger.db.execute(
            "UPDATE candidates SET text_commit = ?, text_onto = ?, text_sha = ?, updated_at = ? "
            "WHERE id = ?", (commit, head["commit_sha"], sha, self._now(), cand["id"]))
        self._pending_refs.append((rebased_ref(cand["id"], commit), commit))
        if cand["state"] in (st.RUNNING, st.MEASURED, st.REPEATING):
            # Its runs so far are of the old text: screen the new one (one run, then the rule).
            self.ledger.db.execute("UPDATE candidates SET runs_wanted = 1 WHERE id = ?",
                                   (cand["id"],))
            if cand["state"] != st.REPEATING:
                self._set_candidate(cand["id"], st.REPEATING)
        return None

    def _keeps_since(self, base: str) -> list[rebase.Keep]:
        """The keeps from ``base`` to the head, oldest first (the branch is a chain of them)."""
        out, cur = [], base
        for d in self.ledger.all("SELECT candidate_id, head_before, head_after FROM decisions "
                                 "WHERE verdict = 'kept' ORDER BY id"):
            if d["head_before"] == cur and d["head_after"] != cur:
                out.append(rebase.Keep(d["candidate_id"], d["head_after"],
                                       self._text_of(d["head_after"], "")))
                cur = d["head_after"]
        return out

    def _stale(self, cand, r: rebase.Rebased) -> Decision:
        """End a candidate whose change does not replay onto the head (see states.STALE)."""
        head = self.ledger.head()
        short = head["commit_sha"][:10]
        if r.kind == rebase.ALREADY:
            reason = (f"already there: rebased onto head {short} it is the head's program "
                      f"(#{head['candidate_id']}); not run")
        elif r.conflicts.startswith("the merged train.py does not compile"):
            reason = (f"rebased onto head {short} {r.conflicts[len('the merged '):]}; resubmit "
                      f"on top of head {short}")
        else:
            kept = self.ledger.one("SELECT head_after FROM decisions WHERE candidate_id = ? "
                                   "AND verdict = 'kept'", r.conflicts_with)
            as_ = f" (kept as {kept['head_after'][:10]})" if kept is not None else ""
            reason = (f"conflicts with #{r.conflicts_with}{as_}: resubmit on top of head "
                      f"{short}")
        self._cancel_leases(cand["id"], "candidate went stale: the head moved")
        self._set_candidate(cand["id"], st.STALE)
        details = {"kind": r.kind, "based_on": cand["base_commit"],
                   "resubmit_on": head["commit_sha"], "conflicts_with": r.conflicts_with,
                   "conflicts": r.conflicts}
        return self._insert_decision(cand["id"], st.STALE, scheduling.field_of(cand, "hw_class"),
                                     head["commit_sha"], head["commit_sha"], None, None, reason,
                                     [], {"details": details})

    @contextlib.contextmanager
    def _refs_after(self):
        """Around a ledger transaction that may rebase: afterwards point the refs of the
        commits it stored (a crash in between is repaired by reconcile()); if it rolled back,
        forget them (their commits are unreferenced junk)."""
        try:
            yield
        except BaseException:
            self._pending_refs.clear()
            raise
        while self._pending_refs:
            ref, commit = self._pending_refs.pop(0)
            try:
                update_ref(self.repo_dir, ref, commit, reason="autoresearch rebase")
            except GitError as exc:
                self.problems.append(f"could not point {ref}: {exc}")

    def _in_progress(self, hw: str) -> list[scheduling.InProgress]:
        """Candidates bound to class ``hw`` that may want repeats there, oldest first."""
        out = []
        for c in self.ledger.all("SELECT * FROM candidates WHERE hw_class = ? AND state IN "
                                 "('running', 'repeating') ORDER BY id", hw):
            rows = self.ledger.class_attempts(c["id"], hw)
            out.append(scheduling.InProgress(
                c["id"], int(c["runs_wanted"] or 1),
                len(scheduling.runs_of(rows, self._candidate_sha(c))),
                sum(1 for r in rows if r["state"] == st.LEASED)))
        return out

    def _remeasure_due(self, hw: str, on_head: scheduling.HeadOnClass) -> bool:
        if on_head.last_run_at is None:
            return False
        since = int(self.ledger.scalar(
            "SELECT COUNT(*) FROM decisions WHERE hw_class = ? AND decided_at > ? AND "
            "candidate_id != ?", hw, on_head.last_run_at, self.ledger.head()["candidate_id"]))
        return scheduling.remeasure_due(on_head, since, self._now(),
                                        int(self.decision["remeasure_every"]),
                                        float(self.decision["remeasure_seconds"]))

    def _text_of(self, commit: str, fallback: str) -> str:
        """train.py as it is in ``commit`` (a keep commit holds the candidate as measured)."""
        try:
            return read_blob(self.repo_dir, commit)
        except GitError:
            return fallback

    def _lease(self, worker_id: str, hw: str, cid: int, commit: str, train_py: str,
               purpose: str, busy_seeds: frozenset[int] = frozenset(),
               onto: str | None = None) -> Assignment:
        attempt_id = uuid.uuid4().hex
        now = self._now()
        # Repeat i of a text on a class runs with seed i of the run's sequence (coordinator.seeds)
        index = scheduling.seed_index_for(busy_seeds)
        sha = text_sha(train_py)
        self.ledger.db.execute(
            "INSERT INTO attempts(attempt_id, candidate_id, purpose, worker_id, hw_class, "
            "commit_sha, leased_at, state, seed_index, text_sha, onto) "
            "VALUES (?,?,?,?,?,?,?,'leased',?,?,?)",
            (attempt_id, cid, purpose, worker_id, hw, commit, now, index, sha, onto))
        self.ledger.db.execute("UPDATE workers SET attempt_id = ?, last_seen = ? "
                               "WHERE worker_id = ?", (attempt_id, now, worker_id))
        # The in-memory heartbeat agrees with the ledger's last_seen written just above (status
        # reads the former on a live run and the latter on a stopped one).
        self._seen.setdefault(worker_id, {}).update(progress=None, last_seen=now)
        settings = {k: self.settings[k] for k in RUN_FIELDS}
        settings["seed"] = seeds.seed_for(int(self.settings["seed"]), index)
        return Assignment(attempt_id=attempt_id, candidate_id=cid, commit=commit,
                          train_py=train_py, settings=settings,
                          timeout=float(self.settings["timeout"]), purpose=purpose)

    # ---- results and decisions ----------------------------------------------------------

    def record_result(self, worker_id: str, attempt_id: str,
                      outcome: Outcome | dict) -> ResultAck:
        """Count a worker's result if it is for that worker's live lease (see module doc).
        ``outcome`` is an Outcome, or a wire map (untrusted: read with Outcome.from_wire)."""
        with self._mutex:
            att = self.ledger.attempt(attempt_id)
            if att is None:
                return ResultAck(False, f"unknown attempt {attempt_id}: not stored")
            if att["worker_id"] != worker_id:
                return ResultAck(False, f"attempt {attempt_id} was leased to worker "
                                        f"{att['worker_id']}, not {worker_id}: not stored")
            if att["state"] == st.DONE:
                return ResultAck(True, "duplicate result: already counted")
            if att["state"] == st.STALE:
                return ResultAck(False, "duplicate of a stale result: not counted")
            oc = outcome if isinstance(outcome, Outcome) else Outcome.from_wire(outcome)
            status = oc.status
            if att["state"] in (st.LOST, st.CANCELLED):
                with self.ledger.tx():
                    self._store_outcome(att, oc)
                    st.check_attempt(att["state"], st.STALE)
                    self.ledger.db.execute(
                        "UPDATE attempts SET state = 'stale', prior_state = ?, finished_at = ? "
                        "WHERE attempt_id = ?", (att["state"], self._now(), attempt_id))
                return ResultAck(False, f"attempt was {att['state']} before this result arrived:"
                                        " stored as stale, not counted")
            # The live lease of this worker.
            decisions: list[Decision] = []
            old_head = self.ledger.head()["commit_sha"]
            note = ""
            with self._refs_after(), self.ledger.tx():
                self._store_outcome(att, oc)
                if status == CANCELLED:
                    cid, dec = self._lose(att, st.CANCELLED, oc.note or "cancelled by the worker")
                    note = f"cancelled: candidate #{cid} requeued" if cid is not None else \
                        "cancelled"
                    decisions += [dec] if dec else []
                else:
                    self._set_attempt(attempt_id, st.DONE)
                    judged = self._judge_slowdown(att, oc) if status == OK else None
                    if judged is not None and judged.flagged:
                        note = judged.reason
                        if att["purpose"] == st.PURPOSE_CANDIDATE:
                            self._requeue(att["candidate_id"], att["hw_class"])
                    elif att["purpose"] == st.PURPOSE_CANDIDATE and status != OK:
                        route = self._route_oom(att) if status == OOM else None
                        if route is not None and route.requeue:
                            self._apply_route(att, route)
                            note = route.reason
                        else:
                            reason = decide.failure_reason(oc, att["hw_class"])
                            if route is not None:   # ran out of memory on the largest class
                                reason = f"{reason}; {route.reason}"
                            decisions.append(self._fail_candidate(
                                att["candidate_id"], att["hw_class"], reason, [attempt_id]))
                    elif att["purpose"] == st.PURPOSE_HEAD and status == OK:
                        note = self._check_drift(att)
                    elif att["purpose"] == st.PURPOSE_HEAD:
                        released = self._release_class(att["hw_class"])
                        if released:
                            note = (f"head #{att['candidate_id']} cannot be measured on "
                                    f"{att['hw_class']}: requeued "
                                    f"{', '.join(f'#{c}' for c in released)}")
                    decisions += self._decide_class(att["hw_class"])
                new_head = self.ledger.head()["commit_sha"]
            if new_head != old_head:
                self._move_branch(old_head, new_head)
            self._after_change(wrote_decision=True, head_moved=new_head != old_head)
            verdicts = "; ".join(f"#{d.candidate_id} {d.verdict}" for d in decisions)
            if not note or verdicts:
                note = "; ".join(x for x in (note, verdicts) if x)
                if not note and status == OK:
                    note = (self._waiting_note(att["candidate_id"])
                            if att["purpose"] == st.PURPOSE_CANDIDATE else
                            f"head #{att['candidate_id']} measured on {att['hw_class']}")
                elif not note:
                    note = f"head #{att['candidate_id']} measurement failed: {status}"
            return ResultAck(True, note, decisions)

    def _waiting_note(self, cid: int) -> str:
        c = self.ledger.candidate(cid)
        state = c["state"] if c is not None else "?"
        if state == st.REPEATING:
            return f"measured: repeats wanted ({c['runs_wanted']} runs in all)"
        if state == st.RUNNING:
            return "measured: its other repeats are still running"
        return "measured: waiting for the head's runs on this class"

    def _check_drift(self, att) -> str:
        """A head re-run beyond the noise: say so on the attempt (the log shows its note)."""
        hw = att["hw_class"]
        on_head = self._head_on(hw)
        sigma = reports.class_noise(self.ledger, hw, float(self.decision["noise_prior"])).sigma
        d = noise_model.drift(list(on_head.values), sigma)
        if d is None or on_head.runs[-1].attempt_id != att["attempt_id"]:
            return ""
        text = f"head drift on {hw}: {d.describe()}"
        self.ledger.db.execute("UPDATE attempts SET note = ? WHERE attempt_id = ?",
                               (text, att["attempt_id"]))
        return text

    def _store_outcome(self, att, oc: Outcome) -> None:
        """The outcome as the worker classified it, note included (it says why the status),
        with the worker's machine readings and the run's average tok/s."""
        self.ledger.db.execute(
            "UPDATE attempts SET status = ?, val_bpb = ?, summary = ?, log_tail = ?, "
            "exit_code = ?, wall_seconds = ?, note = COALESCE(?, note), conditions = ?, "
            "tok_per_sec = ? WHERE attempt_id = ?",
            (oc.status, oc.val_bpb, _json(oc.result), oc.log_tail or None, oc.exit_code,
             oc.wall_seconds, oc.note or None, _json(oc.conditions) if oc.conditions else None,
             slowdown.run_tok_per_sec(oc.result), att["attempt_id"]))

    def _judge_slowdown(self, att, oc: Outcome) -> slowdown.Judgement:
        """Did the worker's machine slow this ok run (``coordinator.slowdown``)? A flagged run
        is marked (``attempts.flagged``: ``scheduling.is_run`` leaves it out of everything)
        and its note says why; a run counted despite machine evidence says that too."""
        same_text = [r for r in self.ledger.class_attempts(att["candidate_id"], att["hw_class"])
                     if r["attempt_id"] != att["attempt_id"]
                     and (r["text_sha"] is None or att["text_sha"] is None
                          or r["text_sha"] == att["text_sha"])]
        refs = [r["tok_per_sec"] for r in same_text
                if scheduling.is_run(r) and r["tok_per_sec"] is not None]
        judged = slowdown.judge(oc.result, oc.conditions, refs,
                                sum(1 for r in same_text if r["flagged"]))
        if judged.reason:
            self.ledger.db.execute(
                "UPDATE attempts SET flagged = ?, note = TRIM(COALESCE(note || '; ', '') || ?) "
                "WHERE attempt_id = ?",
                (judged.reason if judged.flagged else None, judged.reason, att["attempt_id"]))
        return judged

    def _route_oom(self, att) -> routing.Route:
        """Where a candidate goes after running out of memory on ``att``'s class."""
        me = self.ledger.worker(att["worker_id"])
        memory = routing.worker_memory(loads(me["profile"], {})) if me is not None else None
        cand = self.ledger.candidate(att["candidate_id"])
        connected = [(w["hw_class"], routing.worker_memory(loads(w["profile"], {})))
                     for w in self.ledger.all("SELECT hw_class, profile FROM workers "
                                              "WHERE state = 'connected'")]
        return routing.after_oom(att["hw_class"], memory, cand["min_memory"], connected)

    def _apply_route(self, att, route: routing.Route) -> None:
        """Requeue an out-of-memory candidate for workers with more memory than ``route``
        says it needs: unbound from this class (measured from scratch where it lands), its
        other leases here cancelled (they would run out of memory too)."""
        cid = att["candidate_id"]
        self._cancel_leases(cid, "candidate routed to more memory")
        self.ledger.db.execute(
            "INSERT INTO routes(candidate_id, from_class, memory, reason, routed_at) "
            "VALUES (?,?,?,?,?)", (cid, att["hw_class"], route.min_memory, route.reason,
                                   self._now()))
        self._unbind(cid)
        self.ledger.db.execute("UPDATE candidates SET min_memory = ? WHERE id = ?",
                               (route.min_memory, cid))

    def _candidate_sha(self, cand) -> str:
        """sha256 of the text a candidate's runs must have to count for it: the text it would
        be kept as (its own train.py on its base, or its change rebased onto the head)."""
        return scheduling.field_of(cand, "text_sha") or cand["sha256"]

    def _candidate_runs(self, cand, hw: str) -> tuple[rule.Run, ...]:
        return scheduling.runs_of(self.ledger.class_attempts(cand["id"], hw),
                                  self._candidate_sha(cand))

    def _decide_class(self, hw: str) -> list[Decision]:
        """Apply the rule to every candidate on class ``hw`` whose leases are all in, oldest
        first. A keep changes the head, so the rest are then judged against the new head (and
        wait for its runs there)."""
        out: list[Decision] = []
        done: set[int] = set()
        while True:
            rows = [c for c in self.ledger.all(
                "SELECT * FROM candidates WHERE hw_class = ? AND state IN ('running', "
                "'measured', 'repeating') ORDER BY id", hw) if c["id"] not in done]
            head_moved = False
            for c in rows:
                if self._live_leases(c["id"]):
                    continue  # decided when all its runs are in
                done.add(c["id"])
                d = self._evaluate(c, hw)
                if d is not None:
                    out.append(d)
                    if d.verdict == st.KEPT:
                        head_moved = True
                        break
            if not head_moved:
                return out
            done = set()  # a new head: every waiting candidate is looked at again

    def _evaluate(self, c, hw: str) -> Decision | None:
        """One candidate through coordinator.rule; apply its verdict. None unless decided.

        A keep needs runs of its text on the current head. If the head moved since its text was
        made, its runs are judged against the head they were measured on: shown worse there is
        a discard (a merge queue rejects what fails on its own base), anything else is rebased
        onto the current head and screened afresh (or ends stale if it does not replay)."""
        moved = self._outdated_discard(c, hw)
        if moved is not None:
            return moved
        stale = self._onto_head(c)
        if stale is not None:
            return stale
        c = self.ledger.candidate(c["id"])
        runs = self._candidate_runs(c, hw)
        if not runs:
            return None
        on_head = self._head_on(hw)
        v = None
        if on_head.enough(int(self.decision["head_runs"])):
            noise = reports.class_noise(self.ledger, hw, float(self.decision["noise_prior"]))
            v = rule.decide(on_head.runs, runs, noise, self.rule_settings)
        if v is None or v.action == rule.WAIT:
            if c["state"] != st.MEASURED:
                self._set_candidate(c["id"], st.MEASURED)
            return None
        if v.action == rule.MORE:
            self.ledger.db.execute("UPDATE candidates SET runs_wanted = ? WHERE id = ?",
                                   (len(runs) + v.more, c["id"]))
            if c["state"] != st.REPEATING:
                self._set_candidate(c["id"], st.REPEATING)
            return None
        cmp = v.comparison
        head = self.ledger.head()
        ids = [r.attempt_id for r in runs] + list(on_head.attempt_ids)
        new_head = head["commit_sha"]
        if v.action == rule.KEEP:
            new_head = self._keep_commit(c, hw, head, on_head, runs, v)
            self.ledger.db.execute(
                "UPDATE head SET commit_sha = ?, candidate_id = ?, updated_at = ?, text_sha = ? "
                "WHERE id = 1", (new_head, c["id"], self._now(), self._candidate_sha(c)))
        verdict = st.KEPT if v.action == rule.KEEP else st.DISCARDED
        self._set_candidate(c["id"], verdict)
        return self._insert_decision(c["id"], verdict, hw, head["commit_sha"], new_head,
                                     cmp.candidate_mean, cmp.head_mean, f"{v.reason} on {hw}",
                                     ids, self._numbers(v, on_head.runs, runs))

    def _outdated_discard(self, c, hw: str) -> Decision | None:
        """The discard of a candidate whose runs are of a text on an older head and lose to that
        head there; None when its text is on the current head or the old head's verdict is not
        a discard."""
        _, onto = self._text_commit(c)
        head = self.ledger.head()
        if onto == head["commit_sha"]:
            return None
        runs = self._candidate_runs(c, hw)
        if not runs:
            return None
        was = self.ledger.one("SELECT d.candidate_id, c.text_sha, c.sha256 FROM decisions d "
                              "JOIN candidates c ON c.id = d.candidate_id WHERE d.verdict = "
                              "'kept' AND d.head_after = ? ORDER BY d.id LIMIT 1", onto)
        if was is None:
            return None
        old = scheduling.head_on_class(self.ledger.class_attempts(was["candidate_id"], hw),
                                       was["text_sha"] or was["sha256"])
        if not old.enough(int(self.decision["head_runs"])):
            return None
        noise = reports.class_noise(self.ledger, hw, float(self.decision["noise_prior"]))
        v = rule.decide(old.runs, runs, noise, self.rule_settings)
        if v.action != rule.DISCARD:
            return None
        cmp = v.comparison
        self._cancel_leases(c["id"], "candidate discarded on another run")
        self._set_candidate(c["id"], st.DISCARDED)
        reason = (f"{v.reason} on {hw}, against head #{was['candidate_id']} {onto[:10]} it was "
                  f"measured on (the head has moved since)")
        return self._insert_decision(c["id"], st.DISCARDED, hw, head["commit_sha"],
                                     head["commit_sha"], cmp.candidate_mean, cmp.head_mean,
                                     reason, [r.attempt_id for r in runs] +
                                     list(old.attempt_ids), self._numbers(v, old.runs, runs))

    @staticmethod
    def _numbers(v: rule.Verdict, head_runs, runs) -> dict:
        """The decision row's numbers: n each side, σ, confidence, rule, the comparison and
        the paired differences (the noise model pools those for σ_paired)."""
        cmp = v.comparison
        by_seed = {r.seed_index: r.value for r in head_runs}
        diffs = [r.value - by_seed[r.seed_index] for r in runs if r.seed_index in by_seed]
        details = dict(cmp.to_dict(), paired_differences=diffs,
                       candidate_runs=[[r.seed_index, r.value] for r in runs],
                       head_runs=[[r.seed_index, r.value] for r in head_runs])
        return {"n_candidate": cmp.n_candidate, "n_head": cmp.n_head, "sigma": cmp.sigma,
                "confidence": cmp.confidence, "rule": v.rule, "details": details}

    def _keep_commit(self, c, hw: str, head, on_head, runs, v: rule.Verdict) -> str:
        """The keep commit object (written before the ledger commits: if we die first it is
        unreferenced junk). Its message carries the numbers a reader checks the keep by."""
        cmp = v.comparison
        margin = float(self.decision["margin"])
        df = "prior" if cmp.df is None else f"{cmp.df} df"
        text_commit, onto = self._text_commit(c)
        if onto != head["commit_sha"]:  # _evaluate rebases before deciding: a bug if not
            raise RuntimeError(f"candidate #{c['id']} measured on {onto}, not on the head")
        rebased = ("not rebased (based on this head)" if onto == c["base_commit"] else
                   f"{onto} (#{head['candidate_id']})")
        message = (
            f"keep #{c['id']}: {c['description']}\n\n"
            f"val_bpb: {rule.fmt_runs(cmp.head_mean, cmp.head_sem, cmp.n_head)} -> "
            f"{rule.fmt_runs(cmp.candidate_mean, cmp.candidate_sem, cmp.n_candidate)} on {hw}"
            f" (mean ± sem (runs))\n"
            f"decided by: {v.rule}, {100 * cmp.confidence:.1f}% confident better by more than "
            f"margin {margin:g} (σ {cmp.sigma:.4f}, {cmp.sigma_source}, {df})\n"
            f"hardware class: {hw}\n"
            f"candidate: #{c['id']} {c['commit_sha']}\n"
            f"based on: {c['base_commit']}{self._name_of(c['base_commit'])}\n"
            f"rebased onto: {rebased}\n"
            f"measured text: {text_commit} sha256(train.py) {self._candidate_sha(c)}\n"
            f"head before: #{head['candidate_id']} {head['commit_sha']}\n"
            f"candidate attempts (seed index): "
            f"{', '.join(f'{r.attempt_id} ({r.seed_index})' for r in runs)}\n"
            f"head attempts (seed index): "
            f"{', '.join(f'{r.attempt_id} ({r.seed_index})' for r in on_head.runs)}\n")
        # The tree is the candidate as measured: its text on this very head (_evaluate rebased
        # it first), so the keep never drops what was kept since its base.
        return commit_object(self.repo_dir, commit_tree_of(self.repo_dir, text_commit),
                             [head["commit_sha"]], message)

    def _name_of(self, commit: str) -> str:
        """`` (#k)`` if ``commit`` is a head of this run (a keep, or the baseline), else ""."""
        row = self.ledger.one("SELECT candidate_id FROM decisions WHERE verdict = 'kept' AND "
                              "head_after = ? ORDER BY id LIMIT 1", commit)
        return f" (#{row[0]})" if row is not None else ""

    # ---- clients ------------------------------------------------------------------------

    def submit(self, train_py: str, description: str, base: str | None = None,
               origin: dict | None = None) -> dict:
        """Queue a train.py variant; SubmitRejected if it cannot be run. The same program as an
        earlier candidate (coordinator.identity: comments and formatting ignored) is answered
        with that candidate (``duplicate: True``, ``same_program_as``) and not queued again;
        so is the head's own program (nothing to try). ``origin`` (tool, proposer, host,
        transcript) is kept beside it (``clean_origin``)."""
        if not isinstance(train_py, str):
            raise SubmitRejected("train.py must be text")
        size = len(train_py.encode("utf-8", "surrogatepass"))
        if size > MAX_TRAIN_PY_BYTES:
            raise SubmitRejected(f"train.py is {size} bytes; the limit is {MAX_TRAIN_PY_BYTES}")
        err = _compile_error(train_py)
        if err:
            raise SubmitRejected(err)
        desc = clean_description(description)
        where = clean_origin(origin)
        sha = text_sha(train_py)
        program = program_sha(train_py)
        with self._mutex:
            row = (self.ledger.one("SELECT * FROM candidates WHERE sha256 = ?", sha)
                   or self.ledger.one("SELECT * FROM candidates WHERE program_sha = ? "
                                      "ORDER BY id LIMIT 1", program)
                   or self._head_if_same_program(program))
            if row is not None:
                out = reports.candidate_summary(self.ledger, row, duplicate=True)
                out["same_program_as"] = row["id"]
                return out
            if base is None or str(base).strip() == "":
                base_commit = self.ledger.head()["commit_sha"]
            elif (not isinstance(base, str) or len(base) > MAX_BASE or "\x00" in base
                  or base.strip().startswith("-")):
                raise SubmitRejected(f"base {str(base)[:80]!r} is not a commit in the research "
                                     "repo")
            else:
                base_commit = rev_parse(self.repo_dir, str(base).strip())
                if base_commit is None:
                    raise SubmitRejected(f"base {base!r} is not a commit in the research repo")
            now = self._now()
            with self.ledger.tx() as db:
                cid = int(self.ledger.scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM candidates"))
                tree = make_tree(self.repo_dir, base_commit, {"train.py": train_py})
                came = "".join(f"{k}: {v}\n" for k, v in where.items())
                commit = commit_object(self.repo_dir, tree, [base_commit],
                                       f"candidate #{cid}: {desc}\n\nbase: {base_commit}\n"
                                       f"sha256(train.py): {sha}\n{came}")
                db.execute("INSERT INTO candidates(id, description, sha256, train_py, "
                           "base_commit, commit_sha, state, created_at, updated_at, program_sha,"
                           " text_commit, text_onto, text_sha) "
                           "VALUES (?,?,?,?,?,?,'queued',?,?,?,?,?,?)",
                           (cid, desc, sha, train_py, base_commit, commit, now, now, program,
                            commit, base_commit, sha))
                if where:
                    db.execute("INSERT INTO origins(candidate_id, tool, proposer, host, "
                               "transcript) VALUES (?,?,?,?,?)",
                               (cid, *(where.get(k) for k in ORIGIN_FIELDS)))
            # After the commit: a crash here leaves the ref missing; reconcile() recreates it.
            update_ref(self.repo_dir, candidate_ref(cid), commit, reason="autoresearch submit")
            row = self.ledger.candidate(cid)
            out = reports.candidate_summary(self.ledger, row)
            out["queue_position"] = int(self.ledger.scalar(
                "SELECT COUNT(*) FROM candidates WHERE state = 'queued' AND id <= ?", cid))
            return out

    def _head_if_same_program(self, program: str):
        """The head's candidate row if ``program`` is the head's train.py as it stands (a
        rebased keep's text is not any candidate's submitted text)."""
        head = self.ledger.head()
        try:
            same = program_sha(read_blob(self.repo_dir, head["commit_sha"])) == program
        except (GitError, SyntaxError, ValueError):
            return None
        return self.ledger.candidate(head["candidate_id"]) if same else None

    def candidate(self, cid: int) -> dict | None:
        """One candidate's summary (state, commit, val_bpb, verdict), or None."""
        with self._mutex:
            row = self.ledger.candidate(cid)
            return None if row is None else reports.candidate_summary(self.ledger, row)

    # ---- admin --------------------------------------------------------------------------

    def retry(self, cid: Any, reason: Any, requested_by: str | None = None) -> dict:
        """An admin sends a failed candidate back to the queue (RetryRefused otherwise).

        One transaction: a ``retries`` row keeps the reason and the superseded decision, the
        decision row goes (a candidate has at most one), the candidate is queued again. Its
        attempts stay in the ledger; only losses after the retry count toward its limit."""
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise RetryRefused(f"candidate id must be an integer, not {cid!r}")
        why = clean_description(reason)
        if why == "(no description)":
            raise RetryRefused("say why the candidate is retried (--reason)")
        with self._mutex:
            row = self.ledger.candidate(cid)
            if row is None or cid == 0:
                raise RetryRefused(f"no candidate #{cid}" if row is None else
                                   "#0 is the baseline: it is never retried")
            if row["state"] not in st.RETRYABLE:
                raise RetryRefused(f"candidate #{cid} is {row['state']}: only "
                                   f"{' or '.join(sorted(st.RETRYABLE))} candidates can be "
                                   "retried")
            with self.ledger.tx() as db:
                old = self.ledger.decision(cid)
                db.execute(
                    "INSERT INTO retries(candidate_id, reason, requested_by, retried_at, "
                    "from_state, decision, attempts_before) VALUES (?,?,?,?,?,?,"
                    "(SELECT COALESCE(MAX(rowid), 0) FROM attempts))",
                    (cid, why, requested_by, self._now(), row["state"],
                     None if old is None else json.dumps(dict(old), sort_keys=True)))
                db.execute("DELETE FROM decisions WHERE candidate_id = ?", (cid,))
                self._set_candidate(cid, st.QUEUED)
            if old is not None:
                self._tsv_rows.pop(old["id"], None)
            self._after_change(wrote_decision=True, head_moved=False)   # results.tsv
            out = reports.candidate_summary(self.ledger, self.ledger.candidate(cid))
            out.update(retried_from=row["state"], reason=why,
                       previous_reason=None if old is None else old["reason"])
            return out

    # ---- reports (coordinator.reports, under this coordinator's lock) -------------------

    def status(self) -> dict:
        """Everything a person wants at a glance; plain JSON-able types."""
        with self._mutex:
            return reports.status(self.ledger, self.repo_dir, seen=self._seen,
                                  problems=self.problems, reconciled=self.fixed)

    def log(self, limit: int = 50) -> dict:
        """Recent attempts and decisions, newest first (and merged, as ``entries``)."""
        with self._mutex:
            return reports.log(self.ledger, limit)

    def export_tsv(self) -> str:
        """results.tsv in upstream's format: one row per decided candidate, oldest first."""
        with self._mutex:
            return reports.export_tsv(self.ledger, self._tsv_rows)
