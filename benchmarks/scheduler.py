"""Scheduler throughput: how fast does the real coordinator keep N workers busy? (reported only)

For each fleet size N (default 2, 50, 200):

  1. a fresh research repo (real git, real SQLite ledger) is made with ``init_repo``, preset tiny;
  2. the REAL coordinator (``coordinator.core.Coordinator`` driven by ``coordinator.server.Server``,
     no authentication, loopback) runs in a SUBPROCESS of this script, so its CPU can be read
     cleanly from ``/proc/<pid>/stat`` (utime+stime of the loop itself; cutime+cstime = the git
     commands it ran and waited for). Its event lines go to a log file, as a real one's go to a
     terminal;
  3. ``max(rounds * N, min_candidates)`` distinct train.py variants (the baseline train.py with a
     varying constant) are submitted up front through ``shared.client.Client``;
  4. N simulated workers -- one DEALER socket each, all driven by one poll loop in this process --
     speak the real protocol with the real codec: hello -> welcome -> ready -> assign -> heartbeats
     every interval (the coordinator's default, carrying a progress line) -> result -> ack ->
     ready ..., re-sending ready every READY_RESEND seconds while idle, like ``worker.agent``.
     The stand-in trainer is a timer: S seconds (x0.8-1.2 jitter) then a result shaped like
     ``Outcome.to_wire()`` (harness result map, ~8 KB log tail). No subprocess per run. val_bpb
     is 1.5 for the head; for candidate c it is, deterministically, either 1.5 - 0.001c - 0.01
     (about one in five: a keep, so real keep commits, update-ref and worktree syncs happen) or
     about 1.6 (a discard);
  5. when every run is acked the fleet idles for ``--idle-seconds`` (heartbeats and ready
     re-sends only), then says bye.

Figures (never asserted):

  dispatch latency   a worker's result sent -> that worker's next assign received (the real
                     agent sends ready as soon as the ack arrives, so this is result handling +
                     ack + ready + assign). Split into result->ack and ready->assign.
                     A real worker adds up to worker.agent.MAX_POLL_SECONDS (0.25 s) before it
                     notices the trainer exited; that is not in these numbers.
  coordinator CPU    over the run (first hello -> last ack): CPU seconds of the coordinator
                     process (self, and git children), per assignment and as % of one core;
                     also per submission, and % of one core while N workers idle.
  fleet utilisation  fraction of worker-time spent holding an assignment ("training"):
                     whole = over first hello -> last ack (includes joining and the drain at the
                     end, when the queue is empty and workers idle by construction);
                     steady = over [every worker has had its first assign, last assign], i.e.
                     while there was always queued work.
  worst silence      longest gap between two messages from the coordinator seen by any worker
                     (the liveness window is interval x liveness = 5 s by default).

The load generator shares the machine (and its cores) with the coordinator; its own CPU share is
reported as ``sim_cpu_pct`` so a reader can tell when the two competed.

    python benchmarks/scheduler.py                 # N = 2, 50, 200
    python benchmarks/scheduler.py --quick         # N = 2, 20
    python benchmarks/scheduler.py --n 2 50 200 --train-seconds 1.0 --rounds 3
    python benchmarks/scheduler.py --n 50 --live-submits 150   # agents submitting meanwhile
    python benchmarks/scheduler.py --n 200 --profile /tmp/prof # cProfile of the coordinator

Writes benchmarks/results/scheduler.json (the directory is git-ignored), including what else
used the CPU during each run (``other_processes``, read from /proc).

Measured on the 2-core Linux box (2026-11-25, quiet machine, load average 0.4):

    N=2   S=0.5 s: dispatch p50/p95 4/14 ms, 5 ms coordinator CPU per assignment, util 0.99 steady
    N=50  S=0.5 s: dispatch p50/p95 12/71 ms, 5 ms/assignment, 39% of a core, util 0.96 steady
    N=200 S=1 s:   dispatch p50/p95 0.7/2.2 s, 11 ms/assignment, 81% of a core, util 0.36:
                   the coordinator is saturated (~75 results/s; 200 workers x 1 run/s asked for 200)

N=200 x 1 s runs is a stress test: at the real 300 s budget the same capacity serves thousands
of workers. What grows: ``Coordinator.record_result`` rewrites results.tsv after every decision
via ``export_tsv()``, which still reads every decision row (one query) but renders each row's
line only once (a decision never changes), so a result costs a scan of the decisions table, not
a JSON parse of every attempt's summary: linear per result, no longer quadratic over a run (the
figures above predate that cache). A submission runs ~7 git commands in the loop (~20-40 ms
wall), during which no worker is served.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path, where benchmarks/trainer.py
# would shadow the ``trainer`` package: look up packages from the repo root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import zmq  # noqa: E402

from coordinator.core import Coordinator  # noqa: E402
from coordinator.repo import init_repo  # noqa: E402
from coordinator.server import Server  # noqa: E402
from shared import protocol  # noqa: E402
from shared.client import Client  # noqa: E402
from shared.codec import decode, encode  # noqa: E402
from shared.datasync import harness_file_hashes, harness_fingerprint  # noqa: E402
from shared.protocol import HEARTBEAT_INTERVAL  # noqa: E402
from trainer.presets import baseline_train_py  # noqa: E402
from worker.agent import READY_RESEND  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "scheduler.json"
SERVE_FLAG = "--serve-child"          # internal: this script re-run as the coordinator process
PROFILE_ENV = "AUTORESEARCH_BENCH_PROFILE"   # set by --profile: where the child dumps pstats
HW_CLASS = "Bench Chip/16GB/cpu/1t"   # one class: every number is comparable
HEAD_BPB = 1.5
LOG_TAIL = ("step 00042 | loss 3.141593 | lrm 1.00 | dt 312ms | tok/sec 26,214 | mfu 0.0%\n"
            * 110)[-8192:]            # what a real worker sends: the last ~8 KB of output


# ---- the coordinator process ----------------------------------------------------------------

def serve_child(repo: str, endpoint_file: str) -> None:
    """Run the real coordinator on ``repo`` until SIGTERM; publish the bound endpoint. No
    keypair: plain TCP, what the simulated workers speak."""
    core = Coordinator(Path(repo))
    server = Server(core, bind="tcp://127.0.0.1:*", keypair=None)
    server.install_signal_handlers()
    tmp = endpoint_file + ".tmp"
    Path(tmp).write_text(server.endpoint)
    os.replace(tmp, endpoint_file)
    profile_to = os.environ.get(PROFILE_ENV)
    prof = None
    if profile_to:  # --profile: cProfile the loop (inflates CPU figures; for finding hot spots)
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    try:
        server.run()
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile_to)
        server.close()
        core.close()


class Coord:
    """The coordinator subprocess and its CPU clock."""

    def __init__(self, repo: Path, workdir: Path, profile_to: Path | None = None):
        self.log_path = workdir / "coordinator.log"
        env = dict(os.environ)
        env.pop(PROFILE_ENV, None)
        if profile_to is not None:
            env[PROFILE_ENV] = str(profile_to)
        ep_file = workdir / "endpoint"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), SERVE_FLAG,
                                      str(repo), str(ep_file)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=str(workdir),
                                     env=env)
        deadline = time.monotonic() + 60
        while not ep_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"coordinator did not start; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-2000:])
            time.sleep(0.02)
        self.endpoint = ep_file.read_text()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def cpu(self) -> dict:
        """CPU seconds so far: the coordinator itself, and the children (git) it waited for."""
        try:
            raw = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:  # not Linux: no clean per-process reading without psutil
            return {"self": float("nan"), "children": float("nan"), "t": time.monotonic()}
        f = raw.rsplit(")", 1)[1].split()
        utime, stime, cutime, cstime = (int(x) for x in f[11:15])
        return {"self": (utime + stime) / self.tick, "children": (cutime + cstime) / self.tick,
                "t": time.monotonic()}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def cpu_delta(a: dict, b: dict) -> dict:
    wall = b["t"] - a["t"]
    own, kids = b["self"] - a["self"], b["children"] - a["children"]
    return {"wall_s": wall, "self_s": own, "git_s": kids, "total_s": own + kids,
            "self_pct_core": 100 * own / wall if wall > 0 else None,
            "total_pct_core": 100 * (own + kids) / wall if wall > 0 else None}


# ---- the research repo and submissions ------------------------------------------------------

def base_train_py() -> str:
    """The real baseline text (tens of KB, so assign frames are realistic)."""
    return baseline_train_py("tiny")


def variant(base: str, i: int) -> str:
    return f"{base.rstrip()}\n\nBENCH_VARIANT = {i}  # scheduler benchmark: distinct text\n"


def candidate_bpb(cid: int) -> float:
    rng = random.Random(cid)
    if rng.random() < 0.2:
        return HEAD_BPB - 0.001 * cid - 0.01     # below every earlier keep: kept
    return 1.6 + rng.uniform(0.0, 0.05)          # above the head: discarded


# ---- simulated workers ----------------------------------------------------------------------

@dataclass
class SimWorker:
    idx: int
    wid: str
    sock: zmq.Socket
    hello_at: float = 0.0
    welcomed: bool = False
    attempt: str | None = None       # held (training)
    purpose: str = "candidate"
    cid: int = -1
    pending: str | None = None       # result sent, ack awaited
    assigned_at: float = 0.0
    result_at: float | None = None   # last result sent (for dispatch latency)
    ack_at: float | None = None
    ready_at: float | None = None
    last_heard: float = 0.0
    max_silence: float = 0.0
    held: list[tuple[float, float]] = field(default_factory=list)
    first_assign: float | None = None
    step: int = 0
    last_kept: bool = False          # the last ack reported a keep (git work in the result path)
    gone: bool = False               # said bye: silent from now on


class Fleet:
    def __init__(self, endpoint: str, n: int, train_s: float, seed: int = 0):
        self.ctx = zmq.Context.instance()
        self.n, self.train_s = n, train_s
        self.rng = random.Random(seed)
        self.interval = HEARTBEAT_INTERVAL
        self.poller = zmq.Poller()
        self.workers: list[SimWorker] = []
        self.by_sock: dict[zmq.Socket, SimWorker] = {}
        for i in range(n):
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.RCVHWM, 0)
            s.connect(endpoint)
            w = SimWorker(i, f"sim{i:03d}-{os.urandom(6).hex()}", s)
            self.workers.append(w)
            self.by_sock[s] = w
            self.poller.register(s, zmq.POLLIN)
        self.timers: list[tuple[float, int, int, str, str | None]] = []
        self.stated = harness_statement()
        self.seq = 0
        # measurements
        self.join_lat: list[float] = []
        self.dispatch: list[float] = []
        self.dispatch_after_keep: list[float] = []
        self.result_to_ack: list[float] = []
        self.ready_to_assign: list[float] = []
        self.assigns = 0
        self.accepted = 0
        self.not_counted = 0
        self.kept = 0
        self.last_assign_at = 0.0
        self.last_ack_at = 0.0
        self.anomalies: list[str] = []
        self.t0 = 0.0

    # timers: (when, seq, worker, kind, token) -- stale ones are skipped when they fire
    def at(self, when: float, w: SimWorker, kind: str, token: str | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, w.idx, kind, token))

    def send(self, w: SimWorker, type_: str, **fields) -> None:
        w.sock.send(encode(protocol.make(type_, **fields)), zmq.NOBLOCK)

    def hello(self, w: SimWorker, now: float) -> None:
        profile = {"chip": "Bench Chip", "memory_gb": 16, "backend": "cpu", "threads": 1,
                   "hw_class": HW_CLASS, "os": platform.platform()}
        w.hello_at = now
        self.send(w, "hello", worker_id=w.wid, name=w.wid.split("-")[0], profile=profile,
                  hw_class=HW_CLASS, attempt_id=w.attempt or w.pending, **self.stated)

    def ready(self, w: SimWorker, now: float) -> None:
        w.ready_at = now
        self.send(w, "ready", worker_id=w.wid, **self.stated)
        self.at(now + READY_RESEND, w, "ready", None)

    def start(self) -> None:
        now = time.monotonic()
        self.t0 = now
        for w in self.workers:
            w.last_heard = now
            self.hello(w, now)
            # Real workers start at different moments: spread their heartbeat phases.
            self.at(now + self.rng.uniform(0, self.interval), w, "beat")

    def run_until(self, stop, deadline: float) -> bool:
        """Serve messages and timers until ``stop()`` or the deadline; True if stopped."""
        while True:
            now = time.monotonic()
            if stop():
                return True
            if now >= deadline:
                return False
            wait = min(deadline, self.timers[0][0] if self.timers else now + 0.05) - now
            for sock, _ in self.poller.poll(max(0.0, min(wait, 0.05)) * 1000):
                w = self.by_sock[sock]
                while True:
                    try:
                        data = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_message(w, decode(data), time.monotonic())
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, idx, kind, token = heapq.heappop(self.timers)
                self.on_timer(self.workers[idx], kind, token, now)

    def on_message(self, w: SimWorker, msg: dict, now: float) -> None:
        if w.gone:
            return
        w.max_silence = max(w.max_silence, now - w.last_heard)
        w.last_heard = now
        msg = protocol.validate(msg)
        t = msg["type"]
        if t == "heartbeat":
            return
        if t == "welcome":
            if not w.welcomed:
                self.join_lat.append(now - w.hello_at)
            w.welcomed = True
            self.interval = float(msg["heartbeat_interval"])
            if w.attempt is None and w.pending is None:
                self.ready(w, now)
        elif t == "assign":
            if w.attempt is not None or w.pending is not None:
                self.anomalies.append(f"{w.wid}: assign while busy")
                return
            self.assigns += 1
            self.last_assign_at = now
            if w.first_assign is None:
                w.first_assign = now
            if w.result_at is not None:
                self.dispatch.append(now - w.result_at)
                if w.last_kept:
                    self.dispatch_after_keep.append(now - w.result_at)
                w.result_at = None
            if w.ready_at is not None:
                self.ready_to_assign.append(now - w.ready_at)
            w.ready_at = None
            w.attempt, w.purpose, w.cid = msg["attempt_id"], msg.get("purpose", "candidate"), \
                msg["candidate_id"]
            w.assigned_at, w.step = now, 0
            self.at(now + self.train_s * self.rng.uniform(0.8, 1.2), w, "done", w.attempt)
        elif t == "ack":
            if w.pending != msg["attempt_id"]:
                return  # a duplicate ack
            w.pending = None
            self.last_ack_at = now
            if w.result_at is not None:
                self.result_to_ack.append(now - w.result_at)
            if msg["accepted"]:
                self.accepted += 1
            else:
                self.not_counted += 1
            kept = msg["note"].count(" kept")
            self.kept += kept
            w.last_kept = kept > 0
            self.ready(w, now)
        elif t == "error" and msg["code"] == protocol.ERROR_HELLO_FIRST:
            self.anomalies.append(f"{w.wid}: hello_first")
            self.hello(w, now)
        else:
            self.anomalies.append(f"{w.wid}: {t} {msg.get('code', '')} {msg.get('message', '')}"
                                  f"{msg.get('reason', '')}"[:200])

    def on_timer(self, w: SimWorker, kind: str, token: str | None, now: float) -> None:
        if w.gone:
            return
        if kind == "beat":
            progress = None
            if w.attempt is not None:
                w.step += 1
                elapsed = now - w.assigned_at
                progress = {"step": w.step, "progress": min(1.0, elapsed / self.train_s),
                            "loss": 3.0, "tok_per_sec": 26000.0, "elapsed": elapsed}
            self.send(w, "heartbeat", worker_id=w.wid, attempt_id=w.attempt, progress=progress)
            self.at(now + self.interval, w, "beat")
        elif kind == "ready":
            # Re-send while idle and unassigned, as worker.agent does (READY_RESEND).
            if w.welcomed and w.attempt is None and w.pending is None and w.ready_at is not None \
                    and now - w.ready_at >= READY_RESEND - 1e-3:
                self.ready(w, now)
        elif kind == "done" and token == w.attempt:
            bpb = HEAD_BPB if w.purpose == "head" else candidate_bpb(w.cid)
            wall = now - w.assigned_at
            result = {"schema": 1, "harness_version": "1", "status": "ok", "val_bpb": bpb,
                      "error": None, "training_seconds": wall, "total_seconds": wall + 0.4,
                      "startup_seconds": 0.3, "eval_seconds": 0.1, "peak_vram_mb": 812.5,
                      "mfu_percent": 0.0, "total_tokens_M": 0.5, "num_steps": 42,
                      "num_params_M": 3.4, "depth": 4, "eval_tokens": 16384,
                      "crop_fraction": 0.02, "tok_per_sec": 26000.0, "backend": "cpu",
                      "settings": {"seq_len": 128, "time_budget": 15, "seed": 42}}
            outcome = {"status": "ok", "val_bpb": bpb, "result": result, "log_tail": LOG_TAIL,
                       "exit_code": 0, "wall_seconds": round(wall, 3), "note": ""}
            w.held.append((w.assigned_at, now))
            w.pending, w.attempt = w.attempt, None
            w.result_at = now
            self.send(w, "result", worker_id=w.wid, attempt_id=w.pending, outcome=outcome)

    def idle(self) -> bool:
        return all(w.attempt is None and w.pending is None for w in self.workers)

    def bye(self) -> None:
        for w in self.workers:
            self.send(w, "bye", worker_id=w.wid, reason="benchmark over")
            w.gone = True

    def close(self) -> None:
        for w in self.workers:
            w.sock.close(linger=200)


def harness_statement() -> dict:
    """What a real worker states in hello/ready about its harness (the coordinator serves no
    dataset here, so no dataset hash)."""
    return {"harness_fingerprint": harness_fingerprint(harness_file_hashes())}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))]


def ms_summary(xs: list[float]) -> dict:
    return {"n": len(xs), "p50_ms": _ms(pct(xs, 50)), "p95_ms": _ms(pct(xs, 95)),
            "max_ms": _ms(max(xs) if xs else None),
            "mean_ms": _ms(statistics.fmean(xs) if xs else None)}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def busy_fraction(workers: list[SimWorker], a: float, b: float) -> float | None:
    if b <= a:
        return None
    held = sum(max(0.0, min(e, b) - max(s, a)) for w in workers for s, e in w.held)
    return held / (len(workers) * (b - a))


def proc_ticks() -> dict[int, tuple[str, int]]:
    """utime+stime (clock ticks) and command of every process we can read (Linux)."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            raw = (d / "stat").read_text()
        except OSError:
            continue
        comm = raw[raw.find("(") + 1:raw.rfind(")")]
        f = raw.rsplit(")", 1)[1].split()
        out[int(d.name)] = (comm, int(f[11]) + int(f[12]))
    return out


