"""The Coordinator core on real git repos and a real SQLite ledger, driven without sockets.

Workers are just ids with a hardware class; results are the wire's outcome maps. Ends with
crash consistency: a simulated crash between "ledger committed the keep" and "branch moved",
and a real ``kill -9`` of a process looping over coordinator operations.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from coordinator import repo as R
from coordinator.core import Coordinator, SubmitRejected, clean_description
from coordinator.states import IllegalTransition

BASE = "LR = 0.01\nprint('baseline', LR)\n"
A, B = "Apple M1 Pro/16GB/metal", "cpu/x86_64/24GB"


def variant(n) -> str:
    return f"LR = {n}\nprint('variant', LR)\n"


def ok(bpb, peak_mb=3072.0) -> dict:
    return {"status": "ok", "val_bpb": bpb,
            "result": {"status": "ok", "val_bpb": bpb, "peak_vram_mb": peak_mb},
            "log_tail": "step 10 loss 3.2\n", "exit_code": 0, "wall_seconds": 1.0}


def failed(status="crash", line="NameError: name 'nn_Linear' is not defined") -> dict:
    return {"status": status, "val_bpb": None, "result": {"status": status, "error": None},
            "log_tail": f"Traceback (most recent call last):\n  ...\n{line}\n", "exit_code": 1,
            "wall_seconds": 0.5}


def git(d, *args) -> str:
    return subprocess.run(["git", "-C", str(d), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    return d


@pytest.fixture
def coord(run_dir):
    c = Coordinator(run_dir)
    yield c
    c.close()


def hello(c, wid, hw=A):
    return c.worker_hello(wid, wid.upper(), {"chip": hw}, hw, None)


def measure_head(c, wid, bpb, hw=A):
    hello(c, wid, hw)
    a = c.next_assignment(wid)
    assert a.purpose == "head", a
    assert c.record_result(wid, a.attempt_id, ok(bpb)).accepted
    return a


def run_candidate(c, wid, outcome):
    a = c.next_assignment(wid)
    assert a is not None and a.purpose == "candidate", a
    return a, c.record_result(wid, a.attempt_id, outcome)


def branch(c) -> str:
    return git(c.repo_dir, "rev-parse", "refs/heads/autoresearch/t")


# ---- submit ---------------------------------------------------------------------------------

def test_submit_refuses_code_that_does_not_compile(coord):
    with pytest.raises(SubmitRejected, match=r"does not compile: SyntaxError: .*line 2"):
        coord.submit("x = 1\ndef broken(:\n    pass\n", "broken")
    assert coord.status()["queue"] == []


def test_submit_stores_a_candidate_commit_and_queues_it(coord, run_dir):
    head = branch(coord)
    s = coord.submit(variant(1), "try LR 1")
    assert s["candidate_id"] == 1 and s["state"] == "queued" and not s["duplicate"]
    ref = git(run_dir, "rev-parse", "refs/autoresearch/candidates/1")
    assert ref == s["commit"] and git(run_dir, "rev-parse", f"{ref}^") == head
    assert git(run_dir, "show", f"{ref}:train.py") + "\n" == variant(1)
    assert branch(coord) == head  # submitting never moves the branch
    assert [q["candidate_id"] for q in coord.status()["queue"]] == [1]


def test_duplicate_submit_answers_with_the_earlier_candidate(coord):
    first = coord.submit(variant(1), "one")
    again = coord.submit(variant(1), "same text, other words")
    assert again["duplicate"] and again["candidate_id"] == first["candidate_id"]
    assert len(coord.status()["queue"]) == 1
    measure_head(coord, "a1", 1.5)
    run_candidate(coord, "a1", ok(1.6))
    later = coord.submit(variant(1), "and again")
    assert later["duplicate"] and later["state"] == "discarded" and later["val_bpb"] == 1.6
    base = coord.submit(BASE, "the baseline itself")
    assert base["duplicate"] and base["candidate_id"] == 0


def test_descriptions_are_cleaned():
    assert clean_description("tab\there\nnew\x00line\x1b[31m red") == "tab here newline[31m red"
    assert clean_description("größer 🚀 模型") == "größer 🚀 模型"
    long = clean_description("x" * 1000)
    assert len(long) == 200 and long.endswith("…")
    assert clean_description("\x01\x02") == "(no description)"


def test_submit_with_unknown_base_is_refused(coord):
    with pytest.raises(SubmitRejected, match="not a commit"):
        coord.submit(variant(1), "x", base="deadbeef")


# ---- scheduling ------------------------------------------------------------------------------

def test_head_is_measured_first_on_each_class(coord):
    for i in range(3):
        coord.submit(variant(i), f"v{i}")
    hello(coord, "a1", A)
    hello(coord, "a2", A)
    hello(coord, "b1", B)
    first = coord.next_assignment("a1")
    assert first.purpose == "head" and first.candidate_id == 0 and first.train_py == BASE
    assert first.settings == {k: coord.settings[k] for k in R.RUN_FIELDS}
    assert first.timeout == coord.settings["timeout"] and first.settings["seed"] == 42
    assert coord.next_assignment("a1") is None  # holds a live lease
    # A is being measured elsewhere: a2 gets the oldest queued candidate.
    second = coord.next_assignment("a2")
    assert second.purpose == "candidate" and second.candidate_id == 1
    # B has no head number at all: b1 measures the head first.
    third = coord.next_assignment("b1")
    assert third.purpose == "head" and third.commit == first.commit
    coord.record_result("b1", third.attempt_id, ok(1.7))
    fourth = coord.next_assignment("b1")
    assert fourth.purpose == "candidate" and fourth.candidate_id == 2
    st = coord.status()
    assert {r["attempt_id"] for r in st["running"]} == {first.attempt_id, second.attempt_id,
                                                        fourth.attempt_id}
    heads = {h["hw_class"]: h for h in st["heads"]}
    assert heads[B]["val_bpb"] == 1.7 and heads[A]["state"] == "measuring"
    with pytest.raises(ValueError, match="hello first"):
        coord.next_assignment("stranger")


# ---- decisions -------------------------------------------------------------------------------

def test_keep_advances_the_branch(coord, run_dir):
    measure_head(coord, "a1", 1.50)
    base = branch(coord)
    cand = coord.submit(variant(1), "double the LR")
    a, ack = run_candidate(coord, "a1", ok(1.40))
    assert ack.accepted and [d.verdict for d in ack.decisions] == ["kept"]
    d = ack.decisions[0]
    assert d.val_bpb == 1.40 and d.head_bpb == 1.50 and d.head_before == base
    assert d.reason == f"1.4000 < head 1.5000 ± 0.0300 (1) (margin 0, greedy: one run) on {A}"
    new = branch(coord)
    assert new == d.head_after != base
    assert git(run_dir, "rev-parse", f"{new}^") == base
    assert git(run_dir, "rev-parse", f"{new}^{{tree}}") == \
        git(run_dir, "rev-parse", f"{cand['commit']}^{{tree}}")
    msg = git(run_dir, "log", "-1", "--format=%B", new)
    for needle in ("#1", "double the LR", "1.5000 ± 0.0300 (1) -> 1.4000 ± 0.0300 (1)", A,
                   a.attempt_id, "decided by: greedy"):
        assert needle in msg, needle
    assert git(run_dir, "rev-parse", "refs/autoresearch/candidates/1") == cand["commit"]
    assert (run_dir / "train.py").read_text() == variant(1)  # worktree follows the branch
    assert git(run_dir, "status", "--porcelain") == ""
    st = coord.status()
    assert st["head"] == new and st["head_candidate"] == 1
    assert {h["hw_class"]: h["val_bpb"] for h in st["heads"]} == {A: 1.40}
    tsv = (run_dir / "results.tsv").read_text()
    assert tsv == coord.export_tsv()
    # upstream's five columns first, then how the number was measured
    assert tsv.splitlines() == [
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\truns\tsem\thead_bpb\thead_runs\t"
        "confidence\thw_class",
        f"{git(run_dir, 'rev-parse', '--short=7', base)}\t1.500000\t3.0\tkeep\tbaseline"
        "\t\t\t\t\t\t",
        f"{cand['commit'][:7]}\t1.400000\t3.0\tkeep\tdouble the LR\t1\t0.030000\t1.500000\t1"
        f"\t{d.to_dict() and coord.ledger.decision(1)['confidence']:.6f}\t{A}"]


def test_discard_leaves_the_branch(coord, run_dir):
    measure_head(coord, "a1", 1.50)
    before = branch(coord)
    coord.submit(variant(1), "worse")
    coord.submit(variant(2), "equal")
    _, ack = run_candidate(coord, "a1", ok(1.55))
    assert ack.decisions[0].verdict == "discarded"
    assert "1.5500 >= head 1.5000" in ack.decisions[0].reason
    _, ack = run_candidate(coord, "a1", ok(1.50))  # not strictly better: discarded
    assert ack.decisions[0].verdict == "discarded"
    assert branch(coord) == before
    assert git(run_dir, "rev-parse", "refs/autoresearch/candidates/2")
    assert [r.split("\t")[3] for r in coord.export_tsv().splitlines()[1:]] == [
        "keep", "discard", "discard"]


def test_margin_is_respected(tmp_path):
    d = tmp_path / "m"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, margin=0.05, **R.SINGLE_RUN)
    with Coordinator(d) as c:
        measure_head(c, "a1", 1.50)
        c.submit(variant(1), "a little better")
        c.submit(variant(2), "much better")
        assert run_candidate(c, "a1", ok(1.46))[1].decisions[0].verdict == "discarded"
        d2 = run_candidate(c, "a1", ok(1.40))[1].decisions[0]
        assert d2.verdict == "kept" and "(margin 0.05," in d2.reason


def test_failed_candidate_has_a_decision_with_the_log_line(coord, run_dir):
    measure_head(coord, "a1", 1.5)
    before = branch(coord)
    coord.submit(variant(1), "typo")
    _, ack = run_candidate(coord, "a1", failed("crash"))
    d = ack.decisions[0]
    assert d.verdict == "failed" and d.val_bpb is None
    assert d.reason.startswith(f"crash on {A} (exit 1)") and "nn_Linear" in d.reason
    assert branch(coord) == before
    assert coord.export_tsv().splitlines()[-1].split("\t")[1:4] == ["0.000000", "0.0", "crash"]
    # ok without a number is not a measurement
    coord.submit(variant(2), "silent")
    _, ack = run_candidate(coord, "a1", {"status": "ok", "val_bpb": None})
    assert ack.decisions[0].verdict == "failed" and "no val_bpb" in ack.decisions[0].reason
    log = coord.log()
    assert [x["verdict"] for x in log["decisions"]] == ["failed", "failed", "kept"]
    assert log["attempts"][0]["status"] == "crash" and log["entries"][0]["kind"] == "decision"


def test_measured_candidate_waits_for_the_head_number(coord):
    hello(coord, "a1")
    hello(coord, "a2")
    coord.submit(variant(1), "better")
    head = coord.next_assignment("a1")
    cand = coord.next_assignment("a2")
    assert (head.purpose, cand.purpose) == ("head", "candidate")
    ack = coord.record_result("a2", cand.attempt_id, ok(1.4))
    assert ack.accepted and ack.decisions == [] and "waiting" in ack.note
    st = coord.status()
    assert [m["candidate_id"] for m in st["measured"]] == [1]
    assert st["candidates"][1]["state"] == "measured"
    ack = coord.record_result("a1", head.attempt_id, ok(1.5))
    assert [(d.candidate_id, d.verdict) for d in ack.decisions] == [(1, "kept")]
    assert coord.status()["measured"] == []


def test_candidate_conflicting_with_a_keep_since_its_base_goes_stale(coord, run_dir):
    """Every variant here rewrites both lines of the baseline, so the second one from the same
    base cannot be replayed onto the head the first became: stale, and nothing else moves."""
    measure_head(coord, "a1", 1.50)
    base0 = branch(coord)
    c1 = coord.submit(variant(1), "first idea")
    c2 = coord.submit(variant(2), "second idea, also from the baseline")
    assert c2["base"] == base0
    assert run_candidate(coord, "a1", ok(1.40))[1].decisions[0].verdict == "kept"
    head1 = branch(coord)
    before = (coord.status()["counts"], coord.export_tsv(), git(run_dir, "for-each-ref"))
    assert coord.next_assignment("a1") is None          # nothing left to run
    c = coord.candidate(c2["candidate_id"])
    assert c["state"] == "stale" and c["verdict"] == "stale"
    assert c["reason"] == (f"conflicts with #{c1['candidate_id']} (kept as {head1[:10]}): "
                           f"resubmit on top of head {head1[:10]}")
    d = coord.log()["decisions"][0]
    assert d["verdict"] == "stale" and "<<<<<<< head" in d["conflicts"]
    assert "LR = 1" in d["conflicts"] and "LR = 2" in d["conflicts"]
    # Nothing else changed: no run, no attempt, the branch, results.tsv and refs as they were.
    after = coord.status()["counts"]
    assert after["stale"] == 1 and after["attempts"] == before[0]["attempts"]
    assert {k: v for k, v in after.items() if k not in ("stale", "queued")} == \
        {k: v for k, v in before[0].items() if k not in ("stale", "queued")}
    assert branch(coord) == head1 and coord.export_tsv() == before[1]
    assert git(run_dir, "for-each-ref") == before[2]


def test_head_that_fails_twice_blocks_its_class(coord):
    coord.submit(variant(1), "v1")
    hello(coord, "a1")
    hello(coord, "b1", B)
    for _ in range(2):
        a = coord.next_assignment("a1")
        assert a.purpose == "head"
        ack = coord.record_result("a1", a.attempt_id, failed("oom", "out of memory"))
        assert ack.accepted and "failed" in ack.note
    assert coord.next_assignment("a1") is None
    st = coord.status()
    assert {h["hw_class"]: h["state"] for h in st["heads"]}[A] == "blocked"
    assert any("cannot be decided" in p and A in p for p in st["problems"])
    # Another class is unaffected.
    assert coord.next_assignment("b1").purpose == "head"


# ---- results that must not count ------------------------------------------------------------

def test_duplicate_result_is_acked_and_changes_nothing(coord):
    measure_head(coord, "a1", 1.5)
    coord.submit(variant(1), "v1")
    a, ack = run_candidate(coord, "a1", ok(1.4))
    head = branch(coord)
    again = coord.record_result("a1", a.attempt_id, ok(1.2))
    assert again.accepted and again.decisions == [] and "duplicate" in again.note
    assert branch(coord) == head
    assert coord.log()["attempts"][0]["val_bpb"] == 1.4
    assert len(coord.log()["decisions"]) == 2


def test_result_from_the_wrong_worker_is_not_stored(coord):
    measure_head(coord, "a1", 1.5)
    hello(coord, "a2")
    coord.submit(variant(1), "v1")
    a = coord.next_assignment("a1")
    ack = coord.record_result("a2", a.attempt_id, ok(1.0))
    assert not ack.accepted and "leased to worker a1, not a2" in ack.note
    row = coord.ledger.attempt(a.attempt_id)
    assert row["state"] == "leased" and row["status"] is None
    assert not coord.record_result("a1", "f" * 32, ok(1.0)).accepted  # unknown attempt
    assert coord.record_result("a1", a.attempt_id, ok(1.4)).accepted


def test_lost_lease_result_is_stale_and_the_candidate_requeued(coord):
    measure_head(coord, "a1", 1.5)
    coord.submit(variant(1), "v1")
    a = coord.next_assignment("a1")
    assert coord.leased_workers() == {"a1"}
    assert coord.worker_lost("a1", "silent for 5.0s") == [1]
    assert coord.leased_workers() == set()
    late = coord.record_result("a1", a.attempt_id, ok(1.0))
    assert not late.accepted and "stored as stale" in late.note
    row = coord.ledger.attempt(a.attempt_id)
    assert (row["state"], row["prior_state"], row["val_bpb"]) == ("stale", "lost", 1.0)
    assert not coord.record_result("a1", a.attempt_id, ok(1.0)).accepted
    assert coord.status()["candidates"][1]["state"] == "queued"
    assert branch(coord) == coord.status()["head"]
    hello(coord, "a1")
    again = coord.next_assignment("a1")
    assert again.candidate_id == 1 and again.attempt_id != a.attempt_id


def test_three_lost_leases_fail_the_candidate(coord):
    measure_head(coord, "a1", 1.5)
    coord.submit(variant(1), "kills machines")
    coord.submit(variant(2), "fine")
    for i in range(3):
        hello(coord, "a1")
        a = coord.next_assignment("a1")
        assert a.candidate_id == 1
        requeued = coord.worker_lost("a1", "silent")
        assert requeued == ([1] if i < 2 else [])
    d = coord.log()["decisions"][0]
    assert d["candidate_id"] == 1 and d["verdict"] == "failed"
    assert d["reason"] == "lost 3 times: may crash the machine" and len(d["attempt_ids"]) == 3
    hello(coord, "a1")
    assert coord.next_assignment("a1").candidate_id == 2


def test_bye_cancels_without_a_strike_and_hello_reattaches_or_cancels(coord):
    measure_head(coord, "a1", 1.5)
    coord.submit(variant(1), "v1")
    for _ in range(3):  # clean leaves never count against the candidate
        hello(coord, "a1")
        coord.next_assignment("a1")
        assert coord.worker_bye("a1", "shutting down") == [1]
    hello(coord, "a1")
    a = coord.next_assignment("a1")
    # Reconnect carrying the attempt: re-attached, nothing cancelled.
    r = coord.worker_hello("a1", "A1", {}, A, a.attempt_id)
    assert r.reattached and r.cancel_attempt is None
    coord.worker_seen("a1", a.attempt_id, {"step": 3, "progress": 0.25, "loss": 4.0})
    w = coord.status()["workers"][0]
    assert w["state"] == "running" and w["progress"]["progress"] == 0.25
    # Back without it (the assign never reached it): cancelled, requeued, no strike.
    r = coord.worker_hello("a1", "A1", {}, A, None)
    assert not r.reattached and r.requeued == [1]
    assert coord.ledger.attempt(a.attempt_id)["state"] == "cancelled"
    # Hello with an attempt that is no longer its lease: told to cancel it.
    r = coord.worker_hello("a1", "A1", {}, A, a.attempt_id)
    assert r.cancel_attempt == a.attempt_id
    # The worker's own cancel outcome requeues too.
    b = coord.next_assignment("a1")
    ack = coord.record_result("a1", b.attempt_id, {"status": "cancelled", "val_bpb": None})
    assert ack.accepted and "requeued" in ack.note
    assert coord.status()["candidates"][1]["state"] == "queued"


def test_illegal_transition_raises_and_rolls_back(coord):
    coord.submit(variant(1), "v1")
    with pytest.raises(IllegalTransition, match="queued -> kept"):
        with coord.ledger.tx():
            coord._set_candidate(1, "kept")
    assert coord.ledger.candidate(1)["state"] == "queued"


def test_state_survives_a_restart(run_dir):
    with Coordinator(run_dir) as c:
        measure_head(c, "a1", 1.5)
        c.submit(variant(1), "v1")
        a = c.next_assignment("a1")
    with Coordinator(run_dir) as c:
        assert c.leased_workers() == {"a1"}
        assert c.worker_hello("a1", "A1", {}, A, a.attempt_id).reattached
        ack = c.record_result("a1", a.attempt_id, ok(1.4))
        assert ack.decisions[0].verdict == "kept"
        assert c.fixed == []


# ---- crash consistency ----------------------------------------------------------------------

def test_crash_between_ledger_keep_and_update_ref_is_reconciled(run_dir, monkeypatch):
    c = Coordinator(run_dir)
    measure_head(c, "a1", 1.5)
    before = branch(c)
    c.submit(variant(1), "v1")
    a = c.next_assignment("a1")

    class Crash(BaseException):
        pass

    def die(*_a, **_k):
        raise Crash()

    monkeypatch.setattr(Coordinator, "_move_branch", die)
    with pytest.raises(Crash):
        c.record_result("a1", a.attempt_id, ok(1.4))
    ledger_head = c.ledger.head()["commit_sha"]
    assert ledger_head != before and branch(c) == before  # the gap a kill -9 could leave
    c.close()
    monkeypatch.undo()
    # Also lose a candidate ref, as a crash between submit's ledger commit and its ref would.
    git(run_dir, "update-ref", "-d", "refs/autoresearch/candidates/1")
    with Coordinator(run_dir) as again:
        assert branch(again) == ledger_head
        assert any("moved autoresearch/t" in f for f in again.fixed)
        assert any("recreated refs/autoresearch/candidates/1" in f for f in again.fixed)
        assert again.status()["reconciled"] == again.fixed
        # The result is already counted: a resend changes nothing.
        assert "duplicate" in again.record_result("a1", a.attempt_id, ok(1.4)).note
    assert (run_dir / "train.py").read_text() == variant(1)


def test_branch_moved_by_hand_is_put_back_and_the_tip_saved(run_dir):
    with Coordinator(run_dir) as c:
        head = branch(c)
    tree = git(run_dir, "rev-parse", f"{head}^{{tree}}")
    stray = subprocess.run(["git", "-C", str(run_dir), "commit-tree", tree, "-p", head, "-m",
                            "by hand"], capture_output=True, text=True, check=True,
                           env={**os.environ, **R.GIT_IDENTITY}).stdout.strip()
    git(run_dir, "update-ref", "refs/heads/autoresearch/t", stray)
    with Coordinator(run_dir) as c:
        assert branch(c) == head
        assert git(run_dir, "rev-parse", "refs/autoresearch/displaced/0") == stray


LOOP = textwrap.dedent("""
    import random, sys
    from coordinator.core import Coordinator
    repo, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    c = Coordinator(repo)
    workers = [("wa1", "classA"), ("wa2", "classA"), ("wb1", "classB")]
    for w, hw in workers:
        c.worker_hello(w, w, {}, hw, None)
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        if rng.random() < 0.4:
            c.submit(f"X = {rng.randrange(10**12)}\\n", f"variant {seed}-{n}")
        w, hw = rng.choice(workers)
        r = rng.random()
        if r < 0.05:
            c.worker_lost(w, "test")
            c.worker_hello(w, w, {}, hw, None)
            continue
        c.next_assignment(w)
        lease = c.ledger.live_lease(w)
        if lease is None:
            continue
        good = rng.random() < 0.85
        out = {"status": "ok" if good else "crash",
               "val_bpb": rng.uniform(1.0, 2.0) if good else None,
               "result": {"peak_vram_mb": 1000.0}, "log_tail": "boom", "exit_code": 0}
        c.record_result(w, lease["attempt_id"], out)
        if rng.random() < 0.3:
            c.record_result(w, lease["attempt_id"], out)  # a resend
