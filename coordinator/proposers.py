"""Proposers: keep the coordinator's queue full with agents' ideas and with sweep points.

Client side: ``autoresearch-coord agents`` / ``sweep`` run this on any machine that reaches the
coordinator. Everything it needs comes from a *source* with two calls: ``snapshot()`` (the
head's train.py and commit, recent decisions, what is in flight, failures, noise, the workers
connected: see ``coordinator.brief``) and ``submit(train_py, description, base)``. The wire
source is in the CLI; tests may hand in anything with those two methods.

One agent cycle (``AgentRunner``), for each of ``count`` proposer slots p1..pN:

  1. a fresh proposal directory ``OUT/<utc time>-<slot>-<rand>/`` with ``work/train.py`` (the
     head's, from the snapshot) and ``work/brief.md`` (``coordinator.brief.render_brief``);
  2. the user's command runs with cwd ``work/`` in its own process group (its own session),
     stdout and stderr going to ``transcript.txt``; placeholders in the command are replaced
     per argument; the same paths are in the environment (``AGENT_ENV``);
  3. at ``timeout`` the whole group gets SIGTERM, then SIGKILL after ``KILL_GRACE`` seconds;
     an agent that exits leaves no stragglers either (its group is killed before it is reaped);
  4. the edited ``work/train.py`` and the first line of ``work/description.txt`` are judged
     (``judge_proposal``) and, unless unchanged / not compiling / the agent failed, submitted
     with base = the head the agent started from; ``proposal.json`` says what happened and
     ``OUT/proposals.jsonl`` gets one line per proposal; ``OUT/by-candidate/<id>`` links to
     the proposal directory of candidate ``<id>``;
  5. the slot's next brief says what this proposal got back. A slot whose agent failed, timed
     out or returned nothing usable waits ``pacing.backoff(failures)`` before its next try.

Backpressure (``coordinator.pacing``): agents start only while the candidates in flight plus
the proposals being written stay within the workers that take work plus ``slack``.

Stopping: ``stop(kill=False)`` (first Ctrl-C) starts nothing new and lets running agents finish
and be submitted; ``stop(kill=True)`` (second Ctrl-C, or SIGTERM) kills their groups now. State
that matters is the coordinator's: a submission either reached it or is still on disk in its
proposal directory (``proposal.json`` state ``unsent``, sent by the next runner on the same
OUT: ``resume_unsent``), so ``kill -9`` of the runner loses nothing the coordinator accepted. On Linux the agent process itself is killed when the runner
dies (``PR_SET_PDEATHSIG``; processes the agent started may outlive a ``kill -9`` of the runner,
nothing can reach them then); on macOS a killed runner leaves its agents to finish on their own.

Command: ``shlex.split`` once, no shell: placeholders are replaced inside each argument, so a
path with spaces stays one argument and nothing in a path is ever interpreted. Write
``sh -c '...'`` yourself for pipes, and use ``"$AUTORESEARCH_BRIEF"`` etc. inside it (a
placeholder pasted into a shell script would be parsed by that shell).
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from coordinator import pacing
from coordinator.states import CANDIDATE_FINAL
from shared.protocol import ORIGIN_FIELDS
from coordinator.brief import (
    AGENT_ENV, BRIEF_NAME, DESCRIPTION_NAME, TRAIN_PY_NAME, BriefContext, Feedback, fmt_value,
    render_brief,
)

PLACEHOLDERS = tuple(AGENT_ENV)
KILL_GRACE = 5.0          # seconds between SIGTERM and SIGKILL of an agent's group
POLL_SECONDS = 0.2        # how often running agents are checked
# How often the coordinator is asked what is in flight (and again right after each submit).
# A brief costs the coordinator ~70 ms at 1000 decided candidates (benchmarks/proposers.py):
# 5 s keeps one runner's polling near 1% of its core; runs last minutes, so nothing waits.
SNAPSHOT_SECONDS = 5.0
DEFAULT_TIMEOUT = 900.0   # seconds an agent gets by default
DEFAULT_DECISIONS = 20    # decisions shown in a brief
INDEX = "proposals.jsonl"
BY_CANDIDATE = "by-candidate"


class SourceUnavailable(RuntimeError):
    """The coordinator did not answer (it may be restarting): try again later."""


class Refused(RuntimeError):
    """The coordinator answered with a refusal (the message says why)."""


class Source(Protocol):
    def snapshot(self, watch: list[int]) -> dict: ...
    def submit(self, train_py: str, description: str, base: str | None,
               origin: dict | None = None) -> dict: ...


def origin(tool: str, proposer: str | None = None, transcript: Path | None = None) -> dict:
    """Where a submission comes from (``shared.protocol.ORIGIN_FIELDS``): the coordinator
    keeps it, and its log points there."""
    values = {"tool": tool, "proposer": proposer, "host": socket.gethostname(),
              "transcript": None if transcript is None else str(transcript)}
    return {k: values[k] for k in ORIGIN_FIELDS if values.get(k)}


def with_head(snapshot: dict, head: dict) -> dict:
    """A brief snapshot completed with the head's files (``query head``): the head's train.py
    goes into ``head``, program.md beside it."""
    return {**snapshot, "program_md": head.get("program_md", ""),
            "head": {**(snapshot.get("head") or {}), "commit": head.get("commit"),
                     "candidate_id": head.get("candidate_id"),
                     "train_py": head.get("train_py")}}


# ---- the command --------------------------------------------------------------------------

def parse_command(command: str) -> list[str]:
    """The user's ``--command`` as an argv template; ValueError with a one-line reason."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"--command {command!r}: {exc}") from None
    if not argv:
        raise ValueError("--command is empty")
    return argv


