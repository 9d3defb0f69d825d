"""Parallel candidates build on the head: the Coordinator rebases at assignment, keeps only what
was measured on top of the head, ends conflicts as stale, and answers the same program with the
earlier result. Real git, real SQLite, driven without sockets (workers are ids with a class).

Every train.py here has its constants on lines with unchanged lines between them: git counts
edits to touching lines as one conflicting hunk, so "different constants" means separated ones.
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
from coordinator.cli import format_log, format_status, format_submission
from coordinator.core import Coordinator
from test_core import check_invariants, git, ok, reopen
from test_fleet import fleet  # noqa: F401  (the fixture)

HW = "Test/8GB/cpu"
BASE = textwrap.dedent('''\
    """A stand-in train.py: the constants research edits, one per paragraph."""

    LR = 0.04            # learning rate

    DEPTH = 4            # layers

    WARMUP = 10          # steps

    BATCH = 16           # rows per step


    def main():
        print(LR, DEPTH, WARMUP, BATCH)
''')


def edit(text: str, **values) -> str:
    for name, value in values.items():
        old = next(ln for ln in text.splitlines() if ln.startswith(f"{name} = "))
        text = text.replace(old, f"{name} = {value!r}" + old[len(old.split("#")[0].rstrip()):],
                            1)
    return text


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    return d


@pytest.fixture
def coord(run_dir):
    with Coordinator(run_dir) as c:
        for w in ("w1", "w2"):
            c.worker_hello(w, w.upper(), {}, HW, None)
        head = c.next_assignment("w1")
        assert head.purpose == "head"
        c.record_result("w1", head.attempt_id, ok(1.50))
        yield c


def head_text(c) -> str:
    return git(c.repo_dir, "show", "refs/heads/autoresearch/t:train.py") + "\n"


def run(c, wid, bpb, expect=None):
    a = c.next_assignment(wid)
    assert a is not None and a.purpose == "candidate", a
    if expect is not None:
        assert a.candidate_id == expect
    return a, c.record_result(wid, a.attempt_id, ok(bpb))


# ---- rebase at assignment --------------------------------------------------------------------

def test_second_candidate_runs_with_both_changes_and_the_head_keeps_both(coord, run_dir):
    c = coord
    base0 = c.ledger.head()["commit_sha"]
    one = c.submit(edit(BASE, LR=0.02), "halve the learning rate")["candidate_id"]
    two = c.submit(edit(BASE, WARMUP=30), "longer warmup")["candidate_id"]
    a1, ack = run(c, "w1", 1.40, one)
    assert [d.verdict for d in ack.decisions] == ["kept"]
    head1 = c.ledger.head()["commit_sha"]
    a2, ack = run(c, "w1", 1.30, two)
    # The train.py its attempt ran: its change replayed onto the head #1 became.
    assert a2.train_py == edit(BASE, LR=0.02, WARMUP=30)
    row = c.ledger.attempt(a2.attempt_id)
    assert row["onto"] == head1 and git(run_dir, "rev-parse", f"{a2.commit}^") == head1
    assert git(run_dir, "show", f"{a2.commit}:train.py") + "\n" == a2.train_py
    assert git(run_dir, "rev-parse", f"refs/autoresearch/rebased/{two}/{a2.commit}") == a2.commit
    # Kept: the head holds both ideas, as measured, on top of the head it landed on.
    assert [d.verdict for d in ack.decisions] == ["kept"]
    head2 = c.ledger.head()["commit_sha"]
    assert head_text(c) == edit(BASE, LR=0.02, WARMUP=30)
    assert git(run_dir, "rev-parse", f"{head2}^") == head1
    assert (run_dir / "train.py").read_text() == edit(BASE, LR=0.02, WARMUP=30)
    # Provenance: the keep commit, the log, results.tsv, the candidate's summary.
    message = git(run_dir, "log", "-1", "--format=%B", head2)
    assert f"based on: {base0} (#0)" in message and f"rebased onto: {head1} (#{one})" in message
    assert f"measured text: {a2.commit}" in message
    attempt = next(x for x in c.log()["attempts"] if x["attempt_id"] == a2.attempt_id)
    assert attempt["based_on"] == base0 and attempt["rebased_onto"] == head1
    assert attempt["description"].endswith(f"rebased onto {head1[:10]}")
    decision = next(x for x in c.log()["decisions"] if x["candidate_id"] == two)
    assert decision["based_on"] == base0 and decision["rebased_onto"] == head1
    rows = c.export_tsv().splitlines()
    assert rows[-1].split("\t")[4] == f"longer warmup [based on {base0[:7]}, rebased onto " \
                                      f"{head1[:7]}]"
    assert rows[-2].split("\t")[4] == "halve the learning rate"   # ran on its own base
    summary = c.candidate(two)
    assert summary["based_on"] == base0 and summary["rebased_onto"] == head1


def test_status_says_what_a_queued_candidate_is_based_on(coord):
    c = coord
    base0 = c.ledger.head()["commit_sha"]
    c.submit(edit(BASE, LR=0.02), "one")
    two = c.submit(edit(BASE, DEPTH=6), "two")["candidate_id"]
    run(c, "w1", 1.40)
    queued = c.status()["queue"]
    assert [(q["candidate_id"], q["based_on"], q["behind_head"]) for q in queued] == \
        [(two, base0, True)]
    line = next(ln for ln in format_status(c.status()).splitlines() if ln.startswith(f"#{two}"))
    assert line.split() == [f"#{two}", base0[:7],
                            *"(behind the head: rebased when it runs)".split(), "two"]
    a = c.next_assignment("w1")
    running = c.status()["running"]
    assert running[0]["onto"] == c.ledger.head()["commit_sha"] and running[0]["commit"] == a.commit


def test_conflicting_pair_the_second_goes_stale_and_nothing_else_changes(coord, run_dir):
    c = coord
    one = c.submit(edit(BASE, LR=0.02), "lower LR")["candidate_id"]
    two = c.submit(edit(BASE, LR=0.08), "higher LR")["candidate_id"]
    three = c.submit(edit(BASE, BATCH=32), "bigger batch")["candidate_id"]
    run(c, "w1", 1.40, one)
    head1 = c.ledger.head()["commit_sha"]
    refs = git(run_dir, "for-each-ref")
    attempts = c.status()["counts"]["attempts"]
    # The next worker gets #3: #2 ends stale on the way, without a run.
    a, _ = run(c, "w2", 1.45, three)
    s = c.candidate(two)
    assert s["state"] == "stale" and s["reason"] == (
        f"conflicts with #{one} (kept as {head1[:10]}): resubmit on top of head {head1[:10]}")
    d = next(x for x in c.log()["decisions"] if x["candidate_id"] == two)
    assert d["conflicts_with"] == one and d["resubmit_on"] == head1
    assert "LR = 0.02" in d["conflicts"] and "LR = 0.08" in d["conflicts"]
    assert "BATCH" not in d["conflicts"]   # only the hunk, with a little context
    assert c.ledger.one("SELECT COUNT(*) FROM attempts WHERE candidate_id = ?", two)[0] == 0
    assert c.status()["counts"]["attempts"] == attempts + 1       # only #3's run
    assert all(line in git(run_dir, "for-each-ref") for line in refs.splitlines())
    assert "\tstale\t" not in c.export_tsv() and "higher LR" not in c.export_tsv()
    text = format_log(c.log())   # what `autoresearch-coord log` prints
    line = next(ln for ln in text.splitlines() if ln.split()[2:4] == [f"#{two}", "stale"])
    assert f"higher LR: conflicts with #{one}" in line
    assert f"\n#{two} conflicts with #{one}:\n" in text and "\n    <<<<<<< head " in text


def test_rebased_text_that_is_the_head_already_is_answered_without_a_run(coord):
    c = coord
    one = c.submit(edit(BASE, LR=0.02, DEPTH=6), "lower LR, deeper")["candidate_id"]
    two = c.submit(edit(BASE, LR=0.02), "lower LR")["candidate_id"]   # part of #1's change
    run(c, "w1", 1.40, one)
    assert c.next_assignment("w1") is None
    s = c.candidate(two)
    assert s["state"] == "stale" and s["reason"].startswith("already there: rebased onto head")
    assert f"the head's program (#{one})" in s["reason"]
    assert c.ledger.one("SELECT COUNT(*) FROM attempts WHERE candidate_id = ?", two)[0] == 0


# ---- a keep is measured on top of the head it lands on --------------------------------------

def test_head_moving_under_a_run_rebases_again_and_never_pools_texts(coord, run_dir):
    c = coord
    one = c.submit(edit(BASE, LR=0.02), "one")["candidate_id"]
    two = c.submit(edit(BASE, DEPTH=6), "two")["candidate_id"]
    a1 = c.next_assignment("w1")
    a2 = c.next_assignment("w2")                    # both run on the baseline at once
    assert (a1.candidate_id, a2.candidate_id) == (one, two)
    assert a2.train_py == edit(BASE, DEPTH=6)
    assert [d.verdict for d in c.record_result("w1", a1.attempt_id, ok(1.40)).decisions] == \
        ["kept"]
    head1 = c.ledger.head()["commit_sha"]
    # #2's run was of a text the head no longer is: not decided on it, rebased, run again.
    ack = c.record_result("w2", a2.attempt_id, ok(1.10))
    assert ack.decisions == [] and c.candidate(two)["state"] == "repeating"
    again = c.next_assignment("w2")
    assert again.candidate_id == two and again.train_py == edit(BASE, LR=0.02, DEPTH=6)
    assert again.settings["seed"] == a2.settings["seed"]   # seed index 0 of the new text
    d = c.record_result("w2", again.attempt_id, ok(1.45)).decisions[0]
    # Judged on the new text's run only (1.45 > 1.40): the old run's 1.10 is not pooled in.
    assert d.verdict == "discarded" and d.val_bpb == pytest.approx(1.45)
    row = c.ledger.decision(two)
    assert a2.attempt_id not in row["attempt_ids"] and again.attempt_id in row["attempt_ids"]
    shas = {r[0] for r in c.ledger.all("SELECT text_sha FROM attempts WHERE candidate_id = ?",
                                       two)}
    assert len(shas) == 2
    assert c.ledger.head()["commit_sha"] == head1


def test_shown_worse_on_the_head_it_ran_on_is_discarded_though_the_head_moved(coord):
    """A merge queue rejects what fails on its own base: no rebase (this one would conflict),
    no second run."""
    c = coord
    one = c.submit(edit(BASE, LR=0.02), "lower LR")["candidate_id"]
    two = c.submit(edit(BASE, LR=0.08), "higher LR")["candidate_id"]
    a1, a2 = c.next_assignment("w1"), c.next_assignment("w2")
    base0 = c.ledger.head()["commit_sha"]
    c.record_result("w1", a1.attempt_id, ok(1.40))                   # #1 kept
    d = c.record_result("w2", a2.attempt_id, ok(1.60)).decisions[0]  # worse than #0's 1.50
    assert (d.candidate_id, d.verdict, d.head_bpb) == (two, "discarded", pytest.approx(1.50))
    assert f"against head #0 {base0[:10]} it was measured on" in d.reason
    assert c.next_assignment("w2") is None


# ---- same program, same result ---------------------------------------------------------------

def test_comment_only_or_reformatted_variant_is_the_same_program(coord):
    c = coord
    first = c.submit(edit(BASE, LR=0.02), "lower LR")
    run(c, "w1", 1.40, first["candidate_id"])
    cosmetic = edit(BASE, LR=0.02).replace("# layers", "# blocks").replace(
        "print(LR, DEPTH, WARMUP, BATCH)", "print(LR, DEPTH,\n          WARMUP, BATCH)  # all")
    dup = c.submit(cosmetic, "the same, tidied")
    assert dup["duplicate"] and dup["same_program_as"] == first["candidate_id"]
    assert dup["verdict"] == "kept" and dup["val_bpb"] == pytest.approx(1.40)
    assert format_submission(dup).startswith(
        f"already submitted as #{first['candidate_id']} (same program as "
        f"#{first['candidate_id']}): kept, val_bpb 1.4000")
    assert c.status()["queue"] == []
    real = c.submit(edit(BASE, LR=0.021), "a real change")
    assert not real["duplicate"] and real["state"] == "queued"


def test_the_heads_own_program_is_answered_as_the_head(coord):
    c = coord
    one = c.submit(edit(BASE, LR=0.02), "lower LR")["candidate_id"]
    two = c.submit(edit(BASE, WARMUP=30), "longer warmup")["candidate_id"]
    run(c, "w1", 1.40, one)
    run(c, "w1", 1.30, two)                          # kept as a rebased text
    text = head_text(c).replace("# steps", "# warmup steps")   # the head, re-commented
    dup = c.submit(text, "both, by hand")
    assert dup["duplicate"] and dup["same_program_as"] == two


# ---- kill -9 ------------------------------------------------------------------------------------

def test_crash_between_a_rebase_and_its_ref_is_repaired_on_start(coord, run_dir, monkeypatch):
    c = coord
    c.submit(edit(BASE, LR=0.02), "one")
    two = c.submit(edit(BASE, DEPTH=6), "two")["candidate_id"]
    run(c, "w1", 1.40)
    real = R.update_ref

    def dying(repo, ref, *args, **kw):
        if ref.startswith(R.REBASED_REFS):
            raise KeyboardInterrupt("killed after the ledger committed the rebase")
        return real(repo, ref, *args, **kw)

    monkeypatch.setattr("coordinator.core.update_ref", dying)
    with pytest.raises(KeyboardInterrupt):
        c.next_assignment("w1")
    monkeypatch.undo()
    row = c.ledger.candidate(two)
    assert row["text_onto"] == c.ledger.head()["commit_sha"]   # the ledger holds the rebase
    assert c.ledger.live_lease("w1") is not None
    c.close()
    with Coordinator(run_dir) as again:
        ref = R.rebased_ref(two, row["text_commit"])
        assert any(f.startswith(f"recreated {R.REBASED_REFS}") for f in again.fixed)
        assert git(run_dir, "rev-parse", ref) == row["text_commit"]


LOOP = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, sys.argv[3])
    from test_rebase_core import BASE, edit
    from test_core import ok
    from coordinator.core import Coordinator
    repo, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    c = Coordinator(repo)
    for w in ("w1", "w2", "w3"):
        c.worker_hello(w, w, {}, "Test/8GB/cpu", None)
    print("ready", flush=True)
    n = 0
    while True:   # variants from whatever head: some rebase cleanly, some conflict
        n += 1
        name = rng.choice(["LR", "DEPTH", "WARMUP", "BATCH"])
        base = rng.choice([None, None, "refs/autoresearch/candidates/0"])
        c.submit(edit(BASE, **{name: rng.randrange(10**9)}), f"{name} {seed}-{n}", base)
        for w in ("w1", "w2", "w3"):
            a = c.next_assignment(w)
            if a is not None and rng.random() < 0.7:
                c.record_result(w, a.attempt_id, ok(rng.uniform(1.0, 2.0)))
""")