""")


def check_invariants(c: Coordinator) -> None:
    L = c.ledger
    assert branch(c) == L.head()["commit_sha"]
    decided = {r[0] for r in L.all("SELECT id FROM candidates "
                                   "WHERE state IN ('kept', 'discarded', 'failed', 'stale')")}
    per = {r[0]: r[1] for r in L.all("SELECT candidate_id, COUNT(*) FROM decisions "
                                     "GROUP BY candidate_id")}
    assert set(per) == decided and set(per.values()) <= {1}
    kept = L.scalar("SELECT COUNT(*) FROM decisions WHERE verdict = 'kept' AND candidate_id > 0")
    # Every keep moved the branch exactly once: first-parent chain = baseline + keeps.
    assert int(git(c.repo_dir, "rev-list", "--first-parent", "--count", branch(c))) == kept + 1
    refs = R.list_refs(c.repo_dir, R.CANDIDATE_REFS)
    for row in L.all("SELECT id, commit_sha FROM candidates"):
        assert refs[R.candidate_ref(row["id"])] == row["commit_sha"]
    # A running candidate has exactly one live lease; others none.
    for row in L.all("SELECT c.id, c.state, (SELECT COUNT(*) FROM attempts a WHERE "
                     "a.candidate_id = c.id AND a.state = 'leased' AND a.purpose = 'candidate')"
                     " AS live FROM candidates c"):
        assert row["live"] == (1 if row["state"] == "running" else 0), dict(row)
    # A measured/decided-by-measurement candidate has exactly one counted ok attempt per text
    # (a rebase onto a newer head starts a new text).
    for row in L.all("SELECT c.id, a.text_sha, COUNT(a.attempt_id) AS n FROM candidates c JOIN "
                     "attempts a ON a.candidate_id = c.id AND a.purpose = 'candidate' AND "
                     "a.state = 'done' GROUP BY c.id, a.text_sha"):
        assert row["n"] == 1, dict(row)
    # Every rebased text is reachable, and every keep's tree is the text it was measured as.
    rebased = R.list_refs(c.repo_dir, R.REBASED_REFS)
    for row in L.all("SELECT id, text_commit FROM candidates WHERE text_commit != commit_sha"):
        assert rebased[R.rebased_ref(row["id"], row["text_commit"])] == row["text_commit"]
    for row in L.all("SELECT c.text_commit, d.head_after FROM decisions d JOIN candidates c ON "
                     "c.id = d.candidate_id WHERE d.verdict = 'kept' AND c.id > 0"):
        assert git(c.repo_dir, "rev-parse", f"{row[1]}^{{tree}}") == \
            git(c.repo_dir, "rev-parse", f"{row[0]}^{{tree}}")


def reopen(run_dir, deadline: float = 20.0) -> Coordinator:
    """Open after a kill -9. A git child the coordinator was forking at the instant of the kill
    can hold the inherited lock fd for a moment before it dies too, so retry briefly (the
    deadline only turns a hang into a failure)."""
    end = time.monotonic() + deadline
    while True:
        try:
            return Coordinator(run_dir)
        except R.CoordinatorBusy:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@pytest.mark.slow
def test_kill_minus_nine_at_random_moments_loses_nothing(run_dir, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    rng = random.Random(1234)
    for round_ in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(run_dir), str(round_)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()
        time.sleep(rng.uniform(0.2, 0.9))
        assert p.poll() is None, p.stderr.read()
        os.killpg(p.pid, signal.SIGKILL)  # the coordinator and any git it was running
        p.wait()
        p.stdout.close()
        p.stderr.close()
        with reopen(run_dir) as c:
            check_invariants(c)
    with reopen(run_dir) as c:
        counts = c.status()["counts"]
        assert counts["attempts"] > 0 and sum(counts[s] for s in ("kept", "discarded",
                                                                  "failed", "stale")) > 0
        check_invariants(c)
