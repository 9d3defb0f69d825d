"""``autoresearch-coord agents`` and ``sweep`` as a person runs them, against a real fleet.

A real coordinator (keys on) and real workers on loopback train the conftest stand-in train.py
(it reports the ``BPB`` constant written in its text). The proposers run as their own process,
with their own key directory and a key trusted only as ``submitter``, talking to the
coordinator with ``--connect/--server-key`` like a laptop elsewhere in the lab would. The agent
is a small scripted program: per proposer (``$AUTORESEARCH_PROPOSER``) it follows a plan file,
one step per cycle. Waits are bounded deadlines; nothing asserts a time.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from test_fleet import DEADLINE, Proc, cli, fleet, wait_head_measured  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

AGENT = textwrap.dedent('''
    import os, re, subprocess, sys, time
    plans = sys.argv[1]
    me = os.environ["AUTORESEARCH_PROPOSER"]
    plan = os.path.join(plans, me + ".txt")
    lines = open(plan).read().splitlines() if os.path.exists(plan) else []
    step = lines.pop(0) if lines else "same"
    open(plan, "w").write("".join(x + "\\n" for x in lines))
    brief = open(sys.argv[2]).read()
    print("agent", me, "step", step, flush=True)
    kind, _, arg = step.partition(" ")
    if kind == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        open(os.path.join(plans, "agent.pid"), "w").write(str(os.getpid()))
        open(os.path.join(plans, "hung.pid"), "w").write(str(child.pid))
        time.sleep(1000)
    text = open("train.py").read()
    if kind == "edit":
        text = re.sub(r"^BPB = .*$", f"BPB = {arg}", text, count=1, flags=re.M)
        time.sleep(0.3)
    open("train.py", "w").write(text)
    open(os.environ["AUTORESEARCH_DESCRIPTION"], "w").write(f"{me}: BPB {arg}\\n")
''')


def submitter_env(fleet, tmp_path: Path, name: str) -> dict:
    """A key directory of its own whose client key the coordinator trusts as submitter."""
    from coordinator.trust import TrustStore
    from shared.keys import CLIENT_KEY_NAME, load_or_create_keypair

    keys = tmp_path / f"keys-{name}"
    kp = load_or_create_keypair(keys, CLIENT_KEY_NAME)
    with TrustStore.open(fleet.repo) as store:
        store.trust(kp.public, name, "submitter")
    return {"AUTORESEARCH_KEYS": str(keys)}


def server_key(fleet) -> str:
    from shared.keys import COORDINATOR_KEY_NAME, coordinator_key_dir, load_or_create_keypair

    return load_or_create_keypair(coordinator_key_dir(fleet.repo), COORDINATOR_KEY_NAME).public_str


def in_flight_watch(ep: str, stop: threading.Event, seen: list[int]) -> threading.Thread:
    """Poll the coordinator's counts while the proposers run; record candidates in flight."""
    from coordinator.pacing import in_flight
    from shared.client import Client

    def loop() -> None:
        with Client(ep, timeout=10) as c:
            while not stop.is_set():
                try:
                    seen.append(in_flight(c.query("status")["counts"]))
                except Exception:
                    pass
                stop.wait(0.1)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def agent_plans(tmp_path: Path, **plans: str) -> tuple[Path, str]:
    """The scripted agent with one plan file per name (a step a line): its plans directory
    and the ``--command`` that runs it."""
    d = tmp_path / "plans"
    d.mkdir()
    for name, steps in plans.items():
        (d / f"{name}.txt").write_text(steps)
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    return d, f"{sys.executable} {script} {d} {{brief}}"


