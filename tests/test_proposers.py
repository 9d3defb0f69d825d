"""Proposer runners with real agent subprocesses against a real Coordinator (git + SQLite).

The source here is the Coordinator itself, in process (no sockets): ``snapshot()`` is
``coordinator.snapshot.proposer_snapshot`` plus a worker count, ``submit`` is ``core.submit``.
Workers are simulated through the core's own calls (hello, next_assignment, record_result),
reporting the val_bpb the stand-in train.py carries in its ``BPB`` constant. The same runners
over the wire, with real workers, are in test_proposers_fleet.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coordinator.core import Coordinator, SubmitRejected
from coordinator.proposers import (
    AgentRunner, Refused, SourceUnavailable, SweepRunner, is_duplicate, judge_proposal,
    parse_command, with_head,
)
from coordinator.snapshot import head_files, proposer_snapshot
from coordinator import sweep as S

HW = "cpu/test/1GB"
DEADLINE = 60.0     # only turns a hang into a failure

# A scripted agent: checks its brief, sets BPB to a value chosen by its behaviour file, writes a
# description. Behaviour per call (a line of the file, consumed in order): "edit <bpb>",
# "same" (leave train.py alone), "broken" (syntax error), "hang" (start a grandchild, sleep),
# "fail" (exit 3), or "edit-slow <bpb>".
AGENT = textwrap.dedent('''
    import os, re, subprocess, sys, time
    plan, log = sys.argv[1], sys.argv[2]
    brief = open(os.environ["AUTORESEARCH_BRIEF"]).read()
    assert "## Recent decisions" in brief and "## In flight now" in brief
    with open(plan) as f:
        lines = f.read().splitlines()
    step = lines.pop(0) if lines else "same"
    with open(plan, "w") as f:
        f.write("\\n".join(lines) + ("\\n" if lines else ""))
    with open(log, "a") as f:
        f.write(f"{os.environ['AUTORESEARCH_PROPOSER']} {step} {os.getcwd()}\\n")
    print("agent", step, "reading", os.environ["AUTORESEARCH_BRIEF"])
    path = os.environ["AUTORESEARCH_TRAIN_PY"]
    text = open(path).read()
    kind, _, arg = step.partition(" ")
    if kind == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
        open(arg, "w").write(str(child.pid))
        time.sleep(1000)
    if kind == "fail":
        sys.exit(3)
    if kind == "broken":
        text += "\\ndef broken(:\\n"
    if kind in ("edit", "edit-slow"):
        if kind == "edit-slow":
            time.sleep(1.0)
        text = re.sub(r"^BPB = .*$", f"BPB = {arg}", text, count=1, flags=re.M)
    open(path, "w").write(text)
    open(os.environ["AUTORESEARCH_DESCRIPTION"], "w").write(f"set BPB to {arg or kind}\\n")
''')


class CoreSource:
    """The runner's two calls answered by an in-process Coordinator."""

    def __init__(self, core: Coordinator, workers: int = 0):
        self.core = core
        self.workers = workers
        self.down = False
        self.snapshots = 0

    def snapshot(self, watch: list[int]) -> dict:
        if self.down:
            raise SourceUnavailable("no coordinator answering (test)")
        self.snapshots += 1
        snap = proposer_snapshot(self.core.ledger, self.core.repo_dir, watch=watch)
        return with_head({**snap, "workers": self.workers},
                         head_files(self.core.ledger, self.core.repo_dir))

    def submit(self, train_py: str, description: str, base: str | None,
               origin: dict | None = None) -> dict:
        if self.down:
            raise SourceUnavailable("no coordinator answering (test)")
        try:
            return self.core.submit(train_py, description, base, origin=origin)
        except SubmitRejected as exc:
            raise Refused(str(exc)) from None


class Worker:
    """A worker made of core calls: runs whatever it is assigned, reporting the file's BPB."""

    def __init__(self, core: Coordinator, wid: str = "w1"):
        self.core, self.wid = core, wid
        core.worker_hello(wid, wid, {}, HW, None)

    def run_one(self) -> bool:
        a = self.core.next_assignment(self.wid)
        if a is None:
            return False
        bpb = S.head_values(a.train_py, ["BPB"]).get("BPB", 1.5)
        self.core.record_result(self.wid, a.attempt_id, {
            "status": "ok", "val_bpb": bpb, "result": {"status": "ok", "val_bpb": bpb},
            "log_tail": "ok\n", "exit_code": 0, "wall_seconds": 0.1})
        return True


