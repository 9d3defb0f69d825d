"""coordinator.scheduling (pure: rows in, a choice out) and coordinator.reports on a stopped run.

The policy is tested on hand-written rows, then once through the real Coordinator to show the
core applies exactly what it chose; the reports are read from a ledger no coordinator holds.
"""
from __future__ import annotations

import pytest

from coordinator import reports
from coordinator import repo as R
from coordinator import scheduling as S
from coordinator.core import Coordinator
from coordinator.ledger import Ledger, ledger_path


def row(state, status=None, purpose="head", bpb=None, aid="a"):
    return {"attempt_id": aid, "purpose": purpose, "state": state, "status": status,
            "val_bpb": bpb}


HEAD_CASES = [
    # (rows of the head on one class, values, live, failed, state)
    ([], (), 0, 0, S.UNMEASURED),
    ([row("done", "ok", bpb=1.5, aid="h1")], (1.5,), 0, 0, S.MEASURED),
    ([row("leased")], (), 1, 0, S.MEASURING),
    ([row("done", "crash")], (), 0, 1, S.UNMEASURED),
    ([row("done", "crash"), row("done", "timeout")], (), 0, 2, S.BLOCKED),
    ([row("done", "crash"), row("done", "oom"), row("leased")], (), 1, 2, S.MEASURING),
    # the kept candidate's own run is the head's number; its failures are not head failures
    ([row("done", "ok", "candidate", 1.4, "c1")], (1.4,), 0, 0, S.MEASURED),
    ([row("leased", purpose="candidate"), row("done", "crash", "candidate")], (), 0, 0,
     S.UNMEASURED),
    # lost / cancelled / stale leases count for nothing
    ([row("lost"), row("cancelled"), row("stale", "ok", bpb=1.2)], (), 0, 0, S.UNMEASURED),
    ([row("done", "ok", bpb=1.5, aid="h1"), row("done", "ok", bpb=1.7, aid="h2"),
      row("done", "crash")], (1.5, 1.7), 0, 1, S.MEASURED),
]


@pytest.mark.parametrize("rows, values, live, failed, state", HEAD_CASES)
def test_head_on_class(rows, values, live, failed, state):
    h = S.head_on_class(rows)
    assert (h.values, h.live, h.failed, h.state) == (values, live, failed, state)
    assert len(h.attempt_ids) == len(h.values)


CHOOSE_CASES = [
    # (head on the class, queued ids, choice)
    (S.HeadOnClass(), [3, 4], S.Choice("head", 0)),
    (S.HeadOnClass(), [], S.Choice("head", 0)),
    (S.HeadOnClass(values=(1.5,), attempt_ids=("h",)), [3, 4], S.Choice("candidate", 3)),
    (S.HeadOnClass(values=(1.5,), attempt_ids=("h",)), [], None),
    # someone else is measuring the head here: candidates still run, and wait for its number
    (S.HeadOnClass(live=1), [7], S.Choice("candidate", 7)),
    (S.HeadOnClass(live=1), [], None),
    (S.HeadOnClass(failed=1), [7], S.Choice("head", 0)),
    # the head cannot be measured here: a candidate run here could never be compared
    (S.HeadOnClass(failed=S.HEAD_FAILURES_LIMIT), [7], None),
]


@pytest.mark.parametrize("head, queued, choice", CHOOSE_CASES)
def test_choose(head, queued, choice):
    assert S.choose(0, head, queued) == choice


@pytest.mark.parametrize("live, head, can", [
    (2, S.HeadOnClass(values=(1.5,), attempt_ids=("h",)), True),
    (1, S.HeadOnClass(), True),                         # unmeasured yet: it will be
    (1, S.HeadOnClass(failed=1), True),                 # one failure: it is tried again
    (0, S.HeadOnClass(values=(1.5,), attempt_ids=("h",)), False),   # nobody left to run it
    (3, S.HeadOnClass(failed=S.HEAD_FAILURES_LIMIT), False),        # the head fails here
    (3, S.HeadOnClass(values=(1.5,), attempt_ids=("h",), failed=S.HEAD_FAILURES_LIMIT), True),
])
def test_a_class_can_decide_with_a_live_worker_and_a_head_it_can_measure(live, head, can):
    assert S.class_can_decide(live, head) is can


def test_choose_names_the_current_head():
    assert S.choose(5, S.HeadOnClass(), [6]) == S.Choice("head", 5)


# ---- the core applies the choice; the reports read a stopped run ---------------------------

BASE = "LR = 0.01\n"
HW = "Test/8GB/cpu"


def ok(bpb):
    return {"status": "ok", "val_bpb": bpb, "result": {"peak_vram_mb": 2048.0},
            "log_tail": "", "exit_code": 0, "wall_seconds": 1.0}


def test_core_leases_what_scheduling_chose_and_reports_read_the_stopped_run(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    with Coordinator(d) as c:
        c.worker_hello("w1", "W1", {}, HW, None)
        c.worker_hello("w2", "W2", {}, HW, None)
        first = c.submit("LR = 0.02\n", "first")["candidate_id"]
        c.submit("LR = 0.03\n", "second")
        head = c.next_assignment("w1")
        assert (head.purpose, head.candidate_id) == ("head", 0)
        # w2 while the head is being measured: the oldest queued candidate
        cand = c.next_assignment("w2")
        assert (cand.purpose, cand.candidate_id) == ("candidate", first)
        assert c.next_assignment("w2") is None          # one lease per worker
        assert c.record_result("w1", head.attempt_id, ok(1.5)).accepted
        assert c.record_result("w2", cand.attempt_id,
                               {"status": "timeout", "note": "no result within 3s"}).accepted
        live = c.status(), c.log(), c.export_tsv()
    # No coordinator now (its lock is free): the reports read the ledger as it was left.
    L = Ledger(ledger_path(d / ".autoresearch"))
    try:
        st = reports.status(L, d)
        assert [{k: h[k] for k in ("hw_class", "val_bpb", "runs", "failed_runs", "state",
                                   "commit", "text", "sigma_source")} for h in st["heads"]] == \
            [{"hw_class": HW, "val_bpb": 1.5, "runs": 1, "failed_runs": 0, "state": "measured",
              "commit": st["head"], "text": "1.5000 ± 0.0300 (1)", "sigma_source": "prior"}]
        assert st["counts"]["failed"] == 1 and st["counts"]["queued"] == 1
        assert [w["state"] for w in st["workers"]] == ["idle", "idle"]
        assert {k: v for k, v in st.items() if k != "reconciled"} == \
            {k: v for k, v in live[0].items() if k != "reconciled"}
        log = reports.log(L)
        assert log == live[1]
        failed = next(a for a in log["attempts"] if a["candidate_id"] == first)
        assert failed["status"] == "timeout" and failed["note"] == "no result within 3s"
        decision = next(x for x in log["decisions"] if x["candidate_id"] == first)
        assert decision["reason"] == f"timeout on {HW}: no result within 3s"
        assert reports.export_tsv(L) == live[2]
        assert reports.export_tsv(L).splitlines()[-1].split("\t")[3:5] == ["crash", "first"]
    finally:
        L.close()
    with Coordinator(d) as again:   # nothing the reports did stops a coordinator starting
        assert again.candidate(first)["state"] == "failed"