def test_agents_drive_a_fleet_for_several_cycles(fleet, tmp_path):
    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    wait_head_measured(coord)
    plans, command = agent_plans(tmp_path, p1="edit 1.40\nedit 1.60\nhang\nedit 1.30\n",
                                 p2="edit 1.55\nsame\nedit 1.35\n")
    out = tmp_path / "proposals"
    stop, seen = threading.Event(), []
    watch = in_flight_watch(ep, stop, seen)
    env = submitter_env(fleet, tmp_path, "laptop")
    agents = Proc([sys.executable, "-m", "coordinator.cli", "agents", "--count", "2",
                   "--command", command, "--timeout", "4", "--slack", "0", "--out", str(out), "--poll", "0.5",
                   "--connect", ep, "--server-key", server_key(fleet)], "agents", env=env)
    try:
        # which slot takes the next cycle depends on timing; both plans run out in any order
        end = time.monotonic() + DEADLINE * 3
        while agents.count(r": submitted #") < 5 or agents.count(r"p1: timeout") < 1 or \
                agents.count(r"p2: unchanged") < 1:
            assert time.monotonic() < end and agents.p.poll() is None, agents.text
            time.sleep(0.1)
        agents.signal(signal.SIGINT)      # Ctrl-C once: the agent at work finishes
        assert agents.wait(DEADLINE) == 0, agents.text
    finally:
        stop.set()
        watch.join(5)
        agents.stop()
    text = agents.text
    # several cycles: five submissions (p2's "same" is fed back, the hang is killed)
    assert text.count(": submitted #") == 5, text
    assert "p2: unchanged: nothing submitted" in text
    assert "p1: timed out after 4s: stopping its agent" in text
    assert "p1: timeout (killed after 4 s): nothing submitted" in text
    # the hung agent's whole group is gone
    pid = int((plans / "hung.pid").read_text())
    end = time.monotonic() + DEADLINE
    while _alive(pid):
        assert time.monotonic() < end, "the hung agent's child survived"
        time.sleep(0.1)
    # backpressure: one worker, slack 0 -> never more than one candidate in flight
    assert seen and max(seen) <= 1, seen
    # every submission was decided by the fleet, and the runner printed it
    records = [json.loads(x) for x in (out / "proposals.jsonl").read_text().splitlines()]
    submitted = [r for r in records if r["state"] == "submitted"]
    for r in submitted:
        cid = r["candidate_id"]
        coord.wait_for(rf"(KEEP|DISCARD|FAIL) #{cid}\b")
        assert (out / "by-candidate" / str(cid) / "transcript.txt").is_file()
    assert "KEPT #" in text and "DISCARDED #" in text
    # the last proposals' briefs held the decisions and what was in flight then
    briefs = [(Path(r["dir"]) / "work" / "brief.md").read_text() for r in records]
    assert any("KEPT #" in b and "'p1: BPB 1.40'" in b for b in briefs[2:]), briefs[-1]
    assert any("ran out of time" in b for b in briefs)
    # the log points at each agent's transcript on the machine that ran it
    first = submitted[0]
    logged = json.loads(cli("log", "--connect", ep, "--json").stdout)
    by_id = {d["candidate_id"]: d for d in logged["decisions"]}
    assert by_id[first["candidate_id"]]["origin"]["transcript"] == \
        str(Path(first["dir"]) / "transcript.txt")
    assert by_id[first["candidate_id"]]["description"] == "p1: BPB 1.40"
    assert str(Path(first["dir"]) / "transcript.txt") in cli("log", "--connect", ep).stdout


def test_ctrl_c_stops_agents_cleanly(fleet, tmp_path):
    coord, ep = fleet.started_coord()
    plans, command = agent_plans(tmp_path, p1="hang\n")
    agents = Proc([sys.executable, "-m", "coordinator.cli", "agents", "--command",
                   command, "--timeout", "600",
                   "--out", str(tmp_path / "out"), "--connect", ep, "--json"], "agents")
    try:
        agents.wait_for(r"p1: agent started")
        end = time.monotonic() + DEADLINE
        while not (plans / "hung.pid").exists():
            assert time.monotonic() < end
            time.sleep(0.05)
        agents.signal(signal.SIGINT)
        agents.wait_for(r"stopping: starting no new agents; waiting for p1")
        agents.signal(signal.SIGINT)
        agents.wait_for(r"stopping now: killing 1 running agent")
        assert agents.wait() == 0
    finally:
        agents.stop()
    records = json.loads(agents.text[agents.text.index("\n[") + 1:])   # --json: stdout's end
    assert [r["state"] for r in records] == ["agent_failed"]
    assert records[0]["detail"] == "stopped by the runner"
    pid = int((plans / "hung.pid").read_text())
    end = time.monotonic() + DEADLINE
    while _alive(pid):
        assert time.monotonic() < end, "the agent's child survived Ctrl-C twice"
        time.sleep(0.1)


