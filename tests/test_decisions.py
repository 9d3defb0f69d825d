"""The sequential decision engine inside the real Coordinator (real git, real SQLite ledger,
no sockets): head runs first, seeds paired by index, a screen, repeats in parallel on idle
workers of the candidate's class, keeps on the mean of several runs, re-measurement, drift, the
numbers every record carries, schema-1 ledgers, and a kill -9 in the middle of repeats."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from coordinator import repo as R
from coordinator import scheduling as S
from coordinator.core import Coordinator
from coordinator.ledger import MIGRATIONS, SCHEMA, SCHEMA_VERSION
from tests.test_core import A, B, BASE, git, reopen, variant

SEED = 42  # the tiny preset's seed setting: seed index i runs with seed 42 + i


def ok(bpb) -> dict:
    """An ok outcome with no memory figure (test_core's reports 3 GB; results.tsv rows here
    expect 0.0)."""
    return {"status": "ok", "val_bpb": bpb, "result": {"status": "ok", "val_bpb": bpb},
            "log_tail": "", "exit_code": 0, "wall_seconds": 1.0}


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    # σ prior 0.02, the default rule otherwise (3 head runs, screen 0.5σ, 4 repeats, 95 %)
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, noise_prior=0.02,
                remeasure_every=0, remeasure_seconds=0)
    return d


@pytest.fixture
def coord(run_dir):
    c = Coordinator(run_dir)
    yield c
    c.close()


def workers(c, *names, hw=A):
    for w in names:
        c.worker_hello(w, w.upper(), {}, hw, None)


def head_runs(c, values, hw=A, names=("w1", "w2", "w3")):
    """Measure the head on ``hw`` with these values (leased in parallel, then reported)."""
    leases = [c.next_assignment(w) for w in names[:len(values)]]
    assert [a.purpose for a in leases] == ["head"] * len(values), leases
    for w, a, v in zip(names, leases, values):
        assert c.record_result(w, a.attempt_id, ok(v)).accepted
    return leases


def test_head_runs_three_times_with_the_seed_sequence_before_anything_is_decided(coord):
    workers(coord, "w1", "w2", "w3", "w4")
    coord.submit(variant(1), "v1")
    leases = [coord.next_assignment(w) for w in ("w1", "w2", "w3", "w4")]
    # three head runs (seeds 42, 43, 44) at once, and the fourth worker screens the candidate
    assert [a.purpose for a in leases] == ["head", "head", "head", "candidate"]
    assert [a.settings["seed"] for a in leases] == [42, 43, 44, 42]
    ack = coord.record_result("w4", leases[3].attempt_id, ok(1.40))
    assert ack.decisions == [] and "waiting for the head's runs" in ack.note
    assert coord.candidate(1)["state"] == "measured"
    for w, a, v in zip(("w1", "w2"), leases, (1.50, 1.52)):
        assert coord.record_result(w, a.attempt_id, ok(v)).decisions == []
    assert coord.candidate(1)["state"] == "measured"        # 2 of 3 head runs: still waiting
    ack = coord.record_result("w3", leases[2].attempt_id, ok(1.48))
    # the head's third run decides nothing yet: 1.40 passed the screen, so repeats are wanted
    assert ack.decisions == [] and coord.candidate(1)["state"] == "repeating"
    rows = coord.ledger.all("SELECT seed_index, purpose FROM attempts ORDER BY leased_at")
    assert [(r[0], r[1]) for r in rows] == [(0, "head"), (1, "head"), (2, "head"),
                                            (0, "candidate")]


def test_a_do_nothing_variant_with_one_lucky_run_is_repeated_and_not_kept(coord, run_dir):
    workers(coord, "w1", "w2", "w3")
    head_runs(coord, [1.50, 1.52, 1.48])
    before = git(run_dir, "rev-parse", "autoresearch/t")
    coord.submit(variant(1), "changes nothing")
    a = coord.next_assignment("w1")
    assert (a.purpose, a.settings["seed"]) == ("candidate", 42)
    ack = coord.record_result("w1", a.attempt_id, ok(1.47))   # lucky: 1.5σ below the head
    assert ack.decisions == [] and coord.candidate(1)["state"] == "repeating"
    # the repeats it wants run in parallel on the idle workers of its class, seeds 43, 44, ...
    reps = [coord.next_assignment(w) for w in ("w1", "w2", "w3")]
    reps = [r for r in reps if r is not None]
    assert len(reps) >= 2 and all(r.candidate_id == 1 and r.purpose == "candidate"
                                  for r in reps)
    assert sorted(r.settings["seed"] for r in reps) == list(range(43, 43 + len(reps)))
    for w, r in zip(("w1", "w2", "w3"), reps):
        ack = coord.record_result(w, r.attempt_id, ok(1.50))   # its true value: the head's
    decisions = ack.decisions
    if not decisions:  # asked for one more round: it runs out of repeats at 4 without a keep
        while not decisions:
            r = coord.next_assignment("w1")
            decisions = coord.record_result("w1", r.attempt_id, ok(1.50)).decisions
    d = decisions[0]
    assert d.verdict == "discarded" and d.candidate_id == 1
    assert git(run_dir, "rev-parse", "autoresearch/t") == before
    row = coord.ledger.decision(1)
    assert row["n_head"] == 3 and row["n_candidate"] >= 3 and row["rule"] == "sequential/welch"
    assert row["confidence"] < 0.95 and row["sigma"] == pytest.approx(0.02)


def test_a_clear_winner_is_kept_on_the_mean_of_its_runs_which_become_the_heads(coord, run_dir):
    workers(coord, "w1", "w2", "w3")
    head_runs(coord, [1.50, 1.52, 1.48])
    coord.submit(variant(1), "much better")
    a = coord.next_assignment("w1")
    coord.record_result("w1", a.attempt_id, ok(1.40))
    r = coord.next_assignment("w2")
    assert r.candidate_id == 1 and r.settings["seed"] == 43
    ack = coord.record_result("w2", r.attempt_id, ok(1.42))
    assert [d.verdict for d in ack.decisions] == ["kept"]
    d = ack.decisions[0]
    assert d.val_bpb == pytest.approx(1.41) and d.head_bpb == pytest.approx(1.50)
    row = coord.ledger.decision(1)
    assert (row["n_candidate"], row["n_head"]) == (2, 3) and row["confidence"] >= 0.95
    details = json.loads(row["details"])
    assert details["paired_differences"] == pytest.approx([1.40 - 1.50, 1.42 - 1.52])
    msg = git(run_dir, "log", "-1", "--format=%B", "autoresearch/t")
    assert "1.5000 ± 0.0115 (3) -> 1.4100 ± 0.0141 (2)" in msg and "sequential/welch" in msg
    # the head's number on A is now the mean of the kept candidate's two runs; it needs one
    # more head run there (seed index 2) before the next candidate on A is decided
    st = coord.status()
    head = next(h for h in st["heads"] if h["hw_class"] == A)
    assert head["val_bpb"] == pytest.approx(1.41) and head["runs"] == 2
    assert head["text"] == "1.4100 ± 0.0141 (2)" and head["seeds"] == [0, 1]
    nxt = coord.next_assignment("w3")
    assert (nxt.purpose, nxt.candidate_id, nxt.settings["seed"]) == ("head", 1, 44)
    tsv = (run_dir / "results.tsv").read_text().splitlines()
    assert tsv[-1].split("\t")[1:6] == ["1.410000", "0.0", "keep", "much better", "2"]


def test_clearly_worse_costs_one_run(coord):
    workers(coord, "w1", "w2", "w3")
    head_runs(coord, [1.50, 1.52, 1.48])
    coord.submit(variant(1), "worse")
    a = coord.next_assignment("w1")
    ack = coord.record_result("w1", a.attempt_id, ok(1.56))
    assert [d.verdict for d in ack.decisions] == ["discarded"]
    assert "screened out" in ack.decisions[0].reason and A in ack.decisions[0].reason
    assert coord.ledger.decision(1)["rule"] == "sequential/screen"


def test_a_lost_repeat_is_run_again_with_its_seed_and_a_failed_one_fails_the_candidate(coord):
    workers(coord, "w1", "w2", "w3")
    head_runs(coord, [1.50, 1.52, 1.48])
    coord.submit(variant(1), "borderline")
    a = coord.next_assignment("w1")
    coord.record_result("w1", a.attempt_id, ok(1.47))
    r1, r2 = coord.next_assignment("w1"), coord.next_assignment("w2")
    assert {r1.settings["seed"], r2.settings["seed"]} == {43, 44}
    coord.worker_lost("w2", "silent")
    assert coord.candidate(1)["state"] == "running"           # r1 still runs
    r3 = coord.next_assignment("w3")                          # the lost one's seed, again
    assert (r3.candidate_id, r3.settings["seed"]) == (1, r2.settings["seed"])
    ack = coord.record_result("w1", r1.attempt_id, {"status": "nan", "note": "loss is nan"})
    assert [d.verdict for d in ack.decisions] == ["failed"]
    # its other repeat counts for nothing now: its late result is stale
    late = coord.record_result("w3", r3.attempt_id, ok(1.40))
    assert not late.accepted and "stale" in late.note
    assert coord.ledger.attempt(r3.attempt_id)["state"] == "stale"


def timed(bpb, tok_s) -> dict:
    """An ok result whose run trained at ``tok_s`` (coordinator.slowdown reads it)."""
    out = ok(bpb)
    out["result"].update(training_seconds=2.0, total_tokens_M=tok_s * 2.0 / 1e6)
    return out


def test_a_slowed_repeat_is_run_again_at_its_seed_index_and_counted_once(tmp_path):
    # tests/test_decisions_mlx.py's fleet without the noise: two head runs, every first run
    # repeated once. The repeat trains far slower than the candidate's first run (a loaded
    # machine): flagged, stored, and run again with the same seed index -- so the ledger
    # holds two ok runs at seed 43, of which exactly one counts, pairs and is decided on.
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, head_runs=2, max_repeats=2,
                screen=-100.0, confidence=0.999, noise_prior=0.2, remeasure_every=0,
                remeasure_seconds=0)
    c = Coordinator(d)
    try:
        workers(c, "w1", "w2")
        leases = [c.next_assignment(w) for w in ("w1", "w2")]
        assert [(a.purpose, a.settings["seed"]) for a in leases] == [("head", 42), ("head", 43)]
        for w, a, v in zip(("w1", "w2"), leases, (2.60, 2.62)):
            c.record_result(w, a.attempt_id, timed(v, 8000))
        cid = c.submit(variant(1), "changes nothing")["candidate_id"]
        first = c.next_assignment("w1")
        c.record_result("w1", first.attempt_id, timed(2.61, 8000))
        assert c.candidate(cid)["state"] == "repeating"
        slowed = c.next_assignment("w2")
        assert (slowed.candidate_id, slowed.settings["seed"]) == (cid, 43)
        assert c.next_assignment("w1") is None          # one repeat wanted, one running
        ack = c.record_result("w2", slowed.attempt_id, timed(2.70, 3000))
        assert ack.accepted and ack.decisions == [] and ack.note.startswith("slowed")
        assert c.candidate(cid)["state"] == "repeating"
        again = c.next_assignment("w1")                 # the slowed run's seed, again
        assert (again.candidate_id, again.settings["seed"]) == (cid, 43)
        assert c.next_assignment("w2") is None          # and only once
        ack = c.record_result("w1", again.attempt_id, timed(2.63, 8000))
        assert [x.verdict for x in ack.decisions] == ["discarded"]
        assert c.next_assignment("w2") is None and c.next_assignment("w1") is None
        rows = c.ledger.all("SELECT * FROM attempts WHERE candidate_id = ? ORDER BY leased_at",
                            cid)
        assert [(r["seed_index"], r["status"], bool(r["flagged"])) for r in rows] == \
            [(0, "ok", False), (1, "ok", True), (1, "ok", False)]
        row = c.ledger.decision(cid)
        assert (row["n_candidate"], row["n_head"]) == (2, 2)
        counted = [first.attempt_id, again.attempt_id] + [a.attempt_id for a in leases]
        assert sorted(json.loads(row["attempt_ids"])) == sorted(counted)
        assert row["val_bpb"] == pytest.approx((2.61 + 2.63) / 2)
        assert row["head_bpb"] == pytest.approx((2.60 + 2.62) / 2)
        assert json.loads(row["details"])["paired_differences"] == \
            pytest.approx([2.61 - 2.60, 2.63 - 2.62])
    finally:
        c.close()


def test_candidates_wait_for_repeats_on_their_own_class_only(coord):
    workers(coord, "w1", "w2", "w3")
    workers(coord, "b1", hw=B)
    head_runs(coord, [1.50, 1.52, 1.48])
    coord.submit(variant(1), "promising")
    coord.submit(variant(2), "next")
    a = coord.next_assignment("w1")
    coord.record_result("w1", a.attempt_id, ok(1.44))
    # a worker of class B measures B's head, then takes the NEXT candidate, never #1's repeats
    b = coord.next_assignment("b1")
    assert (b.purpose, b.candidate_id) == ("head", 0)
    coord.record_result("b1", b.attempt_id, ok(2.0))
    b = coord.next_assignment("b1")
    assert (b.purpose, b.candidate_id) == ("head", 0)         # B's head needs 3 runs too
    # an A worker gets #1's repeat before the new candidate
    r = coord.next_assignment("w2")
    assert (r.purpose, r.candidate_id) == ("candidate", 1)
    assert coord.ledger.candidate(1)["hw_class"] == A
    # while an A worker is alive, #1 waits for its repeats there
    coord.record_result("w2", r.attempt_id, ok(1.504))   # mean 1.472: not yet, within reach
    assert coord.candidate(1)["state"] == "repeating"
    for w in ("w1", "w2"):
        assert coord.worker_bye(w, "home time") == []
    assert coord.candidate(1)["state"] == "repeating"
    # the last A worker leaves: nothing could decide #1 there, so it goes back to the queue,
    # unbound, and is screened afresh on B; its A runs stay in the ledger, uncounted on B
    assert coord.worker_bye("w3", "home time") == [1]
    row = coord.ledger.candidate(1)
    assert (row["state"], row["hw_class"]) == ("queued", None)
    coord.record_result("b1", b.attempt_id, ok(2.02))          # B's second head run
    b = coord.next_assignment("b1")
    assert (b.purpose, b.candidate_id) == ("head", 0)          # and its third, first
    coord.record_result("b1", b.attempt_id, ok(2.01))
    b = coord.next_assignment("b1")
    assert (b.purpose, b.candidate_id, b.settings["seed"]) == ("candidate", 1, SEED)
    assert coord.ledger.candidate(1)["hw_class"] == B
    assert coord.record_result("b1", b.attempt_id, ok(2.10)).accepted   # worse on B: screened
    d = coord.ledger.decision(1)
    assert (d["verdict"], d["hw_class"], d["n_candidate"]) == ("discarded", B, 1)
    assert coord.ledger.scalar("SELECT COUNT(*) FROM attempts WHERE candidate_id = 1 AND "
                               "hw_class = ? AND state = 'done'", A) == 2


def test_candidates_waiting_on_a_class_where_the_head_cannot_be_measured_are_requeued(coord):
    workers(coord, "w1", "w2", "w3", "w4")
    workers(coord, "b1", hw=B)
    coord.submit(variant(1), "v1")
    heads = [coord.next_assignment(w) for w in ("w1", "w2", "w3")]
    assert [a.purpose for a in heads] == ["head"] * 3
    a = coord.next_assignment("w4")            # candidates run while the head is measured
    assert (a.purpose, a.candidate_id) == ("candidate", 1)
    coord.record_result("w4", a.attempt_id, ok(1.45))
    assert coord.candidate(1)["state"] == "measured"      # waits for the head's runs on A
    oom = {"status": "oom", "val_bpb": None, "log_tail": "out of memory", "exit_code": 137,
           "wall_seconds": 1.0}
    for w, h in zip(("w1", "w2"), heads[:2]):
        assert coord.record_result(w, h.attempt_id, oom).accepted
    assert coord.candidate(1)["state"] == "measured"      # a head run is still in flight
    ack = coord.record_result("w3", heads[2].attempt_id, oom)
    # the head cannot be measured on A any more: #1 could only wait there, so it is requeued,
    # unbound, and decided on another class; its run on A stays in the ledger
    assert "requeued #1" in ack.note, ack.note
    row = coord.ledger.candidate(1)
    assert (row["state"], row["hw_class"]) == ("queued", None)
    assert coord.next_assignment("w4") is None             # A runs nothing
    assert coord.next_assignment("b1").purpose == "head"   # B measures its head, then #1
    assert coord.ledger.scalar("SELECT COUNT(*) FROM attempts WHERE candidate_id = 1 AND "
                               "state = 'done'") == 1


def test_head_is_remeasured_every_n_decisions_and_drift_is_reported(tmp_path):
    d = tmp_path / "rm"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, noise_prior=0.02, remeasure_every=2,
                remeasure_seconds=0)
    with Coordinator(d) as c:
        workers(c, "w1", "w2", "w3")
        head_runs(c, [1.50, 1.52, 1.48])
        for n in (1, 2):
            c.submit(variant(n), f"worse {n}")
            a = c.next_assignment("w1")
            assert a.purpose == "candidate"
            assert c.record_result("w1", a.attempt_id, ok(1.60)).decisions
        c.submit(variant(3), "next")
        a = c.next_assignment("w1")            # two decisions since the head's last run
        assert (a.purpose, a.candidate_id, a.settings["seed"]) == ("head", 0, 45)
        ack = c.record_result("w1", a.attempt_id, ok(1.62))  # +6σ: the machine changed
        assert "head drift on" in ack.note
        st = c.status()
        head = next(h for h in st["heads"] if h["hw_class"] == A)
        assert head["runs"] == 4 and "+" in head["drift"]
        assert any("drifted" in p for p in st["problems"])
        assert "head drift" in c.log()["attempts"][0]["note"]
        assert c.next_assignment("w1").purpose == "candidate"   # not due again yet


def test_remeasure_on_the_clock(tmp_path):
    d = tmp_path / "clock"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, remeasure_every=0,
                remeasure_seconds=600)
    now = [1000.0]
    with Coordinator(d, clock=lambda: now[0]) as c:
        workers(c, "w1", "w2", "w3")
        head_runs(c, [1.50, 1.52, 1.48])
        c.submit(variant(1), "v")
        now[0] += 599
        assert c.next_assignment("w1").purpose == "candidate"
        now[0] += 2
        assert c.next_assignment("w2").purpose == "head"


def test_flagged_attempts_are_not_runs():
    rows = [{"attempt_id": "a", "purpose": "head", "state": "done", "status": "ok",
             "val_bpb": 1.5, "seed_index": 0, "finished_at": 1.0},
            {"attempt_id": "b", "purpose": "head", "state": "done", "status": "ok",
             "val_bpb": 1.9, "seed_index": 1, "finished_at": 2.0, "flagged": "swapping"}]
    assert [r.attempt_id for r in S.runs_of(rows)] == ["a"]
    assert S.head_on_class(rows).values == (1.5,)


def test_greedy_policy_is_the_single_run_rule(tmp_path):
    d = tmp_path / "g"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    with Coordinator(d) as c:
        workers(c, "w1")
        head_runs(c, [1.50])
        c.submit(variant(1), "a hair better")
        a = c.next_assignment("w1")
        ack = c.record_result("w1", a.attempt_id, ok(1.499))
        assert [x.verdict for x in ack.decisions] == ["kept"]
        assert c.ledger.decision(1)["rule"] == "greedy"
    assert "policy greedy" in (d / "program.md").read_text()


def test_program_md_prints_the_rule_and_its_settings(run_dir):
    text = (run_dir / "program.md").read_text()
    for needle in ("policy sequential", "run 3 times", "0.5 σ", "at most 4 runs", "95%"):
        assert needle in text, needle


def test_a_schema_1_ledger_is_upgraded_and_stays_on_single_runs(tmp_path):
    d = tmp_path / "old"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    # Make it a schema-1 run: its settings without the decision keys, its tables without the
    # columns schema 2 added.
    sd = d / ".autoresearch"
    settings = json.loads((sd / "run.json").read_text())
    for k in R.DECISION_DEFAULTS:
        settings["settings"].pop(k)
    (sd / "run.json").write_text(json.dumps(settings))
    (sd / "ledger.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        (sd / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    added = {(stmt.split()[2], stmt.split()[5])   # (table, column) of every later schema
             for version in sorted(MIGRATIONS) for stmt in MIGRATIONS[version]
             if isinstance(stmt, str) and stmt.startswith("ALTER TABLE") and " ADD " in stmt}
    lines, table = [], None
    for line in SCHEMA.splitlines():
        words = line.split()
        if line.startswith("CREATE TABLE"):
            table = words[5]
        indexed = line.startswith("CREATE INDEX") and any(
            f"({col})" in line for _, col in added)
        if not (words and (table, words[0]) in added) and not indexed:
            lines.append(line)
    v1 = "\n".join(lines).replace(",\n);", "\n);")
    db = sqlite3.connect(sd / "ledger.sqlite3")
    db.executescript(v1)
    meta = {"schema_version": 1, "settings": settings["settings"], "tag": "t",
            "branch": "autoresearch/t"}
    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
    head = git(d, "rev-parse", "autoresearch/t")
    db.execute("INSERT INTO candidates VALUES (0, 'baseline', 'x', ?, NULL, ?, 'kept', 0, 0)",
               (BASE, head))
    db.execute("INSERT INTO head VALUES (1, ?, 0, 0)", (head,))
    db.commit()
    db.close()
    with Coordinator(d) as c:
        assert c.ledger.get_meta("schema_version") == SCHEMA_VERSION
        assert c.decision["policy"] == "greedy" and c.decision["head_runs"] == 1
        workers(c, "w1")
        head_runs(c, [1.5])
        c.submit(variant(1), "v")
        a = c.next_assignment("w1")
        assert [x.verdict for x in c.record_result("w1", a.attempt_id, ok(1.4)).decisions] \
            == ["kept"]


# ---- kill -9 in the middle of a candidate's repeats --------------------------------------------

LOOP = textwrap.dedent("""
    import os, sys
    from coordinator.core import Coordinator
    repo = sys.argv[1]
    c = Coordinator(repo)
    for w in ("w1", "w2", "w3"):
        c.worker_hello(w, w, {}, "A", None)
    print("ready", flush=True)
    n = 0
    while True:   # a stream of candidates that all get repeats (first runs are lucky)
        n += 1
        for w in ("w1", "w2", "w3"):
            a = c.next_assignment(w)
            if a is None:
                lease = c.ledger.live_lease(w)
                if lease is None:
                    c.submit(f"X = '{os.getpid()}-{n}-{w}'\\n", f"variant {n} {w}")
                continue
            if a.purpose == "head":
                v = 1.50
            else:
                runs = c.ledger.scalar("SELECT COUNT(*) FROM attempts WHERE candidate_id = ? "
                                       "AND state = 'done'", a.candidate_id)
                v = 1.47 if runs == 0 else 1.50   # lucky once (1.5σ), then the head's value
            c.record_result(w, a.attempt_id, {"status": "ok", "val_bpb": v})
            c.record_result(w, a.attempt_id, {"status": "ok", "val_bpb": v})  # a resend