def expand(argv: list[str], values: dict[str, str]) -> list[str]:
    """Replace the placeholders inside every argument (other braces are left alone)."""
    out = []
    for arg in argv:
        for ph, value in values.items():
            arg = arg.replace(ph, value)
        out.append(arg)
    return out


# ---- one proposal on disk -----------------------------------------------------------------

@dataclass
class Proposal:
    slot: str
    dir: Path
    head_commit: str
    head_train_py: str
    started: float = 0.0            # wall clock (time.time), for the record
    deadline: float = 0.0           # runner clock
    proc: subprocess.Popen | None = None
    kill_at: float | None = None    # SIGKILL the group at this runner-clock time
    timed_out: bool = False
    killed: bool = False            # stopped by the runner (timeout or stop(kill=True))
    transcript: Any = None          # open file

    @property
    def workdir(self) -> Path:
        return self.dir / "work"

    @property
    def train_py(self) -> Path:
        return self.workdir / TRAIN_PY_NAME

    @property
    def brief(self) -> Path:
        return self.workdir / BRIEF_NAME

    @property
    def description_file(self) -> Path:
        return self.workdir / DESCRIPTION_NAME

    @property
    def transcript_path(self) -> Path:
        return self.dir / "transcript.txt"

    def placeholders(self) -> dict[str, str]:
        return {"{brief}": str(self.brief), "{workdir}": str(self.workdir),
                "{train_py}": str(self.train_py), "{description}": str(self.description_file)}


