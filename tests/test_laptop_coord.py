"""The laptop rules inside the real Coordinator (real git, real SQLite, no sockets): a run the
machine slowed is flagged, stored, not counted and run again, with the reason in the log; an
out-of-memory candidate is routed to a connected class with more memory and decided there, or
fails with that reason on the largest; status shows both."""
from __future__ import annotations

import re

import pytest

from coordinator import repo as R
from coordinator.cli import format_log, format_status
from coordinator.core import Coordinator

BASE = "LR = 0.01\nprint('baseline', LR)\n"
SMALL, BIG = "Test M1/8GB/metal", "Test M4 Max/64GB/metal"
GB = 2**30


def variant(n) -> str:
    return f"LR = {n}\nprint('variant', LR)\n"


def reading(swapouts=0, level="normal", thermal="nominal"):
    return {"power": {"source": "ac"}, "thermal": {"state": thermal},
            "memory": {"level": level, "swapins": 0, "swapouts": swapouts, "page_size": 16384}}


QUIET = {"start": reading(), "end": reading()}
SWAPPING = {"start": reading(), "end": reading(swapouts=40_000, level="critical")}


def ok(bpb, tok_s=20000.0, conditions=QUIET) -> dict:
    seconds = 15.0
    result = {"status": "ok", "val_bpb": bpb, "training_seconds": seconds,
              "total_tokens_M": tok_s * seconds / 1e6}
    return {"status": "ok", "val_bpb": bpb, "result": result, "log_tail": "", "exit_code": 0,
            "wall_seconds": 16.0, "note": "", "conditions": conditions}


def oom() -> dict:
    return {"status": "oom", "val_bpb": None, "result": {"status": "oom",
                                                         "error": "MemoryError: 256 MiB"},
            "log_tail": "MemoryError", "exit_code": 4, "wall_seconds": 1.0, "note": "",
            "conditions": QUIET}


@pytest.fixture
def coord(tmp_path):
    d = tmp_path / "run"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, **R.SINGLE_RUN)
    c = Coordinator(d)
    yield c
    c.close()


def join(c, name, hw, usable_gb):
    c.worker_hello(name, name, {"usable_memory_bytes": int(usable_gb * GB),
                                "memory_bytes": int(usable_gb * GB * 4 / 3)}, hw, None)


def run(c, worker, outcome):
    a = c.next_assignment(worker)
    assert a is not None, f"{worker} got no work"
    return a, c.record_result(worker, a.attempt_id, outcome)


# ---- slowed by the machine -----------------------------------------------------------------

def test_a_swapping_first_run_is_flagged_requeued_and_the_clean_rerun_decides(coord):
    join(coord, "w1", SMALL, 6)
    a, ack = run(coord, "w1", ok(1.50))
    assert a.purpose == "head" and ack.accepted
    cid = coord.submit(variant(1), "v1")["candidate_id"]
    a1, ack = run(coord, "w1", ok(1.40, tok_s=15000, conditions=SWAPPING))
    assert ack.accepted and ack.decisions == []
    assert ack.note.startswith("slowed by the machine, not counted, re-run: ")
    assert "memory pressure critical at end" in ack.note
    row = coord.ledger.attempt(a1.attempt_id)
    assert row["flagged"] == ack.note and row["state"] == "done" and row["status"] == "ok"
    assert row["tok_per_sec"] == pytest.approx(15000)
    assert coord.candidate(cid)["state"] == "queued"   # to be run again, from scratch
    # the re-run is clean: it alone decides
    a2, ack = run(coord, "w1", ok(1.40))
    assert a2.candidate_id == cid and a2.attempt_id != a1.attempt_id
    assert [d.verdict for d in ack.decisions] == ["kept"]
    assert coord.ledger.decision(cid)["attempt_ids"].count(a1.attempt_id) == 0
    # the log says why the first one did not count; status counts it
    text = format_log(coord.log())
    assert "done ok flagged" in text and "slowed by the machine" in text
    assert coord.status()["counts"]["flagged"] == 1