""")


@pytest.mark.slow
def test_kill_minus_nine_during_repeats_loses_no_run_and_decides_once(tmp_path):
    d = tmp_path / "k"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, noise_prior=0.02,
                remeasure_every=0, remeasure_seconds=0)
    script = tmp_path / "loop.py"
    script.write_text(LOOP)
    seen_done: dict[str, float] = {}
    for round_ in range(5):
        p = subprocess.Popen([sys.executable, str(script), str(d)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        time.sleep(0.4 + 0.25 * round_)
        assert p.poll() is None, p.stderr.read()
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        with reopen(d) as c:   # (a git child of the killed process may hold the lock briefly)
            L = c.ledger
            done = {r["attempt_id"]: r["val_bpb"] for r in L.all(
                "SELECT attempt_id, val_bpb FROM attempts WHERE state = 'done'")}
            # no counted run is ever lost or changed by a kill
            assert all(done.get(k) == v for k, v in seen_done.items())
            seen_done = done
            per = {r[0]: r[1] for r in L.all("SELECT candidate_id, COUNT(*) FROM decisions "
                                             "GROUP BY candidate_id")}
            assert set(per.values()) <= {1}                      # decided once
            for cand in L.all("SELECT * FROM candidates WHERE id > 0"):
                n_done = L.scalar("SELECT COUNT(*) FROM attempts WHERE candidate_id = ? AND "
                                  "state = 'done' AND purpose = 'candidate'", cand["id"])
                final = cand["state"] in ("kept", "discarded", "failed")
                assert final == (cand["id"] in per)
                if cand["state"] == "kept":
                    raise AssertionError(f"a do-nothing variant was kept: {dict(cand)}")
                if cand["id"] in per:
                    row = L.decision(cand["id"])
                    assert row["n_candidate"] in (None, n_done)  # every run it had counted
                # the seeds of its counted runs are 0..n-1, each once
                idx = sorted(r[0] for r in L.all(
                    "SELECT seed_index FROM attempts WHERE candidate_id = ? AND state = 'done'",
                    cand["id"]))
                assert idx == list(range(len(idx)))
            assert git(d, "rev-parse", "autoresearch/t") == L.head()["commit_sha"]
    assert len(seen_done) > 1
    with Coordinator(d) as c:
        repeated = c.ledger.scalar("SELECT COUNT(*) FROM decisions WHERE n_candidate >= 2")
        assert repeated >= 1, "no candidate got its repeats before the kills"


def test_the_benchmark_takes_rule_settings_and_refuses_bad_ones_in_one_line(tmp_path):
    """benchmarks/decisions.py --rule: a setting reaches the sequential night's run settings;
    an unknown key or an out-of-range value stops it before any night, naming the item."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "decisions.py")
    for bad, says in (("confdence=0.9", "expected KEY=VALUE"), ("confidence=1.5", "confidence"),
                      ("head_runs=x", "not a number"), ("head_runs=0", "head_runs")):
        p = subprocess.run([sys.executable, script, "--quick", "--rule", bad,
                            "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
        assert p.returncode == 2 and says in p.stderr, (bad, p.stderr)
        assert not (tmp_path / "x.json").exists()
    sys.path.insert(0, os.path.dirname(script))
    import decisions as D
    rule = D.parse_rule(("confidence=0.9", "max_repeats=6", "screen=0"))
    assert rule == {"confidence": 0.9, "max_repeats": 6, "screen": 0.0}
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **D.policy_settings("sequential", rule))
    got = R.decision_settings(R.load_run(d).settings)
    assert (got["policy"], got["confidence"], got["max_repeats"], got["screen"]) == \
        ("sequential", 0.9, 6, 0.0)
    assert D.policy_settings("greedy", rule) == R.SINGLE_RUN   # greedy stays the old rule


def test_the_benchmarks_paired_gap_and_its_stored_greedy_nights(tmp_path):
    """The figure that says which policy ends further down is the per-night difference (same
    ideas, same noise draws): its mean and se over nights; --against takes greedy's nights
    from an earlier JSON only when they ran with the same settings."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "decisions.py")
    sys.path.insert(0, os.path.dirname(script))
    import decisions as D
    nights = [{"policy": "greedy", "seed": 1, "head_true_sigma_mean": -40.0},
              {"policy": "greedy", "seed": 2, "head_true_sigma_mean": -30.0},
              {"policy": "sequential", "seed": 1, "head_true_sigma_mean": -42.0},
              {"policy": "sequential", "seed": 2, "head_true_sigma_mean": -34.0},
              {"policy": "sequential", "seed": 3, "head_true_sigma_mean": -99.0}]  # unpaired
    gap = D.paired_gap(nights, "sequential")
    assert (gap["mean"], gap["nights"], gap["better_nights"]) == (-3.0, 2, 2)
    assert abs(gap["se"] - 1.0) < 1e-12     # sd of (-2, -4) is √2, over √2 nights
    assert D.paired_gap(nights[:3], "sequential") is None   # one shared night says nothing
    stored = tmp_path / "greedy.json"
    stored.write_text(json.dumps({"runs": 450, "workers_per_class": 2, "queue": 2,
                                  "mix": {"helpful": 0.1}, "nights": nights[:2]}))
    assert D.load_against(stored, 450, 2, 2, 0.1) == nights[:2]
    out = tmp_path / "x.json"
    p = subprocess.run([sys.executable, script, "--quick", "--against", str(stored),
                        "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and "would not be paired" in p.stderr, p.stderr
    assert not out.exists()
    stored.write_text("{}")
    p = subprocess.run([sys.executable, script, "--against", str(stored), "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "not a JSON written by this script" in p.stderr, p.stderr
