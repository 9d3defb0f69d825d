"""``retry``: an admin sends a failed candidate back to the queue (issue 9, item 5).

The core on a real git repo and a real SQLite ledger, driven without sockets (as in
test_core.py); the wire and the CLI end to end are in test_restart_faults.py.
"""
from __future__ import annotations

import json

import pytest

from coordinator import repo as R
from coordinator.core import Coordinator, RetryRefused

BASE = "LR = 0.01\nprint('baseline', LR)\n"
HW = "cpu/x86_64/24GB"


def variant(n) -> str:
    return f"LR = {n}\nprint('variant', LR)\n"


def ok(bpb) -> dict:
    return {"status": "ok", "val_bpb": bpb, "result": {"status": "ok", "val_bpb": bpb},
            "log_tail": "", "exit_code": 0, "wall_seconds": 1.0}


@pytest.fixture
def coord(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    c = Coordinator(d)
    c.worker_hello("w1", "W1", {}, HW, None)
    a = c.next_assignment("w1")
    assert a.purpose == "head"
    c.record_result("w1", a.attempt_id, ok(1.5))
    yield c
    c.close()


def lose_three_times(c, cid):
    for _ in range(3):
        c.worker_hello("w1", "W1", {}, HW, None)
        a = c.next_assignment("w1")
        assert a.candidate_id == cid
        c.worker_lost("w1", "silent")
    assert c.candidate(cid)["state"] == "failed"


def test_retry_requeues_a_failed_candidate_and_keeps_the_record(coord):
    cid = coord.submit(variant(1), "fine, but its machine was flaky")["candidate_id"]
    lose_three_times(coord, cid)
    attempts_before = coord.ledger.scalar("SELECT COUNT(*) FROM attempts WHERE candidate_id = ?",
                                          cid)
    old = dict(coord.ledger.decision(cid))
    assert "lost 3 times" in old["reason"]

    out = coord.retry(cid, "the machine was being moved, not crashed", requested_by="ana")
    assert out["state"] == "queued" and out["retried_from"] == "failed"
    assert "lost 3 times" in out["previous_reason"]
    assert "verdict" not in out   # no longer answered with its old failure
    # The superseded decision moved into the retry row; no attempt was touched.
    row = coord.ledger.one("SELECT * FROM retries WHERE candidate_id = ?", cid)
    assert (row["reason"], row["requested_by"], row["from_state"]) == \
        ("the machine was being moved, not crashed", "ana", "failed")
    assert json.loads(row["decision"]) == old
    assert coord.ledger.decision(cid) is None
    assert coord.ledger.scalar("SELECT COUNT(*) FROM attempts WHERE candidate_id = ?",
                               cid) == attempts_before
    # The same text again is the queued candidate, not a duplicate of its earlier failure.
    dup = coord.submit(variant(1), "same text")
    assert dup["duplicate"] and dup["candidate_id"] == cid and dup["state"] == "queued"
    assert "verdict" not in dup
    # `log` shows the retry with its reason; results.tsv no longer lists the old failure.
    entry = next(e for e in coord.log()["entries"] if e["kind"] == "retry")
    assert entry["candidate_id"] == cid and "the machine was being moved" in entry["description"]
    assert "crash" not in (coord.repo_dir / "results.tsv").read_text()

    # Losses start counting anew: one more loss requeues, it does not fail it at once.
    coord.worker_hello("w1", "W1", {}, HW, None)
    a = coord.next_assignment("w1")
    assert a.candidate_id == cid
    assert coord.worker_lost("w1", "silent") == [cid]
    # And it can now be measured and decided like any candidate.
    coord.worker_hello("w1", "W1", {}, HW, None)
    a = coord.next_assignment("w1")
    ack = coord.record_result("w1", a.attempt_id, ok(1.4))
    assert [(d.candidate_id, d.verdict) for d in ack.decisions] == [(cid, "kept")]
    assert coord.ledger.scalar("SELECT COUNT(*) FROM decisions WHERE candidate_id = ?", cid) == 1


def test_retry_refusals_change_nothing(coord):
    kept = coord.submit(variant(2), "better")["candidate_id"]
    coord.worker_hello("w1", "W1", {}, HW, None)
    a = coord.next_assignment("w1")
    coord.record_result("w1", a.attempt_id, ok(1.4))
    queued = coord.submit(variant(3), "waiting")["candidate_id"]
    before = coord.ledger.all("SELECT id, state FROM candidates ORDER BY id")
    for cid, reason, words in ((kept, "again", "is kept: only failed"),
                               (queued, "again", "is queued: only failed"),
                               (0, "again", "baseline"), (999, "again", "no candidate #999"),
                               ("1", "again", "must be an integer"),
                               (kept, "  \n ", "say why")):
        with pytest.raises(RetryRefused, match=words):
            coord.retry(cid, reason)
    assert coord.ledger.all("SELECT id, state FROM candidates ORDER BY id") == before
    assert coord.ledger.scalar("SELECT COUNT(*) FROM retries") == 0


def test_an_older_ledger_gains_the_retries_table_on_open(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    import sqlite3
    path = d / ".autoresearch" / "ledger.sqlite3"
    db = sqlite3.connect(path)
    db.execute("DROP TABLE retries")
    db.commit()
    db.close()
    with Coordinator(d) as c:
        assert c.ledger.scalar("SELECT COUNT(*) FROM retries") == 0