@pytest.fixture
def core(fleet_repo):
    c = Coordinator(fleet_repo)
    yield c
    c.close()


@pytest.fixture
def agent(tmp_path):
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    plan, log = tmp_path / "plan.txt", tmp_path / "agent.log"

    def make(*steps: str) -> list[str]:
        plan.write_text("".join(s + "\n" for s in steps))
        return parse_command(f"{sys.executable} {script} {plan} {log} --brief={{brief}}")
    make.log = log
    return make


def runner(source, argv, out, lines, **kw) -> AgentRunner:
    kw.setdefault("timeout", 30)
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("kill_grace", 0.5)
    return AgentRunner(source, argv, out_dir=out, say=lines.append, snapshot_every=0, **kw)


def drive(r, until, workers=(), timeout: float = DEADLINE) -> None:
    end = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < end, "condition not reached; runner said:\n" + \
            "\n".join(getattr(r, "_lines", []))
        r.step()
        for w in workers:
            while w.run_one():
                pass
        time.sleep(0.05)


# ---- the cycle ----------------------------------------------------------------------------

def test_scripted_agents_cycle_submit_and_learn_from_decisions(core, agent, tmp_path):
    lines: list[str] = []
    argv = agent("edit 1.40", "edit 1.60", "edit 1.60", "edit 1.30")
    src = CoreSource(core, workers=1)
    w = Worker(core)
    r = runner(src, argv, tmp_path / "out", lines, count=1, slack=0, max_proposals=4)
    drive(r, lambda: r.done and not r.pending_decisions(), workers=[w])
    kinds = [rec["state"] for rec in r.records]
    assert kinds == ["submitted", "submitted", "duplicate", "submitted"], lines
    ids = [rec["candidate_id"] for rec in r.records]
    assert ids[2] == ids[1]
    # decided by the real core: 1.40 kept, 1.60 discarded against the new head, 1.30 kept
    assert core.candidate(ids[0])["verdict"] == "kept"
    assert core.candidate(ids[1])["verdict"] == "discarded"
    assert core.candidate(ids[3])["verdict"] == "kept"
    assert any(f"KEPT #{ids[0]} (p1)" in ln for ln in lines), lines
    # each proposal started from the head current at the time; its base is that head
    recs = [json.loads(ln) for ln in (tmp_path / "out" / "proposals.jsonl").read_text()
            .splitlines()]
    assert [x["candidate_id"] for x in recs] == ids
    assert recs[0]["head_commit"] == core.ledger.candidate(0)["commit_sha"]
    new_head = core.ledger.candidate(ids[3])["base_commit"]
    assert new_head != recs[0]["head_commit"] and new_head == recs[3]["head_commit"]
    # transcripts and the by-candidate links
    d = tmp_path / "out" / "by-candidate" / str(ids[1])
    assert "agent edit 1.60" in (d / "transcript.txt").read_text()
    assert json.loads((d / "proposal.json").read_text())["candidate_id"] == ids[1]
    assert (d / "work" / "description.txt").read_text().strip() == "set BPB to 1.60"
    # the brief of the 3rd proposal told it what the 2nd got back, and the decisions
    third = Path(recs[2]["dir"]) / "work" / "brief.md"
    brief = third.read_text()
    assert f"submitted as #{ids[1]}" in brief and f"#{ids[1]} now: DISCARDED" in brief
    assert f"KEPT #{ids[0]} 'set BPB to 1.40'" in brief
    assert core.ledger.candidate(ids[1])["description"] == "set BPB to 1.60"
    # the coordinator keeps where it came from: the log points at the transcript
    where = core.candidate(ids[1])["origin"]
    assert where["tool"] == "agents" and where["proposer"] == "p1"
    assert Path(where["transcript"]) == Path(recs[1]["dir"]) / "transcript.txt"
    logged = {d["candidate_id"]: d for d in core.log(limit=20)["decisions"]}
    assert logged[ids[1]]["origin"]["transcript"] == where["transcript"]
    msg = subprocess.run(["git", "-C", str(core.repo_dir), "log", "-1", "--format=%B",
                          f"refs/autoresearch/candidates/{ids[1]}"], capture_output=True,
                         text=True, check=True).stdout
    assert f"transcript: {where['transcript']}" in msg


