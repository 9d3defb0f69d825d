"""The fleet as a person runs it: coordinator and workers as real processes on loopback.

Every process here is the console entry point (``python -m coordinator.cli`` /
``python -m worker.cli``) with fast heartbeats (0.2 s x 5); the research repo's train.py is the
stand-in from conftest (``fleet_train_py``): it sleeps, then writes a result with the val_bpb
written in its own text, so a variant is a different constant and a run takes a moment.
Waits are bounded by generous deadlines that only turn a hang into a failure; nothing asserts a
time.

Keys are on, as a person runs it: each test has its own key directory (AUTORESEARCH_KEYS), the
coordinator serves the session's prepared sample dataset (the workers fetch it into their cache),
``start`` trusts and pins this user's client key, and the workers' key is trusted once with
``TrustStore`` before they join (test_security_fleet.py covers enrolment itself).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shared.client import Client

pytestmark = pytest.mark.slow

HB = ["--heartbeat-interval", "0.2", "--liveness", "5"]
DEADLINE = 60.0   # only for hangs; a healthy run takes a second or two per step


class Proc:
    """A child process whose output lines are collected by a thread and can be waited for."""

    def __init__(self, argv: list[str], name: str, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.p = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.t = threading.Thread(target=self._pump, daemon=True)
        self.t.start()

    def _pump(self) -> None:
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    @property
    def text(self) -> str:
        with self.cond:
            return "\n".join(self.lines)

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)

    def wait_for(self, pattern: str, since: int = 0, timeout: float = DEADLINE) -> re.Match:
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[since:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = end - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self.t.is_alive()):
                    break
                self.cond.wait(min(left, 0.2))
        raise AssertionError(f"{self.name}: no line matching {pattern!r}; output:\n{self.text}")

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self.cond:
            return sum(1 for line in self.lines if rx.search(line))

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.kill(self.p.pid, sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        rc = self.p.wait(timeout)
        self.t.join(5)
        return rc

    def stop(self) -> None:
        if self.p.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture
def fleet(fleet_repo, tmp_path, prepared_sample, monkeypatch):
    """Start/stop helpers for one test's coordinator and workers; everything dies at teardown."""
    from coordinator.trust import TrustStore
    from shared.keys import load_or_create_keypair

    procs: list[Proc] = []
    keys = tmp_path / "keys"
    monkeypatch.setenv("AUTORESEARCH_KEYS", str(keys))
    monkeypatch.delenv("AUTORESEARCH_SERVER_KEY", raising=False)
    monkeypatch.setenv("AUTORESEARCH_DATA", str(prepared_sample))   # what the coordinator serves
    worker_key = load_or_create_keypair(keys, "worker")
    with TrustStore.open(fleet_repo) as store:
        store.trust(worker_key.public, "local-workers", "worker")

    class Fleet:
        repo = fleet_repo
        cache = tmp_path / "cache"

        def coord(self, bind: str = "tcp://127.0.0.1:0", *extra: str) -> Proc:
            p = Proc([sys.executable, "-m", "coordinator.cli", "start", str(self.repo),
                      "--bind", bind, *HB, *extra], "coordinator")
            procs.append(p)
            return p

        def started_coord(self, bind: str = "tcp://127.0.0.1:0") -> tuple[Proc, str]:
            p = self.coord(bind)
            endpoint = p.wait_for(r"listening on (tcp://\S+)").group(1)
            p.wait_for(r"watch with:")   # the banner (and the local pin) is complete
            return p, endpoint

        def worker(self, endpoint: str, name: str, *extra: str, env: dict | None = None,
                   **kw) -> Proc:
            argv = [sys.executable, "-m", "worker.cli", "join", endpoint, "--name", name,
                    "--cache-dir", str(self.cache), "--threads", "1", *HB,
                    "--reconnect-max", "0.4", *extra]
            p = Proc(kw.get("prefix", []) + argv if kw.get("prefix") else argv, name, env=env)
            procs.append(p)
            return p

    yield Fleet()
    for p in procs:
        p.stop()


def submit(endpoint: str, text: str, description: str) -> dict:
    with Client(endpoint, timeout=15) as c:
        return c.submit(text, description)


def cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], input=input,
                          capture_output=True, text=True, timeout=DEADLINE)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout


def wait_file(root: Path, pattern: str) -> Path:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        found = next(root.glob(pattern), None)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {root}")


def wait_head_measured(coord: Proc) -> None:
    """The first ready worker measures the baseline on its class before candidates count."""
    coord.wait_for(r"result \S+ from \S+: ok val_bpb 1\.5000, accepted")


# ---- end to end ---------------------------------------------------------------------------