def test_a_slow_head_run_against_its_median_is_flagged_and_measured_again(tmp_path):
    d = tmp_path / "run3"
    R.init_repo(d, tag="t", preset="tiny", train_py=BASE, remeasure_every=0,
                remeasure_seconds=0)   # the default rule: three head runs per class
    c = Coordinator(d)
    try:
        for w in ("w1", "w2", "w3"):
            join(c, w, SMALL, 6)
        run(c, "w1", ok(1.50, tok_s=20000))
        run(c, "w2", ok(1.51, tok_s=21000))
        a, ack = run(c, "w3", ok(1.62, tok_s=9000))   # no evidence, but 56% below the median
        assert "9,000 tok/s is 56% below the median 20,500 tok/s" in ack.note
        assert c.ledger.attempt(a.attempt_id)["flagged"]
        again = c.next_assignment("w3")
        assert again.purpose == "head"        # the head still lacks its third counted run
    finally:
        c.close()


def test_a_machine_that_always_swaps_is_counted_after_max_flagged(coord):
    join(coord, "w1", SMALL, 6)
    run(coord, "w1", ok(1.50))
    cid = coord.submit(variant(2), "v2")["candidate_id"]
    for _ in range(2):
        _, ack = run(coord, "w1", ok(1.45, conditions=SWAPPING))
        assert ack.note.startswith("slowed by the machine")
    _, ack = run(coord, "w1", ok(1.45, conditions=SWAPPING))
    assert [d.verdict for d in ack.decisions] == ["kept"]
    rows = coord.ledger.all("SELECT flagged, note FROM attempts WHERE candidate_id = ? "
                            "ORDER BY leased_at", cid)
    assert [bool(r["flagged"]) for r in rows] == [True, True, False]
    assert "counted although slowed by the machine" in rows[2]["note"]


# ---- memory routing ------------------------------------------------------------------------

def measured_fleet(c):
    join(c, "small", SMALL, 6)
    join(c, "big", BIG, 48)
    for w in ("small", "big"):
        a, _ = run(c, w, ok(1.50))
        assert a.purpose == "head"


def test_oom_on_the_small_class_is_routed_to_the_big_one_and_decided_there(coord):
    measured_fleet(coord)
    cid = coord.submit(variant(3), "needs memory")["candidate_id"]
    a, ack = run(coord, "small", oom())
    assert a.candidate_id == cid and ack.accepted and ack.decisions == []
    assert ack.note == (f"out of memory on {SMALL} (6.0 GB usable): routed to classes with "
                        f"more than 6.0 GB (largest connected: {BIG}, 48.0 GB)")
    c = coord.ledger.candidate(cid)
    assert (c["state"], c["hw_class"], c["min_memory"]) == ("queued", None, 6 * GB)
    assert coord.next_assignment("small") is None     # it no longer fits there
    b, ack = run(coord, "big", ok(1.40))
    assert b.candidate_id == cid and [d.verdict for d in ack.decisions] == ["kept"]
    assert coord.ledger.decision(cid)["hw_class"] == BIG   # compared with the big class only
    status = coord.status()
    assert [(r["candidate_id"], r["from_class"], r["memory"]) for r in status["routed"]] == \
        [(cid, SMALL, 6 * GB)]
    assert {w["name"]: w["usable_memory"] for w in status["workers"]} == \
        {"small": 6 * GB, "big": 48 * GB}
    assert re.search(r"small +idle +Test M1/8GB/metal +6\.0 GB", format_status(status))
    assert (f"routed away for memory (out of memory on the class, requeued for more):\n"
            f"  {SMALL}: #{cid} (needs more than 6.0 GB, now kept)") in format_status(status)


def test_oom_on_the_largest_class_fails_with_that_reason(coord):
    measured_fleet(coord)
    cid = coord.submit(variant(4), "needs even more")["candidate_id"]
    run(coord, "small", oom())
    _, ack = run(coord, "big", oom())
    assert [d.verdict for d in ack.decisions] == ["failed"]
    reason = coord.ledger.decision(cid)["reason"]
    assert f"out of memory on {BIG} (48.0 GB usable), and no connected class has more " \
           f"than 48.0 GB" in reason


def test_oom_with_the_big_class_gone_fails(coord):
    measured_fleet(coord)
    coord.worker_bye("big", "lid closed")
    cid = coord.submit(variant(5), "needs memory, big one away")["candidate_id"]
    _, ack = run(coord, "small", oom())
    assert [d.verdict for d in ack.decisions] == ["failed"]
    assert "no connected class has more than 6.0 GB" in coord.ledger.decision(cid)["reason"]