def test_unchanged_broken_and_failing_agents_are_fed_back(core, agent, tmp_path):
    lines: list[str] = []
    argv = agent("same", "broken", "fail", "edit 1.45")
    r = runner(CoreSource(core, workers=1), argv, tmp_path / "out", lines, count=1, slack=0,
               max_proposals=4)
    drive(r, lambda: len(r.records) == 4)
    assert [x["state"] for x in r.records] == ["unchanged", "does_not_compile", "agent_failed",
                                               "submitted"], lines
    assert "SyntaxError" in r.records[1]["detail"]
    assert r.records[2]["detail"] == "exit status 3"
    briefs = [(Path(x["dir"]) / "work" / "brief.md").read_text() for x in r.records]
    assert "first proposal" in briefs[0]
    assert "was unchanged" in briefs[1]
    assert "does not compile" in briefs[2] and "SyntaxError" in briefs[2]
    assert "exited with an error" in briefs[3] and "exit status 3" in briefs[3]
    # only the last reached the coordinator
    assert core.status()["counts"]["queued"] == 1


def test_hung_agent_is_killed_at_its_timeout_with_its_children(core, agent, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    lines: list[str] = []
    argv = agent(f"hang {pidfile}", "edit 1.44")
    r = runner(CoreSource(core, workers=1), argv, tmp_path / "out", lines, count=1, slack=0,
               timeout=1.5, max_proposals=2)
    drive(r, lambda: pidfile.exists() and pidfile.read_text())
    grandchild = int(pidfile.read_text())
    drive(r, lambda: len(r.records) >= 1)
    assert r.records[0]["state"] == "timeout", lines
    assert any("timed out after 1.5s" in ln for ln in lines)
    # the whole group is gone, grandchild included (reaped by init or a zombie at worst)
    end = time.monotonic() + DEADLINE
    while _alive(grandchild):
        assert time.monotonic() < end, "grandchild survived the group kill"
        time.sleep(0.05)
    # restarted after the backoff; its brief says what happened
    drive(r, lambda: len(r.records) == 2)
    assert r.records[1]["state"] == "submitted"
    assert "ran out of time" in (Path(r.records[1]["dir"]) / "work" / "brief.md").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def test_backpressure_holds_in_flight_within_workers_plus_slack(core, agent, tmp_path):
    lines: list[str] = []
    argv = agent(*[f"edit 1.{40 + i}" for i in range(12)])
    src = CoreSource(core, workers=1)
    r = runner(src, argv, tmp_path / "out", lines, count=4, slack=1)
    # nothing consumes the queue: at most workers + slack = 2 proposals, never more
    drive(r, lambda: len(r.records) >= 2)
    for _ in range(40):
        r.step()
        busy = sum(1 for s in r.slots if s.proposal is not None)
        flight = sum(1 for x in r.records if x["state"] == "submitted")
        assert flight + busy <= 2, (flight, busy)
        time.sleep(0.02)
    assert r.started == 2
    assert any("waiting: 2 in flight" in ln for ln in lines), lines
    # a worker drains the queue: proposing resumes, still within the limit
    w = Worker(core)
    drive(r, lambda: len(r.records) >= 5, workers=[w])
    r.stop(kill=True)
    drive(r, lambda: r.done)


def test_ctrl_c_once_lets_the_agent_finish_and_submit(core, agent, tmp_path):
    lines: list[str] = []
    r = runner(CoreSource(core, workers=1), agent("edit-slow 1.41"), tmp_path / "out", lines,
               count=1, slack=0)
    drive(r, lambda: r.started == 1)
    r.stop()
    assert any("waiting for p1 to finish" in ln for ln in lines)
    drive(r, lambda: r.done)
    assert [x["state"] for x in r.records] == ["submitted"]


def test_ctrl_c_twice_kills_the_agent_and_submits_nothing(core, agent, tmp_path):
    pidfile = tmp_path / "gc.pid"
    lines: list[str] = []
    r = runner(CoreSource(core, workers=1), agent(f"hang {pidfile}"), tmp_path / "out", lines,
               count=1, slack=0)
    drive(r, lambda: pidfile.exists() and pidfile.read_text())
    r.stop()
    r.stop(kill=True)
    drive(r, lambda: r.done)
    assert r.records[0]["state"] == "agent_failed" and "stopped by the runner" in \
        r.records[0]["detail"]
    assert any("killing 1 running agent" in ln for ln in lines)
    assert core.status()["counts"]["queued"] == 0


def test_unreachable_coordinator_keeps_the_proposal_and_sends_it_later(core, agent, tmp_path):
    lines: list[str] = []
    src = CoreSource(core, workers=1)
    r = runner(src, agent("edit-slow 1.42"), tmp_path / "out", lines, count=1, slack=0,
               max_proposals=1)
    drive(r, lambda: r.started == 1)
    src.down = True
    drive(r, lambda: r.unsent)
    p = r.unsent[0][1]
    assert json.loads((p.dir / "proposal.json").read_text())["state"] == "unsent"
    assert not r.done
    src.down = False
    drive(r, lambda: r.records and not r.unsent)
    assert r.records[-1]["state"] == "submitted"
    assert any("coordinator reachable again" in ln for ln in lines)


def test_a_new_runner_sends_what_a_killed_one_could_not(core, agent, tmp_path):
    lines: list[str] = []
    src = CoreSource(core, workers=1)
    out = tmp_path / "out"
    r = runner(src, agent("edit 1.33"), out, lines, count=1, slack=0, max_proposals=1)
    drive(r, lambda: r.started == 1)
    src.down = True
    drive(r, lambda: r.unsent)
    del r                                    # the runner dies (kill -9): nothing else is kept
    assert core.status()["counts"]["queued"] == 0
    src.down = False
    r2 = runner(src, agent(), out, lines, count=1, slack=0, max_proposals=0)
    assert r2.resume_unsent() == 1
    drive(r2, lambda: r2.records)
    assert r2.records[0]["state"] == "submitted" and r2.records[0]["description"] == \
        "set BPB to 1.33"
    assert core.status()["counts"]["queued"] == 1
    assert r2.resume_unsent() == 0           # sent: not taken up again


def test_origin_is_cleaned_and_optional():
    from coordinator.core import clean_origin

    assert clean_origin(None) == {} and clean_origin("p1") == {}
    assert clean_origin({"tool": "agents", "proposer": "p\u202e1\n", "host": 7,
                         "transcript": " /x/t.txt ", "other": "dropped"}) == \
        {"tool": "agents", "proposer": "p1", "transcript": "/x/t.txt"}


def test_judge_proposal():
    head = "x = 1\n"
    assert judge_proposal(head, "x = 2\n", "d", 0, False, 5).kind == "submit"
    assert judge_proposal(head, head, "d", 0, False, 5).kind == "unchanged"
    assert judge_proposal(head, "x = (\n", "d", 0, False, 5).kind == "does_not_compile"
    assert judge_proposal(head, None, "d", 0, False, 5).kind == "no_train_py"
    assert judge_proposal(head, "x = 2\n", "d", 1, False, 5).kind == "agent_failed"
    assert judge_proposal(head, "x = 2\n", "d", -9, False, 5).detail == "killed by signal 9"
    assert judge_proposal(head, "x = 2\n", "d", -15, True, 5).kind == "timeout"


def test_a_resent_submit_answered_as_duplicate_is_still_ours():
    reply = {"duplicate": True, "candidate_id": 4, "base": "abc", "description": "x y",
             "state": "queued"}
    assert not is_duplicate(reply, "x   y", "abc")            # our request, answered twice
    assert is_duplicate(reply, "x y", "def")                   # someone's, on another head
    assert is_duplicate({**reply, "verdict": "kept"}, "x y", "abc")   # decided before
    assert not is_duplicate({**reply, "duplicate": False}, "z", "q")


def test_parse_command():
    assert parse_command("claude -p 'read {brief}' --add-dir {workdir}") == \
        ["claude", "-p", "read {brief}", "--add-dir", "{workdir}"]
    with pytest.raises(ValueError, match="empty"):
        parse_command("  ")
    with pytest.raises(ValueError, match="No closing quotation"):
        parse_command("claude -p 'oops")


# ---- sweep ----------------------------------------------------------------------------------

def test_sweep_of_three_values_yields_three_candidates_with_the_right_constants(core):
    lines: list[str] = []
    axes = S.parse_params(["BPB=1.3,1.5,1.45,1.6"])
    head = core.ledger.candidate(0)["train_py"]
    S.check_names(head, axes)
    planned = S.points(axes, head=S.head_point(head, axes))     # 1.5 is the head: left out
    assert len(planned) == 3
    w = Worker(core)
    r = SweepRunner(CoreSource(core, workers=1), axes, planned, slack=0, say=lines.append,
                    snapshot_every=0)
    drive(r, lambda: r.done, workers=[w])
    ids = [x["candidate_id"] for x in r.results]
    assert len(ids) == 3
    for cid, want in zip(ids, (1.3, 1.45, 1.6)):
        row = core.ledger.candidate(cid)
        assert S.head_values(row["train_py"], ["BPB"]) == {"BPB": want}
        assert row["description"] == f"sweep: BPB={want!r}"
    verdicts = [core.candidate(c)["verdict"] for c in ids]
    assert verdicts == ["kept", "discarded", "discarded"]
    assert any("[1/3] submitted" in ln for ln in lines)
    assert any(f"KEPT #{ids[0]} (sweep)" in ln for ln in lines)


# ---- the snapshot ---------------------------------------------------------------------------

def test_snapshot_from_a_real_core(core, fleet_repo, fleet_variant):
    w = Worker(core)
    w.run_one()                                   # head measured: 1.50
    a = core.submit(fleet_variant(bpb=1.40), "better")["candidate_id"]
    w.run_one()                                   # a: kept
    # Written on top of the new head (every variant rewrites the BPB line, so from the old one
    # they would conflict with a and end stale).
    b = core.submit(fleet_variant(crash=True), "crashes")["candidate_id"]
    q = core.submit(fleet_variant(bpb=1.47), "queued one")["candidate_id"]
    att = core.next_assignment("w1")              # b: fails with a log tail
    core.record_result("w1", att.attempt_id, {"status": "crash", "val_bpb": None,
                                              "log_tail": "Traceback\nRuntimeError: boom\n",
                                              "exit_code": 1, "wall_seconds": 0.1})
    snap = proposer_snapshot(core.ledger, core.repo_dir)
    files = head_files(core.ledger, core.repo_dir)
    assert snap["head"]["candidate_id"] == files["candidate_id"] == a
    assert files["train_py"] == (fleet_repo / "train.py").read_text()
    assert files["commit"] == snap["head"]["commit"]
    assert "autoresearch run" in files["program_md"]
    assert [d["candidate_id"] for d in snap["decisions"]][:2] == [b, a]
    assert snap["failures"][0]["candidate_id"] == b
    assert "RuntimeError: boom" in snap["failures"][0]["log_tail"]
    assert [x["candidate_id"] for x in snap["queued"]] == [q]
    assert snap["counts"]["queued"] == 1


def test_snapshot_and_brief_under_the_sequential_rule(tmp_path, fleet_train_py,
                                                     fleet_variant):
    """The default rule: the head is run head_runs times, a promising candidate waits for
    repeats -- the brief lists it with its runs so far as mean ± sem and the runs wanted."""
    from coordinator.brief import BriefContext, render_brief
    from coordinator.repo import init_repo

    repo = tmp_path / "seq"
    init_repo(repo, tag="seq", preset="tiny", train_py=fleet_train_py)
    with Coordinator(repo) as c:
        w = Worker(c)
        while w.run_one():              # the head's runs on this class
            pass
        cid = c.submit(fleet_variant(bpb=1.40), "promising")["candidate_id"]
        assert w.run_one()              # its screen run passes: repeats are wanted
        snap = proposer_snapshot(c.ledger, c.repo_dir)
        head = snap["head"]["values"][0]
        assert head["runs"] >= 2 and head["sem"] is not None
        assert snap["noise"] and snap["noise"][0]["text"].startswith("σ")
        waiting = [x for x in snap["awaiting"] if x["candidate_id"] == cid]
        assert waiting and waiting[0]["runs"] == 1 and waiting[0]["sem"] > 0, snap["awaiting"]
        assert waiting[0]["runs_wanted"] and waiting[0]["runs_wanted"] > 1
        ctx = BriefContext(proposer="p1", proposers=1, workdir="w", train_py="w/train.py",
                           description_file="w/description.txt", timeout=60)
        text = render_brief(snap, ctx)
        assert f"- #{cid} 'promising': 1.4000 ± " in text and "repeats: 1 of " in text, text
        assert f"1.5000 ± 0.0" in text         # the head's mean ± sem



def test_a_decision_older_than_the_recent_list_is_still_reported(core, fleet_variant):
    """The runner follows its candidates by id (``watch``), not only through the last K."""
    w = Worker(core)
    w.run_one()
    lines: list[str] = []

    class FewDecisions(CoreSource):
        def snapshot(self, watch):
            snap = super().snapshot(watch)
            return {**snap, "decisions": []}      # as if many decisions came in between
    r = SweepRunner(FewDecisions(core, workers=1), S.parse_params(["BPB=1.2"]),
                    [{"BPB": 1.2}], slack=0, say=lines.append, snapshot_every=0)
    drive(r, lambda: r.done, workers=[w])
    cid = r.results[0]["candidate_id"]
    assert any(ln.startswith(f"KEPT #{cid} (sweep)") for ln in lines), lines


# ---- the commands' own refusals (no coordinator needed) ----------------------------------

def _cli(*args: str):
    import subprocess
    return subprocess.run([sys.executable, "-m", "coordinator.cli", *args], capture_output=True,
                          text=True, timeout=DEADLINE)


def test_bad_specs_and_commands_are_one_line_errors_before_connecting():
    nowhere = ["--connect", "tcp://127.0.0.1:9", "--insecure"]
    r = _cli("sweep", "--param", "DEPTH=two", *nowhere)
    assert r.returncode == 2 and "--param DEPTH=two: 'two' is not a number" in r.stderr, r
    r = _cli("sweep", "--param", "LR=log:0.01:0.1", "--mode", "grid", *nowhere)
    assert r.returncode == 2 and "needs a number of values" in r.stderr, r
    r = _cli("agents", "--command", "no-such-agent-program-here {brief}", *nowhere)
    assert r.returncode == 2 and "'no-such-agent-program-here' is not a program" in r.stderr, r
    r = _cli("agents", "--command", "claude -p 'unbalanced", *nowhere)
    assert r.returncode == 2 and "No closing quotation" in r.stderr, r
    r = _cli("sweep", "--param", "DEPTH=2,3", "--connect", "tcp://127.0.0.1:9", "--insecure")
    assert r.returncode == 1 and "no coordinator answering" in r.stderr, r


def test_a_shell_agent_through_sh_c_and_the_environment(core, tmp_path):
    """The documented way to use a shell: ``sh -c '...'`` reading the paths from the env."""
    lines: list[str] = []
    argv = parse_command("""sh -c 'sed "s/^BPB = .*/BPB = 1.25/" "$AUTORESEARCH_TRAIN_PY" > t &&
                         mv t "$AUTORESEARCH_TRAIN_PY" && echo "shell: BPB 1.25" |
                         tee "$AUTORESEARCH_DESCRIPTION"'""")
    r = runner(CoreSource(core, workers=1), argv, tmp_path / "out dir with spaces", lines,
               count=1, slack=0, max_proposals=1)
    drive(r, lambda: r.records)
    assert r.records[0]["state"] == "submitted", lines
    row = core.ledger.candidate(r.records[0]["candidate_id"])
    assert S.head_values(row["train_py"], ["BPB"]) == {"BPB": 1.25}
    assert row["description"] == "shell: BPB 1.25"