def test_two_workers_keep_discard_fail(fleet, fleet_variant):
    coord, ep = fleet.started_coord()
    coord.wait_for(rf"workers join with: +autoresearch-worker join {re.escape(ep)} "
                   r"--server-key '\S{40}'$")
    coord.wait_for(r"submit with: +autoresearch-coord submit ")
    fleet.worker(ep, "w1")
    fleet.worker(ep, "w2")
    wait_head_measured(coord)

    better = submit(ep, fleet_variant(bpb=1.40), "lower bpb")
    worse = submit(ep, fleet_variant(bpb=1.60), "higher bpb")
    crash = submit(ep, fleet_variant(crash=True), "crashes")
    ids = {better["candidate_id"], worse["candidate_id"], crash["candidate_id"]}
    assert len(ids) == 3

    coord.wait_for(rf"KEEP #{better['candidate_id']}\b.*1\.4000")
    coord.wait_for(rf"DISCARD #{worse['candidate_id']}\b.*1\.6000")
    coord.wait_for(rf"FAIL #{crash['candidate_id']}\b")

    # The kept variant is a commit on the research branch; the others are not.
    branch = json.loads(cli("status", "--json", "--connect", ep).stdout)["branch"]
    history = git(fleet.repo, "log", "--format=%s%n%b", branch)
    assert "lower bpb" in history
    assert "higher bpb" not in history and "crashes" not in history

    # A resubmitted text is answered with the earlier candidate, not queued again.
    dup = submit(ep, fleet_variant(bpb=1.60), "same text again")
    assert dup["candidate_id"] == worse["candidate_id"]
    assert dup.get("duplicate") is True

    # Readable and scriptable client commands.
    st = cli("status", "--connect", ep)
    assert st.returncode == 0 and "head val_bpb" in st.stdout and "w1" in st.stdout, st
    lg = cli("log", "--connect", ep, "-n", "10", "--json")
    assert lg.returncode == 0 and json.loads(lg.stdout), lg
    out = fleet.repo.parent / "exported.tsv"
    ex = cli("export", str(out), "--connect", ep)
    assert ex.returncode == 0 and out.read_text().count("\n") >= 4, ex


def test_submit_refusals(fleet, fleet_variant, tmp_path):
    coord, ep = fleet.started_coord()
    bad = tmp_path / "bad.py"
    bad.write_text("def broken(:\n    pass\n")
    r = cli("submit", str(bad), "-m", "syntax error", "--connect", ep)
    assert r.returncode == 1 and "does not compile" in r.stderr and "line 1" in r.stderr, r
    # The coordinator refuses it too (for clients that skip the local check).
    with pytest.raises(Exception, match="compile"):
        submit(ep, "def broken(:\n", "syntax error")
    # stdin, --json
    r = cli("submit", "-", "-m", "from stdin", "--connect", ep, "--json",
            input=fleet_variant(bpb=1.45))
    assert r.returncode == 0, r
    first = json.loads(r.stdout)
    r = cli("submit", "-", "-m", "again", "--connect", ep, "--json", input=fleet_variant(bpb=1.45))
    assert json.loads(r.stdout)["candidate_id"] == first["candidate_id"]


def test_no_coordinator_message():
    r = cli("status", "--connect", "tcp://127.0.0.1:9", "--timeout", "0.3")
    assert r.returncode == 1
    assert "no key pinned for tcp://127.0.0.1:9 -- pass --server-key KEY" in r.stderr
    r = cli("status", "--connect", "tcp://127.0.0.1:9", "--timeout", "0.3", "--insecure")
    assert r.returncode == 1
    assert "no coordinator answering at tcp://127.0.0.1:9" in r.stderr
    assert "autoresearch-coord start" in r.stderr


def test_second_coordinator_refused(fleet):
    first, _ = fleet.started_coord()
    second = fleet.coord()
    assert second.wait() != 0
    assert "Error" in second.text and "coordinator" in second.text.lower()
    assert first.p.poll() is None


def test_non_loopback_bind(fleet):
    """With CURVE (the default) any address may be bound; --insecure on one that other
    machines reach is allowed but prints the danger warning."""
    keyed = fleet.coord("tcp://0.0.0.0:0")
    keyed.wait_for(r"workers join with: .*--server-key")
    assert "WARNING" not in keyed.text
    keyed.stop()
    open_ = fleet.coord("tcp://0.0.0.0:0", "--insecure")
    open_.wait_for(r"WARNING: no encryption or authentication")
    open_.wait_for(r"workers join with: .*--insecure")


# ---- failures -----------------------------------------------------------------------------

def test_worker_killed_mid_run_is_requeued(fleet, fleet_variant):
    coord, ep = fleet.started_coord()
    workers = {"w1": fleet.worker(ep, "w1"), "w2": fleet.worker(ep, "w2")}
    wait_head_measured(coord)
    mark = coord.mark()
    cand = submit(ep, fleet_variant(bpb=1.45, sleep=2.5), "slow one")["candidate_id"]
    who = coord.wait_for(rf"assign (\S+) candidate #{cand} \S+ -> (w\d)", since=mark)
    victim, survivor = who.group(2), ({"w1", "w2"} - {who.group(2)}).pop()
    workers[victim].signal(signal.SIGKILL)
    coord.wait_for(rf"worker {victim} \S+ lost: .*requeued #{cand}", since=mark)
    coord.wait_for(rf"assign \S+ candidate #{cand} \S+ -> {survivor}", since=mark)
    coord.wait_for(rf"KEEP #{cand}\b", since=mark)
    assert coord.count(rf"(KEEP|DISCARD|FAIL) #{cand}\b") == 1