def other_load(before: dict, after: dict, wall: float, mine: set[int]) -> dict:
    """CPU the rest of the machine used meanwhile (% of one core), and its top consumers --
    so a reader knows what else competed for the cores."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    use: dict[str, float] = {}
    for pid, (comm, t) in after.items():
        if pid in mine:
            continue
        d = t - before.get(pid, (comm, 0))[1]
        if d > 0:
            use[comm] = use.get(comm, 0.0) + 100 * d / tick / max(wall, 1e-9)
    top = sorted(use.items(), key=lambda kv: -kv[1])[:4]
    return {"pct_core": round(sum(use.values()), 1),
            "top": [f"{c} {p:.0f}%" for c, p in top if p >= 1]}


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# ---- one fleet size -------------------------------------------------------------------------

def submit_in_background(endpoint: str, base: str, first: int, count: int,
                         spent: list[float]) -> threading.Thread:
    """Submit ``count`` more variants while the fleet runs, as agents do; each submission's
    round trip goes into ``spent`` (seconds). Its own socket, so no sharing with the fleet."""
    def go() -> None:
        with Client(endpoint, timeout=60) as client:
            for i in range(first, first + count):
                t = time.monotonic()
                client.submit(variant(base, i), f"bench live variant {i}")
                spent.append(time.monotonic() - t)

    th = threading.Thread(target=go, name="live-submits", daemon=True)
    th.start()
    return th


def bench(n: int, train_s: float, rounds: int, min_candidates: int, max_run_s: float,
          idle_s: float, profile_dir: Path | None = None, live_submits: int = 0) -> dict:
    k = max(rounds * n, min_candidates)
    out: dict = {"workers": n, "train_seconds": train_s, "candidates": k,
                 "loadavg_before": loadavg()}
    with tempfile.TemporaryDirectory(prefix="autoresearch-bench-sched-") as tmp:
        work = Path(tmp)
        repo = work / "research"
        base = base_train_py()
        init_repo(repo, tag="bench", preset="tiny", train_py=base)
        prof = None
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            prof = profile_dir.resolve() / f"coordinator-n{n}.pstats"
            out["profile"] = str(prof)
        coord = Coord(repo, work, prof)
        fleet = None
        try:
            c0 = coord.cpu()
            t = time.monotonic()
            with Client(coord.endpoint, timeout=60) as client:
                for i in range(k):
                    client.submit(variant(base, i + 1), f"bench variant {i + 1}")
            c1 = coord.cpu()
            sub = cpu_delta(c0, c1)
            out["submit"] = {"count": k, "wall_ms_each": round(1000 * (time.monotonic() - t) / k, 2),
                             "coord_cpu_ms_each": round(1000 * sub["self_s"] / k, 2),
                             "git_cpu_ms_each": round(1000 * sub["git_s"] / k, 2)}

            fleet = Fleet(coord.endpoint, n, train_s)
            p0 = time.process_time()
            c2 = coord.cpu()
            others0 = proc_ticks()
            fleet.start()
            live_spent: list[float] = []
            live = (submit_in_background(coord.endpoint, base, k + 1, live_submits, live_spent)
                    if live_submits else None)
            expected = k + live_submits + 1   # every candidate, plus the head once on the class
            finished = fleet.run_until(lambda: fleet.accepted >= expected and fleet.idle(),
                                       time.monotonic() + max_run_s)
            t_end = fleet.last_ack_at if finished else time.monotonic()
            c3 = coord.cpu()
            others = other_load(others0, proc_ticks(), c3["t"] - c2["t"],
                                {os.getpid(), coord.proc.pid})
            if live is not None:
                live.join(60)
            sim_cpu = time.process_time() - p0
            run = cpu_delta(c2, c3)
            # Idle: N workers connected, queue empty -- heartbeats and ready re-sends only.
            fleet.run_until(lambda: False, time.monotonic() + idle_s)
            c4 = coord.cpu()
            idle = cpu_delta(c3, c4)
            with Client(coord.endpoint, timeout=60) as client:
                counts = client.query("status")["counts"]
            fleet.bye()
            fleet.run_until(lambda: False, time.monotonic() + 0.3)

            firsts = [w.first_assign for w in fleet.workers]
            all_busy = max(firsts) if all(f is not None for f in firsts) else None
            steady = (busy_fraction(fleet.workers, all_busy, fleet.last_assign_at)
                      if all_busy is not None else None)
            out.update({
                "finished": finished,
                "live_submits": {"count": live_submits, **ms_summary(live_spent)},
                "run_wall_s": round(t_end - fleet.t0, 3),
                "assignments": fleet.assigns,
                "results_accepted": fleet.accepted,
                "results_not_counted": fleet.not_counted,
                "kept": counts.get("kept"), "discarded": counts.get("discarded"),
                "failed": counts.get("failed"), "queued_left": counts.get("queued"),
                "join_latency": ms_summary(fleet.join_lat),
                "dispatch_latency": ms_summary(fleet.dispatch),
                "dispatch_latency_after_keep": ms_summary(fleet.dispatch_after_keep),
                "result_to_ack": ms_summary(fleet.result_to_ack),
                "ready_to_assign": ms_summary(fleet.ready_to_assign),
                "coord_cpu_run": _round(run),
                "coord_cpu_ms_per_assignment": (round(1000 * run["total_s"] / fleet.assigns, 2)
                                                if fleet.assigns else None),
                "coord_self_cpu_ms_per_assignment": (round(1000 * run["self_s"] / fleet.assigns, 2)
                                                     if fleet.assigns else None),
                "coord_cpu_idle": _round(idle),
                "utilisation_whole": _r(busy_fraction(fleet.workers, fleet.t0, t_end)),
                "utilisation_steady": _r(steady),
                "steady_window_s": (round(fleet.last_assign_at - all_busy, 3)
                                    if all_busy is not None else None),
                "worst_silence_s": round(max(w.max_silence for w in fleet.workers), 3),
                "other_processes": others,
                "sim_cpu_pct": round(100 * sim_cpu / max(1e-9, t_end - fleet.t0), 1),
                "anomalies": fleet.anomalies[:20],
                "loadavg_after": loadavg(),
            })
        finally:
            if fleet is not None:
                fleet.close()
            coord.stop()
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _round(d: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def default_train_seconds(n: int) -> float:
    return 0.5 if n <= 50 else 1.0


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = (f"{'N':>4} {'S':>4} {'runs':>5} {'keep':>4} | {'dispatch p50/p95/max ms':>24} | "
            f"{'ack p50':>7} | {'cpu ms/asg':>10} {'%core':>6} {'(git)':>6} {'idle%':>6} | "
            f"{'util whole/steady':>17} | {'silence':>7} {'sim%':>5}")
    print(head)
    print("-" * len(head))
    for r in rows:
        d = r["dispatch_latency"]
        cpu = r["coord_cpu_run"]
        git_pct = 100 * cpu["git_s"] / cpu["wall_s"] if cpu["wall_s"] else None
        print(f"{r['workers']:>4} {r['train_seconds']:>4g} {r['assignments']:>5} "
              f"{fmt(r['kept'], 'd'):>4} | "
              f"{fmt(d['p50_ms']):>7} /{fmt(d['p95_ms']):>7} /{fmt(d['max_ms']):>7} | "
              f"{fmt(r['result_to_ack']['p50_ms']):>7} | "
              f"{fmt(r['coord_cpu_ms_per_assignment'], '.2f'):>10} "
              f"{fmt(cpu['total_pct_core']):>6} {fmt(git_pct):>6} "
              f"{fmt(r['coord_cpu_idle']['total_pct_core']):>6} | "
              f"{fmt(r['utilisation_whole'], '.3f'):>8}/{fmt(r['utilisation_steady'], '.3f'):<8} | "
              f"{fmt(r['worst_silence_s'], '.2f'):>7} {fmt(r['sim_cpu_pct']):>5}"
              + ("" if r["finished"] else "  (hit the time limit)"))
    for r in rows:
        s = r["submit"]
        print(f"N={r['workers']}: {s['count']} submissions at {s['wall_ms_each']} ms each "
              f"(coordinator {s['coord_cpu_ms_each']} ms CPU + git {s['git_cpu_ms_each']} ms); "
              f"run {r['run_wall_s']} s, steady window {r['steady_window_s']} s; "
              f"join p50 {r['join_latency']['p50_ms']} ms; loadavg {r['loadavg_before']}; "
              f"others used {r['other_processes']['pct_core']}% of a core "
              f"{r['other_processes']['top']}"
              + (f"; {r['live_submits']['n']} live submits p50/max "
                 f"{r['live_submits']['p50_ms']}/{r['live_submits']['max_ms']} ms"
                 if r["live_submits"]["count"] else "")
              + (f"; anomalies: {r['anomalies'][:3]}" if r["anomalies"] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                    help="fleet sizes (default 2 50 200)")
    ap.add_argument("--quick", action="store_true", help="N = 2 and 20 only")
    ap.add_argument("--train-seconds", type=float, default=None, metavar="S",
                    help="stand-in training time per run (default 0.5 s for N <= 50, else 1.0)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="candidates submitted = rounds x N (at least --min-candidates)")
    ap.add_argument("--min-candidates", type=int, default=24)
    ap.add_argument("--max-run-seconds", type=float, default=30.0,
                    help="cap on the run phase of one fleet size")
    ap.add_argument("--idle-seconds", type=float, default=3.0,
                    help="idle phase measured after the queue drains")
    ap.add_argument("--live-submits", type=int, default=0, metavar="M",
                    help="also submit M variants from a client while the fleet runs (submits "
                         "run git in the coordinator's loop: shows their effect on dispatch)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="cProfile the coordinator loop; write DIR/coordinator-nN.pstats "
                         "(profiling inflates the CPU figures)")
    args = ap.parse_args(argv)
    sizes = args.n or ([2, 20] if args.quick else [2, 50, 200])
    if any(n < 1 for n in sizes):
        ap.error("--n: fleet sizes must be >= 1")
    if args.train_seconds is not None and args.train_seconds <= 0:
        ap.error("--train-seconds must be > 0")
    rows = []
    for n in sizes:
        s = args.train_seconds or default_train_seconds(n)
        print(f"N={n}: S={s:g}s ...", flush=True)
        rows.append(bench(n, s, args.rounds, args.min_candidates, args.max_run_seconds,
                          args.idle_seconds, args.profile, args.live_submits))
    print()
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "scheduler", "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "processor": platform.processor()},
              "heartbeat_interval": HEARTBEAT_INTERVAL, "ready_resend": READY_RESEND,
              "argv": sys.argv[1:] if argv is None else list(argv),
              "results": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == SERVE_FLAG:
        serve_child(sys.argv[2], sys.argv[3])
        sys.exit(0)
    sys.exit(main())