def test_kill_9_of_the_runner_loses_nothing_the_coordinator_accepted(fleet, tmp_path):
    coord, ep = fleet.started_coord()
    plans, command = agent_plans(tmp_path, p1="edit 1.41\nhang\n")
    argv = [sys.executable, "-m", "coordinator.cli", "agents", "--command",
            command, "--timeout", "600", "--slack", "2",
            "--out", str(tmp_path / "out"), "--connect", ep]
    agents = Proc(argv, "agents")
    grandchild = None
    try:
        cid = int(agents.wait_for(r"p1: submitted #(\d+)").group(1))
        end = time.monotonic() + DEADLINE
        while not (plans / "hung.pid").exists():
            assert time.monotonic() < end
            time.sleep(0.05)
        grandchild = int((plans / "hung.pid").read_text())
        agent_pid = int((plans / "agent.pid").read_text())
        agents.signal(signal.SIGKILL)
        agents.wait()
        from shared.client import Client
        with Client(ep, timeout=10) as c:
            st = c.query("status")
        assert cid in [q["candidate_id"] for q in st["queue"]]   # accepted, kept
        if sys.platform.startswith("linux"):                     # PR_SET_PDEATHSIG
            end = time.monotonic() + DEADLINE
            while _alive(agent_pid):
                assert time.monotonic() < end, "the agent outlived its runner"
                time.sleep(0.05)
        # a new runner carries on where the old one left off
        again = Proc(argv + ["--limit", "1"], "agents-2")
        try:
            again.wait_for(r"p1: (unchanged|submitted)")
        finally:
            again.stop()
    finally:
        agents.stop()
        if grandchild is not None and _alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)   # started by this test's agent: ours to end


def test_sweep_of_three_values_yields_three_candidates(fleet, tmp_path):
    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    wait_head_measured(coord)
    env = submitter_env(fleet, tmp_path, "sweeper")
    base = [sys.executable, "-m", "coordinator.cli", "sweep", "--param", "BPB=1.3,1.45,1.5,1.6",
            "--slack", "0", "--poll", "0.5", "--connect", ep, "--server-key", server_key(fleet)]
    nope = Proc(base[:5] + ["NOT_IN_TRAIN_PY=1,2"] + base[6:], "nope", env=env)
    assert nope.wait() == 2 and "NOT_IN_TRAIN_PY: not a constant of the head's train.py" \
        in nope.text, nope.text
    dry = Proc(base + ["--dry-run"], "dry", env=env)
    assert dry.wait() == 0, dry.text
    assert "sweep: BPB=1.3\nsweep: BPB=1.45\nsweep: BPB=1.6\n3 point(s)" in dry.text + "\n"
    sw = Proc(base + ["--json"], "sweep", env=env)
    assert sw.wait(DEADLINE * 2) == 0, sw.text
    results = json.loads(sw.text[sw.text.index("\n[") + 1:])
    ids = [r["candidate_id"] for r in results]
    assert len(ids) == 3
    from coordinator.sweep import head_values
    from shared.client import Client
    with Client(ep, timeout=10) as c:
        log = c.query("log", limit=50)
    by_id = {d["candidate_id"]: d for d in log["decisions"]}
    for cid, want in zip(ids, (1.3, 1.45, 1.6)):
        ref = f"refs/autoresearch/candidates/{cid}"
        import subprocess
        text = subprocess.run(["git", "-C", str(fleet.repo), "show", f"{ref}:train.py"],
                              capture_output=True, text=True, check=True).stdout
        assert head_values(text, ["BPB"]) == {"BPB": want}
        assert by_id[cid]["description"] == f"sweep: BPB={want!r}"
    assert by_id[ids[0]]["verdict"] == "kept"
    assert "submitted #" in sw.text and "KEPT #" in sw.text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