def test_coordinator_killed_mid_run_and_restarted(fleet, fleet_variant):
    coord, ep = fleet.started_coord()
    w = fleet.worker(ep, "w1")
    wait_head_measured(coord)
    cand = submit(ep, fleet_variant(bpb=1.42, sleep=3.0), "survives restart")["candidate_id"]
    attempt = coord.wait_for(rf"assign (\S+) candidate #{cand}").group(1)
    w.wait_for(rf"assigned {attempt}")
    coord.signal(signal.SIGKILL)
    coord.wait()
    w.wait_for(r"coordinator silent")

    coord2 = fleet.coord(bind=ep)       # same port: workers are configured with it
    coord2.wait_for(r"listening on")
    coord2.wait_for(rf"KEEP #{cand}\b.*1\.4200")
    w.wait_for(r"result \S+ accepted")
    with Client(ep) as c:
        log = c.query("log", limit=50)
    # Exactly one counted result and one decision for the candidate, across both lives.
    assert coord2.count(rf"(KEEP|DISCARD|FAIL) #{cand}\b") == 1
    assert coord2.count(rf"assign \S+ candidate #{cand}\b") == 0   # re-attached, not rerun
    assert coord2.count(rf"result {attempt} .* accepted") == 1
    assert coord.count(rf"(KEEP|DISCARD|FAIL) #{cand}\b") == 0
    assert log


def test_worker_stopped_past_liveness_reports_stale(fleet, fleet_variant):
    coord, ep = fleet.started_coord()
    w = fleet.worker(ep, "w1")
    wait_head_measured(coord)
    mark = coord.mark()
    cand = submit(ep, fleet_variant(bpb=1.43, sleep=3.0), "frozen worker")["candidate_id"]
    attempt = coord.wait_for(rf"assign (\S+) candidate #{cand}", since=mark).group(1)
    w.wait_for(rf"assigned {attempt}")
    # Freeze the worker once its trainer (own process group, so not frozen) is under way.
    wait_file(fleet.cache, f"runs/*/{attempt}/progress.jsonl")
    w.signal(signal.SIGSTOP)
    coord.wait_for(rf"worker w1 \S+ lost: .*requeued #{cand}", since=mark)
    wait_file(fleet.cache, f"runs/*/{attempt}/result.json")
    w.signal(signal.SIGCONT)
    coord.wait_for(rf"result {attempt} from \S+: ok val_bpb 1\.4300, not counted", since=mark)
    # The requeued candidate is measured again, once, and decided.
    coord.wait_for(rf"KEEP #{cand}\b", since=mark)
    assert coord.count(rf"(KEEP|DISCARD|FAIL) #{cand}\b") == 1


def test_version_mismatched_worker_exits_with_upgrade_message(fleet):
    coord, ep = fleet.started_coord()
    code = ("import shared.protocol as p; p.PROTOCOL_VERSION = 99; "
            "from worker.cli import main; main()")
    w = Proc([sys.executable, "-c", code, "join", ep, "--name", "old", "--cache-dir",
              str(fleet.cache), *HB], "old-worker")
    try:
        assert w.wait() == 2
    finally:
        w.stop()
    assert "upgrade" in w.text
    assert "upgrade" in coord.wait_for(r"refused message .*version").string


def test_worker_ctrl_c_once_finishes_twice_cancels(fleet, fleet_variant):
    coord, ep = fleet.started_coord()
    w1 = fleet.worker(ep, "w1")
    wait_head_measured(coord)
    # Once: the running attempt finishes and is reported, then the worker says bye.
    cand = submit(ep, fleet_variant(bpb=1.41, sleep=1.5), "finish me")["candidate_id"]
    w1.wait_for(rf"assigned \S+: candidate #{cand}\b")
    w1.signal(signal.SIGINT)
    assert w1.wait() == 0
    coord.wait_for(rf"KEEP #{cand}\b")
    coord.wait_for(r"worker w1 left: worker stopped by its operator")
    # one goodbye: leaving after the report, the poll loop's Ctrl-C check must not leave again
    assert w1.text.count("leaving: bye sent") == 1, w1.text
    # Twice: the attempt is cancelled, the coordinator told why, the candidate requeued.
    w2 = fleet.worker(ep, "w2")
    mark = coord.mark()
    cand2 = submit(ep, fleet_variant(bpb=1.39, sleep=5.0), "interrupt me")["candidate_id"]
    coord.wait_for(rf"assign \S+ candidate #{cand2}", since=mark)
    w2.wait_for(rf"assigned \S+: candidate #{cand2}\b")
    w2.signal(signal.SIGINT)
    w2.wait_for(r"stopping after the current attempt")
    w2.signal(signal.SIGINT)
    assert w2.wait() == 130
    coord.wait_for(rf"worker w2 left: worker interrupted .*cancelled; requeued #{cand2}",
                   since=mark)
