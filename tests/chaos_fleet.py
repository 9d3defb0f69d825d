"""Chaos on a real fleet: random ``kill -9`` of the coordinator and the workers during a stream of
short legitimate runs, then the run's invariants checked from the ledger and git.

Used by tests/test_chaos.py (short, in the suite) and benchmarks/chaos.py (longer, figures to
JSON). Everything is real: the coordinator and two keyed workers are the console entry points
(``python -m coordinator.cli start`` / ``python -m worker.cli join``) on loopback, the trainer is
the fast stand-in train.py of conftest (it sleeps, then writes a result with the val_bpb written
in its text), the ledger is SQLite and the branch is git. The kill schedule and the submissions
come from one seeded ``random.Random``; process timing is the machine's, so two sessions with one
seed are alike, not identical.

Invariants (``check``), each a list of violations, empty when it holds:

  recorded once   every acknowledged submission is exactly one candidate row (by text hash), and
                  there is no candidate nobody submitted;
  counted once    a candidate has at most one decision; every candidate attempt a decision counts
                  is a ``done`` attempt of that candidate and is counted by no other decision;
                  nothing lost, cancelled or stale is counted;
  settled         every submitted candidate reached kept, discarded or failed;
  branch          the branch's first-parent history after the baseline is exactly the kept
                  decisions' commits, in order, its tip is the ledger's head, and each keep commit
                  holds its candidate's tree;
  refs            refs/autoresearch/candidates/<id> is each candidate's commit;
  results.tsv     one row per decision, in order, with the decision's commit and verdict.

Spurious strikes are reported apart: a lost lease (attempt ``lost``, or ``stale`` after ``lost``)
that its worker process did not cause by dying -- the process was never killed, or it was still
alive when the lease was declared lost (lost before its kill, or it sent the result late). Each worker process gets a name
of its own (``w1g3``: slot 1, third life), so its worker id (``<name>-<hex>``) says which process
held the lease. Runs wasted on such a process (its attempt ended ``stale`` or ``cancelled``
under it) are reported too; neither is a violation of the invariants.

The liveness window (0.25 s x 12 = 3 s) is longer than a coordinator restart (the kill, up to
2 s down, about 0.6 s of start-up), so workers often carry on across a restart without noticing
it, the path of issue 9's hello/assign crossing; workers reconnect within 0.4 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from conftest import _fleet_variant_text
from test_fleet import Proc

# stale: its change conflicted with a keep made while it waited (coordinator.rebase)
FINAL = ("kept", "discarded", "failed", "stale")


@dataclass
class ChaosConfig:
    seed: int = 9
    duration: float = 40.0                # seconds of kills and submissions
    settle: float = 90.0                  # at most this long for the queue to drain afterwards
    kill_every: tuple[float, float] = (1.5, 4.0)   # seconds between kills
    down_for: tuple[float, float] = (0.3, 2.0)     # seconds a killed process stays down
    submit_every: tuple[float, float] = (1.0, 2.5)
    run_seconds: tuple[float, float] = (0.3, 1.2)  # the stand-in's pretend training
    workers: int = 2
    max_down: int = 2                     # never more than this many processes down at once
    coordinator_weight: float = 1.0       # odds of the coordinator being the victim (a worker: 1)
    restart_grace: float = 2.0            # workers reconnect within 0.4 s (--reconnect-max)
    # The liveness window (interval x liveness) against the coordinator's restart time (about a
    # second of start-up after down_for): a window longer than a restart is what lets a worker
    # carry on across one (issue 9 item 1 lives there); a short one makes every restart a
    # reconnect.
    heartbeat_interval: float = 0.25
    liveness: int = 12


@dataclass
class Life:
    """One process of the session (a coordinator, or one life of a worker slot)."""
    role: str                 # coordinator | worker
    name: str
    pid: int
    started: float
    killed: float | None = None    # when we sent SIGKILL
    stopped: float | None = None   # when we stopped it cleanly (SIGTERM) at the end


@dataclass
class ChaosReport:
    seed: int
    config: dict
    kills: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)
    attempts: dict = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    spurious_strikes: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    wasted_runs: list[dict] = field(default_factory=list)
    settled: bool = False
    seconds: dict = field(default_factory=dict)
    loadavg: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Lab:
    """A research repo (stand-in baseline), a worker cache, and the trusted worker key."""
    repo: Path
    cache: Path

    @classmethod
    def make(cls, root: Path) -> "Lab":
        """Needs AUTORESEARCH_KEYS (this user's key dir) and AUTORESEARCH_DATA (the dataset the
        coordinator serves) in os.environ; the child processes inherit both."""
        from conftest import _FLEET_TRAIN_PY
        from coordinator.repo import init_repo
        from coordinator.trust import TrustStore
        from shared.keys import load_or_create_keypair

        repo = root / "research"
        init_repo(repo, tag="chaos", preset="tiny", train_py=_FLEET_TRAIN_PY)
        worker_key = load_or_create_keypair(Path(os.environ["AUTORESEARCH_KEYS"]), "worker")
        with TrustStore.open(repo) as store:
            store.trust(worker_key.public, "chaos-workers", "worker")
        return cls(repo=repo, cache=root / "cache")


class Session:
    """Runs one chaos session on a Lab; ``run()`` returns the ChaosReport."""

    def __init__(self, lab: Lab, cfg: ChaosConfig, say: Callable[[str], None] = lambda s: None):
        self.lab, self.cfg, self.say = lab, cfg, say
        self.rng = random.Random(cfg.seed)
        self.lives: list[Life] = []
        self.procs: dict[str, Proc] = {}          # slot ("coordinator", "w1", ...) -> live Proc
        self.gen: dict[str, int] = {}
        self.endpoint = ""
        self.acked: dict[str, int] = {}           # sha256 of a submitted text -> candidate id
        self.tried: set[str] = set()              # every text we sent, acknowledged or not
        self.pending: list[tuple[str, str]] = []  # (text, description) not yet acknowledged
        self.n_variants = 0

    # ---- processes ----------------------------------------------------------------------

    def _start(self, slot: str) -> None:
        self.gen[slot] = self.gen.get(slot, 0) + 1
        if slot == "coordinator":
            bind = self.endpoint or "tcp://127.0.0.1:0"
            argv = [sys.executable, "-m", "coordinator.cli", "start", str(self.lab.repo),
                    "--bind", bind, *self._hb(), "--restart-grace", str(self.cfg.restart_grace)]
            name = f"coordinator{self.gen[slot]}"
        else:
            name = f"{slot}g{self.gen[slot]}"
            argv = [sys.executable, "-m", "worker.cli", "join", self.endpoint, "--name", name,
                    "--cache-dir", str(self.lab.cache), "--threads", "1", *self._hb(),
                    "--reconnect-max", "0.4"]
        p = Proc(argv, name)
        self.procs[slot] = p
        self.lives.append(Life("coordinator" if slot == "coordinator" else "worker", name,
                               p.p.pid, time.time()))
        if slot == "coordinator" and not self.endpoint:
            self.endpoint = p.wait_for(r"listening on (tcp://\S+)").group(1)
            p.wait_for(r"watch with:")   # banner done: the local admin key is pinned

    def _hb(self) -> list[str]:
        return ["--heartbeat-interval", str(self.cfg.heartbeat_interval),
                "--liveness", str(self.cfg.liveness)]

    def _kill(self, slot: str) -> None:
        p = self.procs.pop(slot)
        self._life_of(p).killed = time.time()
        p.signal(signal.SIGKILL)
        p.wait()
        self.say(f"kill -9 {p.name} (pid {p.p.pid})")

    def _life_of(self, p: Proc) -> Life:
        return next(life for life in reversed(self.lives) if life.pid == p.p.pid)

    def _stop_all(self) -> None:
        """Clean stop: workers first (they say bye), then the coordinator."""
        for slot in sorted(self.procs, key=lambda s: s == "coordinator"):
            p = self.procs.pop(slot)
            self._life_of(p).stopped = time.time()
            p.stop()

    # ---- submissions --------------------------------------------------------------------

    def _new_variant(self) -> tuple[str, str]:
        self.n_variants += 1
        bpb = round(self.rng.uniform(1.35, 1.65), 4)
        sleep = round(self.rng.uniform(*self.cfg.run_seconds), 3)
        text = _fleet_variant_text(bpb=bpb, sleep=sleep) + f"# chaos variant {self.n_variants}\n"
        return text, f"chaos variant {self.n_variants}: bpb {bpb} in {sleep}s"

    def _submit_pending(self) -> None:
        from shared.client import Client

        while self.pending and "coordinator" in self.procs:
            text, desc = self.pending[0]
            self.tried.add(hashlib.sha256(text.encode()).hexdigest())
            try:
                with Client(self.endpoint, timeout=2.0) as c:
                    data = c.submit(text, desc)
            except Exception as exc:   # coordinator down or restarting: send it again later
                self.say(f"submit deferred: {type(exc).__name__}: {str(exc)[:80]}")
                return
            self.acked[hashlib.sha256(text.encode()).hexdigest()] = int(data["candidate_id"])
            self.pending.pop(0)

    def _settled(self) -> bool:
        from shared.client import Client

        try:
            with Client(self.endpoint, timeout=2.0) as c:
                status = c.query("status")
        except Exception:
            return False
        states = {c["candidate_id"]: c["state"] for c in status.get("candidates", [])}
        return not self.pending and all(states.get(cid) in FINAL for cid in self.acked.values())

    # ---- the session --------------------------------------------------------------------

    def run(self) -> ChaosReport:
        cfg = self.cfg
        t0 = time.monotonic()
        try:
            self._start("coordinator")
            slots = [f"w{i + 1}" for i in range(cfg.workers)]
            for s in slots:
                self._start(s)
            end = time.monotonic() + cfg.duration
            next_kill = time.monotonic() + self.rng.uniform(*cfg.kill_every)
            next_submit = time.monotonic()
            restart_at: dict[str, float] = {}
            while time.monotonic() < end:
                now = time.monotonic()
                for slot, when in list(restart_at.items()):
                    if now >= when:
                        del restart_at[slot]
                        self._start(slot)
                if now >= next_kill:
                    up = ["coordinator", *slots]
                    up = [s for s in up if s in self.procs]
                    if up and len(restart_at) < cfg.max_down:
                        victim = self.rng.choices(up, [cfg.coordinator_weight if v ==
                                                       "coordinator" else 1.0 for v in up])[0]
                        self._kill(victim)
                        restart_at[victim] = now + self.rng.uniform(*cfg.down_for)
                    next_kill = now + self.rng.uniform(*cfg.kill_every)
                if now >= next_submit:
                    self.pending.append(self._new_variant())
                    next_submit = now + self.rng.uniform(*cfg.submit_every)
                self._submit_pending()
                time.sleep(0.05)
            for slot in list(restart_at):
                self._start(slot)
            chaos_end = time.monotonic()
            deadline = chaos_end + cfg.settle
            settled = False
            while time.monotonic() < deadline:
                self._submit_pending()
                if self._settled():
                    settled = True
                    break
                time.sleep(0.3)
            settle_s = time.monotonic() - chaos_end
        finally:
            self._stop_all()
        report = check(self.lab.repo, self.acked, self.tried, self.lives)
        report.seed, report.config, report.settled = cfg.seed, asdict(cfg), settled
        if not settled:
            report.violations.append(f"not settled {cfg.settle:g}s after the last kill")
        report.seconds = {"total": round(time.monotonic() - t0, 1), "chaos": cfg.duration,
                          "settle": round(settle_s, 1)}
        with open("/proc/loadavg") if os.path.exists("/proc/loadavg") else _Empty() as f:
            report.loadavg = f.read().strip()
        return report


class _Empty:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self) -> str:
        return ""


# ---- invariants -------------------------------------------------------------------------

def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def check(repo: Path, acked: dict[str, int], tried: set[str], lives: list[Life]) -> ChaosReport:
    """The invariants of the module doc, from the ledger (read-only) and git."""
    report = ChaosReport(seed=0, config={})
    bad = report.violations
    path = repo / ".autoresearch" / "ledger.sqlite3"
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        cands = {r["id"]: r for r in db.execute("SELECT * FROM candidates WHERE id > 0")}
        attempts = {r["attempt_id"]: r for r in db.execute("SELECT * FROM attempts")}
        decisions = list(db.execute("SELECT * FROM decisions ORDER BY id"))
        head = db.execute("SELECT * FROM head").fetchone()
        workers = {r["worker_id"]: r["name"] for r in db.execute("SELECT * FROM workers")}
        branch = json.loads(db.execute("SELECT value FROM meta WHERE key = 'branch'")
                            .fetchone()[0])
    finally:
        db.close()

    # recorded once
    by_sha: dict[str, list[int]] = {}
    for cid, c in cands.items():
        by_sha.setdefault(c["sha256"], []).append(cid)
    for sha, cid in acked.items():
        if by_sha.get(sha) != [cid]:
            bad.append(f"submission acknowledged as #{cid} is recorded as {by_sha.get(sha)}")
    for sha, ids in by_sha.items():
        if sha not in tried:
            bad.append(f"candidates {ids} were never submitted")
        if len(ids) > 1:
            bad.append(f"one text recorded {len(ids)} times: {ids}")

    # counted once
    kept_ids = {0} | {d["candidate_id"] for d in decisions if d["verdict"] == "kept"}
    per_cand: dict[int, int] = {}
    for d in decisions:
        cid = d["candidate_id"]
        per_cand[cid] = per_cand.get(cid, 0) + 1
        ids = json.loads(d["attempt_ids"] or "[]")
        if len(ids) != len(set(ids)):
            bad.append(f"decision for #{cid} counts one attempt twice: {ids}")
        for aid in ids:
            a = attempts.get(aid)
            if a is None:
                bad.append(f"decision for #{cid} counts unknown attempt {aid}")
            elif a["candidate_id"] == cid:   # its own runs (a failure lists its lost ones too)
                if a["state"] != "done" and d["verdict"] != "failed":
                    bad.append(f"decision for #{cid} counts its {a['state']} attempt {aid}")
            # otherwise the head's runs it was compared with: a kept candidate's counted runs
            elif a["candidate_id"] not in kept_ids or a["state"] != "done" \
                    or a["status"] != "ok":
                bad.append(f"decision for #{cid} compares with attempt {aid} of "
                           f"#{a['candidate_id']} ({a['state']} {a['status']}), not a head run")
    bad += [f"#{cid} has {n} decisions" for cid, n in per_cand.items() if n > 1]
    # A run reaches the ledger once: an attempt id is a primary key, and a result replayed after
    # a restart must not turn a lost/cancelled lease into a counted one.
    for aid, a in attempts.items():
        if a["state"] == "done" and a["finished_at"] is None:
            bad.append(f"attempt {aid} is done without a finish time")

    # settled
    for cid in sorted(set(acked.values())):
        state = cands[cid]["state"] if cid in cands else None
        if state not in FINAL:
            bad.append(f"#{cid} ended {state}, not decided")

    # branch == kept decisions; refs; results.tsv
    tip = _git(repo, "rev-parse", f"refs/heads/{branch}")
    if tip != head["commit_sha"]:
        bad.append(f"branch tip {tip[:10]} is not the ledger's head {head['commit_sha'][:10]}")
    baseline = next(d["head_after"] for d in decisions if d["candidate_id"] == 0)
    history = _git(repo, "rev-list", "--first-parent", "--reverse",
                   f"{baseline}..refs/heads/{branch}").split()
    keeps = [d for d in decisions if d["verdict"] == "kept" and d["candidate_id"] != 0]
    if history != [d["head_after"] for d in keeps]:
        bad.append(f"branch history {[h[:8] for h in history]} is not the kept decisions "
                   f"{[d['head_after'][:8] for d in keeps]}")
    for d in keeps:
        c = cands[d["candidate_id"]]
        measured = c["text_commit"] or c["commit_sha"]   # rebased onto the head it landed on
        if _git(repo, "rev-parse", f"{d['head_after']}^{{tree}}") != \
                _git(repo, "rev-parse", f"{measured}^{{tree}}"):
            bad.append(f"keep commit of #{d['candidate_id']} does not hold the tree it was "
                       f"measured as")
    refs = dict(line.split()[::-1] for line in _git(
        repo, "for-each-ref", "--format=%(objectname) %(refname)",
        "refs/autoresearch/candidates/").splitlines())
    for cid, c in cands.items():
        if refs.get(f"refs/autoresearch/candidates/{cid}") != c["commit_sha"]:
            bad.append(f"refs/autoresearch/candidates/{cid} is not #{cid}'s commit")
    tsv = (repo / "results.tsv").read_text(encoding="utf-8").splitlines()[1:]
    verdict_word = {"kept": "keep", "discarded": "discard", "failed": "crash"}
    want = [(cands[d["candidate_id"]]["commit_sha"][:7] if d["candidate_id"] else
             d["head_after"][:7], verdict_word[d["verdict"]]) for d in decisions
            if d["verdict"] != "stale"]   # never ran: no results.tsv row
    have = [(row.split("\t")[0], row.split("\t")[3]) for row in tsv if row.strip()]
    if have != want:
        bad.append(f"results.tsv rows {have} are not the decisions {want}")

    # spurious strikes: a lost lease its worker process did not cause by dying. Legitimate only
    # if the process had been killed when the lease was declared lost (leased before the kill,
    # or after it: the coordinator cannot know yet); declared lost while it still lived, or
    # answered with a late (stale) result -- a dead process sends none -- it was a strike
    # against a live worker. (Kill times are taken just before the SIGKILL.)
    killed_at = {life.name: life.killed for life in lives if life.killed is not None}
    killed = set(killed_at)
    worker_names = {life.name for life in lives if life.role == "worker"}
    for aid, a in attempts.items():
        lost = a["state"] == "lost" or (a["state"] == "stale" and a["prior_state"] == "lost")
        name = workers.get(a["worker_id"]) or a["worker_id"].rsplit("-", 1)[0]
        if not lost or name not in worker_names:
            pass
        elif name not in killed or a["state"] == "stale" or \
                (a["finished_at"] or float("inf")) < killed_at[name]:
            report.spurious_strikes.append({"attempt_id": aid, "candidate_id": a["candidate_id"],
                                            "worker": name, "killed": name in killed,
                                            "state": a["state"], "note": a["note"]})
        # A run an innocent worker made for nothing (its lease ended under it): not a strike,
        # but work wasted; reported, not a violation.
        if a["state"] in ("stale", "cancelled") and name in worker_names and name not in killed:
            report.wasted_runs.append({"attempt_id": aid, "candidate_id": a["candidate_id"],
                                       "worker": name, "state": a["state"], "note": a["note"]})

    states = [c["state"] for c in cands.values()]
    report.candidates = {"submitted": len(acked), **{s: states.count(s) for s in FINAL},
                         "unsettled": sum(1 for s in states if s not in FINAL)}
    # Why each failure (legitimate runs fail only by losing leases to killed workers), with
    # which worker processes lost it.
    report.failures = [
        {"candidate_id": d["candidate_id"], "reason": d["reason"],
         "lost_on": [workers.get(a["worker_id"], a["worker_id"]) for aid in
                     json.loads(d["attempt_ids"] or "[]")
                     if (a := attempts.get(aid)) is not None and a["state"] in ("lost", "stale")]}
        for d in decisions if d["verdict"] == "failed" and d["candidate_id"] != 0]
    a_states = [a["state"] for a in attempts.values()]
    report.attempts = {s: a_states.count(s) for s in sorted(set(a_states))}
    report.attempts["total"] = len(attempts)
    kills = [life for life in lives if life.killed is not None]
    report.kills = {"total": len(kills),
                    "coordinator": sum(1 for k in kills if k.role == "coordinator"),
                    "worker": sum(1 for k in kills if k.role == "worker"),
                    # killed worker processes that held a lease when they died
                    "worker_holding_lease": len({
                        workers.get(a["worker_id"]) for a in attempts.values()
                        if a["state"] in ("lost", "cancelled", "stale")
                        and workers.get(a["worker_id"]) in killed})}
    return report