@pytest.mark.slow
def test_kill_minus_nine_during_rebases_leaves_ledger_and_branch_consistent(run_dir, tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    rng = random.Random(10)
    here = os.path.dirname(os.path.abspath(__file__))
    for round_ in range(5):
        p = subprocess.Popen([sys.executable, str(script), str(run_dir), str(round_), here],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(rng.uniform(0.3, 1.0))
        assert p.poll() is None, p.stderr.read()
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        with reopen(run_dir) as c:
            check_invariants(c)
    with reopen(run_dir) as c:
        counts = c.status()["counts"]
        rebased = c.ledger.scalar("SELECT COUNT(*) FROM candidates WHERE text_commit != "
                                  "commit_sha")
        assert counts["kept"] > 0 and rebased > 0, counts   # the loop did rebase
        check_invariants(c)


# ---- a schema-3 run (before rebasing) is upgraded in place -------------------------------------

def test_a_schema_3_ledger_gains_programs_texts_and_the_stale_verdict(run_dir):
    import sqlite3

    from coordinator.ledger import SCHEMA_VERSION

    with Coordinator(run_dir) as c:
        c.worker_hello("w1", "W1", {}, HW, None)
        c.record_result("w1", c.next_assignment("w1").attempt_id, ok(1.5))
        old = c.submit(edit(BASE, LR=0.02), "before the upgrade")["candidate_id"]
    # Make it what schema 3 wrote: no text/program columns, no 'stale' in the CHECK.
    db = sqlite3.connect(run_dir / ".autoresearch" / "ledger.sqlite3")
    db.execute("DROP INDEX candidates_program")
    for table, column in (("candidates", "program_sha"), ("candidates", "text_commit"),
                          ("candidates", "text_onto"), ("candidates", "text_sha"),
                          ("attempts", "onto")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'decisions'").fetchone()[0]
    db.executescript(f"""
        {sql.replace("'failed', 'stale'", "'failed'").replace("decisions", "d2", 1)};
        INSERT INTO d2 SELECT * FROM decisions; DROP TABLE decisions;
        ALTER TABLE d2 RENAME TO decisions;
        UPDATE meta SET value = '3' WHERE key = 'schema_version';""")
    db.close()
    with Coordinator(run_dir) as c:
        assert c.ledger.get_meta("schema_version") == SCHEMA_VERSION == 4
        # programs were computed from the stored texts: the same program is answered
        tidy = edit(BASE, LR=0.02).replace("# learning rate", "# lr")
        assert c.submit(tidy, "same, tidied")["same_program_as"] == old
        # an old candidate (no text columns) runs its own text on its base, and can go stale
        c.worker_hello("w1", "W1", {}, HW, None)
        two = c.submit(edit(BASE, LR=0.08), "conflicts with the first")["candidate_id"]
        c.record_result("w1", c.next_assignment("w1").attempt_id, ok(1.4))   # old: kept
        assert c.next_assignment("w1") is None
        assert c.candidate(two)["state"] == "stale"


# ---- the same with real processes: a coordinator and a worker on loopback ----------------------

@pytest.mark.slow
def test_fleet_rebases_and_prints_the_stale_one(fleet, fleet_variant):
    """One worker, so the order is fixed: #1 kept; #2 (another BPB from the baseline) stale as
    the worker asks for work, printed by the coordinator; #3 (a knob, from the baseline) runs
    its change rebased onto #1: the train.py it ran holds both (so it reports #1's BPB, ties
    with the head and is discarded)."""
    from test_fleet import submit, wait_head_measured

    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    wait_head_measured(coord)
    one = submit(ep, fleet_variant(bpb=1.40), "lower bpb")["candidate_id"]
    two = submit(ep, fleet_variant(bpb=1.45), "also lower bpb")["candidate_id"]
    three = submit(ep, fleet_variant(knob=3), "knob 3")["candidate_id"]
    coord.wait_for(rf"KEEP #{one}\b")
    stale = coord.wait_for(rf"STALE #{two}\b.*").group(0)
    assert f"conflicts with #{one} (kept as " in stale and "resubmit on top of head" in stale
    coord.wait_for(rf"DISCARD #{three}\b.*1\.4000")
    coord.stop()
    with Coordinator(fleet.repo) as c:
        a = c.ledger.one("SELECT commit_sha, onto FROM attempts WHERE candidate_id = ?", three)
        ran = git(fleet.repo, "show", f"{a['commit_sha']}:train.py")
        assert a["onto"] == c.ledger.decision(one)["head_after"]
        assert "BPB = 1.4 " in ran and "KNOB_3 = 1" in ran