def new_proposal(out_dir: Path, slot: str, head_commit: str, head_train_py: str) -> Proposal:
    """A fresh proposal directory holding the head's train.py (brief written by the caller)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    d = Path(out_dir) / f"{stamp}-{slot}-{secrets.token_hex(2)}"
    (d / "work").mkdir(parents=True)
    p = Proposal(slot=slot, dir=d, head_commit=head_commit, head_train_py=head_train_py,
                 started=time.time())
    p.train_py.write_text(head_train_py, encoding="utf-8")
    return p


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


def append_index(out_dir: Path, record: dict) -> None:
    """One line per finished proposal; a line is written whole or (killed mid-write) cut short,
    and readers skip a line that does not parse."""
    with open(Path(out_dir) / INDEX, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def link_candidate(out_dir: Path, candidate_id: int, proposal_dir: Path) -> None:
    links = Path(out_dir) / BY_CANDIDATE
    links.mkdir(exist_ok=True)
    link = links / str(candidate_id)
    tmp = links / f".{candidate_id}.{secrets.token_hex(2)}"
    os.symlink(os.path.relpath(proposal_dir, links), tmp)
    os.replace(tmp, link)


# ---- the agent process --------------------------------------------------------------------

def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the agent when the runner dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1

    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    return set_pdeathsig


def start_agent(p: Proposal, argv_template: list[str], timeout: float, clock_now: float,
                extra_env: dict | None = None) -> None:
    """Start the agent for proposal ``p`` in its own session; output to its transcript."""
    values = p.placeholders()
    argv = expand(argv_template, values)
    env = {**os.environ, **{AGENT_ENV[k]: v for k, v in values.items()},
           "AUTORESEARCH_PROPOSER": p.slot, **(extra_env or {})}
    p.transcript = open(p.transcript_path, "ab")
    p.transcript.write(f"$ {shlex.join(argv)}\n".encode())
    p.transcript.flush()
    try:
        p.proc = subprocess.Popen(argv, cwd=p.workdir, env=env, stdin=subprocess.DEVNULL,
                                  stdout=p.transcript, stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=_die_with_parent())
    except OSError as exc:
        p.transcript.write(f"cannot start the agent: {exc}\n".encode())
        p.transcript.close()
        raise
    p.deadline = clock_now + timeout


def signal_group(p: Proposal, sig: int) -> None:
    if p.proc is None:
        return
    try:
        os.killpg(p.proc.pid, sig)   # its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def exited(p: Proposal) -> int | None:
    """The agent's exit status once it has exited; its group is SIGKILLed *before* it is
    reaped, so the group id cannot have been reused by then and no straggler survives."""
    proc = p.proc
    if proc is None:
        return None
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, AttributeError, OSError):
        info = True if proc.poll() is not None else None
    if info is None:
        return None
    signal_group(p, signal.SIGKILL)
    return proc.wait()


# ---- judging what came back ---------------------------------------------------------------

@dataclass(frozen=True)
class Judged:
    kind: str                # "submit" or a coordinator.brief.FEEDBACK_KINDS key
    detail: str = ""
    description: str = ""


def read_description(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())
    return ""


def judge_proposal(head_text: str, text: str | None, description: str, returncode: int | None,
                   timed_out: bool, timeout: float) -> Judged:
    """What to do with what an agent left behind. Pure."""
    if timed_out:
        return Judged("timeout", f"killed after {timeout:g} s", description)
    if returncode != 0:
        how = (f"killed by signal {-returncode}" if returncode is not None and returncode < 0
               else f"exit status {returncode}")
        return Judged("agent_failed", how, description)
    if text is None:
        return Judged("no_train_py", "work/train.py was deleted or unreadable", description)
    if text == head_text:
        return Judged("unchanged", "", description)
    try:
        compile(text, "train.py", "exec")
    except (SyntaxError, ValueError) as exc:
        where = f" (line {exc.lineno})" if getattr(exc, "lineno", None) else ""
        return Judged("does_not_compile", f"{type(exc).__name__}: {exc}{where}", description)
    return Judged("submit", "", description)


def is_duplicate(reply: dict, description: str, base: str) -> bool:
    """A ``duplicate`` reply that is really our own submission answered twice (the client
    re-sends a request whose reply was lost) is not a duplicate: same base, same description,
    still undecided."""
    if not reply.get("duplicate"):
        return False
    ours = (reply.get("base") == base and not reply.get("verdict")
            and reply.get("description") == " ".join(description.split()))
    return not ours


# ---- the loops ----------------------------------------------------------------------------

def default_say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


@dataclass
class Slot:
    name: str
    failures: int = 0               # consecutive, for the backoff
    not_before: float = 0.0         # runner clock
    previous: Feedback | None = None
    proposal: Proposal | None = None


class _Follower:
    """Shared by both runners: the snapshot, backpressure, and decisions as they arrive."""

    def __init__(self, source: Source, slack: int, say: Callable[[str], None] = default_say,
                 clock: Callable[[], float] = time.monotonic,
                 snapshot_every: float = SNAPSHOT_SECONDS):
        self.source = source
        self.snapshot_every = snapshot_every
        self.slack = slack
        self.say = say
        self.clock = clock
        self.snap: dict | None = None
        self.snap_at = -1e9
        self.unreachable: str | None = None
        self.ours: dict[int, str] = {}          # candidate id -> who proposed it
        self.decided: set[int] = set()
        self._last_wait: tuple | None = None

    def refresh(self, force: bool = False) -> dict | None:
        now = self.clock()
        if not force and now - self.snap_at < self.snapshot_every:
            return self.snap
        self.snap_at = now
        try:
            snap = self.source.snapshot(self.pending_decisions())
        except SourceUnavailable as exc:
            if self.unreachable is None:
                self.say(f"coordinator unreachable, retrying: {exc}")
            self.unreachable = str(exc)
            self.snap = None
            return None
        if self.unreachable is not None:
            self.say("coordinator reachable again")
            self.unreachable = None
        self.snap = snap
        self._report_decisions(snap)
        return snap

    def _report_decisions(self, snap: dict) -> None:
        """Say each of our candidates' decision once: from the recent decisions (with their
        numbers), else from ``watched`` once it is in a final state (say, stale)."""
        for d in reversed(snap.get("decisions") or []):
            cid = d.get("candidate_id")
            if cid in self.ours and cid not in self.decided:
                self.decided.add(cid)
                verdict = str(d.get("verdict") or "decided").upper()
                value = fmt_value(d.get("mean", d.get("val_bpb")), d.get("sem"), d.get("runs"))
                head = fmt_value(d.get("head_mean", d.get("head_bpb")), d.get("head_sem"))
                nums = "" if verdict == "FAILED" else f": {value} vs head {head}"
                self.say(f"{verdict} #{cid} ({self.ours[cid]}){nums} -- {d.get('reason')}")
        for c in snap.get("watched") or []:
            cid = c.get("candidate_id")
            if cid in self.ours and cid not in self.decided and (
                    c.get("verdict") or c.get("state") in CANDIDATE_FINAL):
                self.decided.add(cid)
                word = str(c.get("verdict") or c.get("state")).upper()
                reason = f" -- {c['reason']}" if c.get("reason") else ""
                self.say(f"{word} #{cid} ({self.ours[cid]}){reason}")

    def room(self, proposing: int) -> int:
        """New proposals allowed now (0 while the coordinator is unreachable)."""
        if self.snap is None:
            return 0
        flight = pacing.in_flight(self.snap.get("counts") or {})
        workers = int(self.snap.get("workers") or 0)
        room = pacing.room(flight, workers, self.slack, proposing)
        state = (flight, workers, proposing)
        if room == 0 and state != self._last_wait:
            self.say(f"waiting: {flight} in flight + {proposing} being proposed, limit "
                     f"{workers} worker{'s' if workers != 1 else ''} + slack {self.slack}")
        self._last_wait = state if room == 0 else None
        return room

    def pending_decisions(self) -> list[int]:
        return sorted(set(self.ours) - self.decided)

    def submit(self, train_py: str, description: str, base: str | None, who: str,
               where: dict | None = None) -> dict:
        """Raises Refused or SourceUnavailable; records the candidate as ours."""
        data = self.source.submit(train_py, description, base, where)
        cid = data.get("candidate_id") if isinstance(data, dict) else None
        if isinstance(cid, int):
            self.ours.setdefault(cid, who)
            if data.get("verdict"):     # a duplicate already decided: nothing to wait for
                self.decided.add(cid)
        self.snap_at = -1e9             # in flight changed: look again before starting more
        return data


class AgentRunner(_Follower):
    """Keep ``count`` agents proposing (see the module docstring)."""

    def __init__(self, source: Source, argv: list[str], count: int, out_dir: Path,
                 timeout: float = DEFAULT_TIMEOUT, slack: int = pacing.DEFAULT_SLACK,
                 say: Callable[[str], None] = default_say,
                 clock: Callable[[], float] = time.monotonic,
                 backoff_initial: float = pacing.BACKOFF_INITIAL,
                 kill_grace: float = KILL_GRACE, max_proposals: int | None = None,
                 snapshot_every: float = SNAPSHOT_SECONDS):
        super().__init__(source, slack, say, clock, snapshot_every)
        self.argv = argv
        self.timeout = timeout
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.slots = [Slot(f"p{i + 1}") for i in range(count)]
        self.backoff_initial = backoff_initial
        self.kill_grace = kill_grace
        self.max_proposals = max_proposals      # stop starting after this many (tests, trials)
        self.started = 0
        self.unsent: list[tuple[Slot, Proposal, Judged]] = []
        self.stopping = False
        self.killing = False
        self.records: list[dict] = []

    def resume_unsent(self) -> int:
        """Take up the proposals a previous runner on this OUT finished but could not send
        (``proposal.json`` state ``unsent``: the coordinator was unreachable, then the runner
        died). Resending is safe: the coordinator answers a text it has with that candidate."""
        found = 0
        for state_file in sorted(self.out_dir.glob("*/proposal.json")):
            try:
                rec = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if rec.get("state") != "unsent" or not isinstance(rec.get("head_commit"), str):
                continue
            slot = next((x for x in self.slots if x.name == rec.get("slot")), self.slots[0])
            p = Proposal(slot=slot.name, dir=state_file.parent, head_commit=rec["head_commit"],
                         head_train_py="", started=float(rec.get("started") or 0))
            if not p.train_py.is_file():
                continue
            self.unsent.append((slot, p, Judged("submit", "", str(rec.get("description") or
                                                                 f"{slot.name}: (no description)"))))
            found += 1
        if found:
            self.say(f"found {found} finished proposal(s) not yet submitted in {self.out_dir}: "
                     "sending them first")
        return found

    # -- control --

    def stop(self, kill: bool = False) -> None:
        running = [s.name for s in self.slots if s.proposal is not None]
        if kill and not self.killing:
            self.killing = True
            self.stopping = True
            if running:
                self.say(f"stopping now: killing {len(running)} running agent(s) "
                         f"({', '.join(running)}); their work is not submitted")
            for s in self.slots:
                if s.proposal is not None:
                    self._kill(s.proposal, "runner stopped")
        elif not self.stopping:
            self.stopping = True
            if running:
                self.say(f"stopping: starting no new agents; waiting for {', '.join(running)} "
                         "to finish and be submitted (Ctrl-C again to kill them)")
            else:
                self.say("stopping: no agent running")

    def shutdown(self) -> None:
        """Kill and reap every running agent without asking the coordinator anything (it
        refused us, or we are going away)."""
        self.stop(kill=True)
        while any(s.proposal is not None for s in self.slots):
            self._reap(self.clock())
            time.sleep(POLL_SECONDS)

    @property
    def done(self) -> bool:
        busy = any(s.proposal is not None for s in self.slots)
        if busy:
            return False
        if self.unsent and not self.killing:
            return False
        if self.stopping:
            return True
        # after --limit: done once the last proposals' decisions are in (or Ctrl-C)
        return (self.max_proposals is not None and self.started >= self.max_proposals
                and not self.pending_decisions())

    def run(self) -> None:
        self.say(f"{len(self.slots)} proposer(s), agent timeout {self.timeout:g}s, slack "
                 f"{self.slack}; proposals in {self.out_dir}")
        self.resume_unsent()
        while not self.done:
            self.step()
            time.sleep(POLL_SECONDS)
        self._report_unsent()

    def _report_unsent(self) -> None:
        for _slot, p, j in self.unsent:
            self.say(f"NOT SUBMITTED (coordinator unreachable): {p.dir} -- submit it with "
                     f"autoresearch-coord submit {p.train_py} -m {shlex.quote(j.description)} "
                     f"--base {p.head_commit}")

    # -- one tick --

    def step(self) -> None:
        now = self.clock()
        self._reap(now)
        snap = self.refresh()
        if snap is not None:
            self._retry_unsent()
        if self.stopping or snap is None:
            return
        if self.max_proposals is not None and self.started >= self.max_proposals:
            return
        proposing = sum(1 for s in self.slots if s.proposal is not None) + len(self.unsent)
        room = self.room(proposing)
        for s in self.slots:
            if room <= 0 or (self.max_proposals is not None
                             and self.started >= self.max_proposals):
                break
            if s.proposal is None and now >= s.not_before:
                if self._start(s, snap):
                    room -= 1

    def _reap(self, now: float) -> None:
        """Finish agents that exited; stop those past their deadline or kill grace."""
        for s in self.slots:
            p = s.proposal
            if p is None:
                continue
            if p.kill_at is not None and now >= p.kill_at:
                signal_group(p, signal.SIGKILL)
                p.kill_at = None
            rc = exited(p)
            if rc is not None:
                self._finished(s, p, rc)
            elif not p.timed_out and not p.killed and now >= p.deadline:
                p.timed_out = True
                self._kill(p, f"timed out after {self.timeout:g}s")

    def _kill(self, p: Proposal, why: str) -> None:
        p.killed = True
        signal_group(p, signal.SIGTERM)
        p.kill_at = self.clock() + self.kill_grace
        self.say(f"{p.slot}: {why}: stopping its agent (SIGTERM, SIGKILL after "
                 f"{self.kill_grace:g}s)")

    def _start(self, s: Slot, snap: dict) -> bool:
        head = snap.get("head") or {}
        text, commit = head.get("train_py"), head.get("commit")
        if not isinstance(text, str) or not isinstance(commit, str):
            self.say("the coordinator's snapshot has no head train.py: not starting agents")
            return False
        p = new_proposal(self.out_dir, s.name, commit, text)
        ctx = BriefContext(proposer=s.name, proposers=len(self.slots), workdir=str(p.workdir),
                           train_py=str(p.train_py), description_file=str(p.description_file),
                           timeout=self.timeout, previous=s.previous)
        p.brief.write_text(render_brief(snap, ctx), encoding="utf-8")
        try:
            start_agent(p, self.argv, self.timeout, self.clock())
        except OSError as exc:
            self.say(f"{s.name}: cannot start the agent: {exc}")
            self._record(s, p, Judged("agent_failed", f"cannot start: {exc}"), None)
            self._failed(s)
            return False
        self.started += 1
        s.proposal = p
        self.say(f"{s.name}: agent started on head {commit[:10]} in {p.workdir}")
        return True

    def _finished(self, s: Slot, p: Proposal, rc: int) -> None:
        s.proposal = None
        if p.transcript is not None:
            p.transcript.close()
        if p.killed and not p.timed_out:
            j = Judged("agent_failed", "stopped by the runner")
        else:
            try:
                text = p.train_py.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                text = None
            j = judge_proposal(p.head_train_py, text, read_description(p.description_file),
                               rc, p.timed_out, self.timeout)
        if j.kind != "submit":
            self._record(s, p, j, rc)
            note = f" ({j.detail})" if j.detail else ""
            if j.kind in ("timeout", "agent_failed", "no_train_py"):
                self._failed(s)
                self.say(f"{s.name}: {j.kind.replace('_', ' ')}{note}: nothing submitted; "
                         f"next try in {s.not_before - self.clock():.0f}s "
                         f"(transcript {p.transcript_path})")
            else:
                s.failures = 0
                self.say(f"{s.name}: {j.kind.replace('_', ' ')}{note}: nothing submitted "
                         f"(transcript {p.transcript_path})")
            return
        if not j.description:
            j = Judged("submit", "", f"{s.name}: (the agent wrote no description)")
        self._send(s, p, j)

    def _send(self, s: Slot, p: Proposal, j: Judged) -> bool:
        text = p.train_py.read_text(encoding="utf-8")
        try:
            data = self.submit(text, j.description, p.head_commit, s.name,
                               origin("agents", s.name, p.transcript_path))
        except SourceUnavailable as exc:
            if not any(u[1] is p for u in self.unsent):
                self.unsent.append((s, p, j))
                self._write_state(p, {"state": "unsent", "description": j.description,
                                      "error": str(exc)})
                self.say(f"{s.name}: coordinator unreachable; keeping {p.dir.name} to submit "
                         "when it answers")
            return False
        except Refused as exc:
            self._record(s, p, Judged("refused", str(exc), j.description), 0)
            s.failures = 0
            self.say(f"{s.name}: refused: {exc}")
            return True
        cid = data.get("candidate_id")
        kind = "duplicate" if is_duplicate(data, j.description, p.head_commit) else "submitted"
        self._record(s, p, Judged(kind, "", j.description), 0, data)
        s.failures = 0
        if isinstance(cid, int):
            link_candidate(self.out_dir, cid, p.dir)
        what = f"duplicate of #{cid}" if kind == "duplicate" else f"submitted #{cid}"
        self.say(f"{s.name}: {what}: {j.description!r} (transcript {p.transcript_path})")
        return True

    def _retry_unsent(self) -> None:
        for item in list(self.unsent):
            s, p, j = item
            self.unsent.remove(item)
            if not self._send(s, p, j):
                break

    def _failed(self, s: Slot) -> None:
        s.failures += 1
        s.not_before = self.clock() + pacing.backoff(s.failures, self.backoff_initial)

    def _write_state(self, p: Proposal, record: dict) -> None:
        base = {"slot": p.slot, "dir": str(p.dir), "head_commit": p.head_commit,
                "started": p.started, "transcript": str(p.transcript_path)}
        write_json_atomic(p.dir / "proposal.json", {**base, **record})

    def _record(self, s: Slot, p: Proposal, j: Judged, rc: int | None,
                data: dict | None = None) -> None:
        cid = data.get("candidate_id") if isinstance(data, dict) else None
        s.previous = Feedback(kind=j.kind, detail=j.detail, candidate_id=cid,
                              description=j.description)
        record = {"state": j.kind, "detail": j.detail, "description": j.description,
                  "exit_status": rc, "candidate_id": cid, "finished": time.time()}
        self._write_state(p, record)
        full = {"slot": p.slot, "dir": str(p.dir), "head_commit": p.head_commit, **record}
        append_index(self.out_dir, full)
        self.records.append(full)


class SweepRunner(_Follower):
    """Submit sweep points as backpressure allows, each applied to the head current at the
    time (base = that head); then follow their decisions (``wait``)."""

    def __init__(self, source: Source, axes: list, planned: list[dict],
                 slack: int = pacing.DEFAULT_SLACK, say: Callable[[str], None] = default_say,
                 clock: Callable[[], float] = time.monotonic, wait: bool = True,
                 snapshot_every: float = SNAPSHOT_SECONDS):
        super().__init__(source, slack, say, clock, snapshot_every)
        self.axes = axes
        self.todo = list(planned)
        self.total = len(planned)
        self.wait = wait
        self.stopping = False
        self.results: list[dict] = []   # one per point: point, candidate_id | skipped reason

    def stop(self, kill: bool = False) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        self.stop(kill=True)

    @property
    def done(self) -> bool:
        if self.stopping:
            return True
        if self.todo:
            return False
        return not self.wait or not self.pending_decisions()

    def run(self) -> None:
        self.say(f"sweep of {self.total} point(s), slack {self.slack}")
        while not self.done:
            self.step()
            if not self.done:
                time.sleep(POLL_SECONDS)
        if self.todo:
            self.say(f"stopped with {len(self.todo)} point(s) not submitted")
        left = self.pending_decisions()
        if left and self.wait:
            self.say(f"not waiting for {len(left)} undecided candidate(s): "
                     + ", ".join(f"#{c}" for c in left))

    def step(self) -> None:
        from coordinator import sweep

        snap = self.refresh()
        if snap is None or not self.todo:
            return
        room = self.room(0)
        while room > 0 and self.todo:
            head = snap.get("head") or {}
            text, commit = head.get("train_py"), head.get("commit")
            if not isinstance(text, str):
                self.say("the coordinator's snapshot has no head train.py")
                return
            point = self.todo[0]
            n = self.total - len(self.todo) + 1
            if sweep.same_as_head(point, sweep.head_point(text, self.axes)):
                self.todo.pop(0)
                self.results.append({"point": point, "skipped": "equals the head"})
                self.say(f"[{n}/{self.total}] skipped {sweep.describe(point)}: equals the head")
                continue
            desc = sweep.describe(point)
            try:
                data = self.submit(sweep.apply_point(text, point), desc, commit, "sweep",
                                   origin("sweep"))
            except SourceUnavailable:
                return                  # retried on the next tick
            except (Refused, sweep.SweepError) as exc:
                self.todo.pop(0)
                self.results.append({"point": point, "skipped": str(exc)})
                self.say(f"[{n}/{self.total}] refused {desc}: {exc}")
                continue
            self.todo.pop(0)
            cid = data.get("candidate_id")
            self.results.append({"point": point, "candidate_id": cid,
                                 "duplicate": bool(data.get("duplicate"))})
            dup = " (duplicate of an earlier submission)" if data.get("duplicate") else ""
            self.say(f"[{n}/{self.total}] submitted #{cid}{dup}: {desc}")
            room -= 1


def install_signals(runner: AgentRunner | SweepRunner) -> None:
    """First Ctrl-C: ``stop()`` (running agents finish); second Ctrl-C or SIGTERM:
    ``stop(kill=True)``. Agents run in their own sessions, so the terminal's Ctrl-C reaches
    only the runner, which decides."""
    def on_int(*_: Any) -> None:
        runner.stop(kill=runner.stopping)

    def on_term(*_: Any) -> None:
        runner.stop(kill=True)
    signal.signal(signal.SIGINT, on_int)
    signal.signal(signal.SIGTERM, on_term)


__all__ = ["AgentRunner", "SweepRunner", "with_head", "Source", "SourceUnavailable", "Refused",
           "parse_command", "expand", "judge_proposal", "is_duplicate", "Judged", "Proposal", "new_proposal",
           "start_agent", "exited", "signal_group", "install_signals", "PLACEHOLDERS", "AGENT_ENV"]
