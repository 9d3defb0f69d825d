"""The sequential rule on a real loopback fleet: coordinator and two workers as real processes
(the console entry points, keys on), the stand-in train.py of conftest, the default rule.

A variant that changes nothing except one lucky run (at seed 42 it reports 1.47, at every other
seed the head's 1.50) is what the single-run rule keeps; here it gets its repeats, in parallel on
both workers, with the seeds the head's runs had, and is discarded. A clearly better variant is
kept on the mean of its runs, and that mean is the head's number afterwards.
"""
from __future__ import annotations

import json
import sqlite3

import pytest

from tests.test_fleet import cli, fleet, submit  # noqa: F401 (fleet is a fixture)

pytestmark = pytest.mark.slow

LUCKY_ONCE = 'BPB = 1.47 if os.environ.get("AUTORESEARCH_SEED") == "42" else 1.50'


@pytest.fixture
def fleet_repo(tmp_path, fleet_train_py):
    """The research repo with the DEFAULT decision settings (sequential), σ prior 0.02."""
    from coordinator.repo import init_repo

    repo = tmp_path / "research"
    init_repo(repo, tag="seq", preset="tiny", train_py=fleet_train_py, noise_prior=0.02)
    return repo


def test_a_lucky_do_nothing_variant_is_repeated_and_discarded(fleet, fleet_variant):
    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    fleet.worker(ep, "w2")
    lines = fleet_variant(bpb=1.50).splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.startswith("BPB = ")]
    assert len(at) == 1
    lines[at[0]] = LUCKY_ONCE + "\n"
    lucky = submit(ep, "".join(lines), "changes nothing")
    coord.wait_for(rf"DISCARD #{lucky['candidate_id']}\b.*\(3\) vs head 1\.5000 ± \S+ \(3\)")
    # (submitted after that decision: a keep meanwhile would change the head it is judged by)
    better = submit(ep, fleet_variant(bpb=1.40), "clearly better")
    coord.wait_for(rf"KEEP #{better['candidate_id']}\b.*1\.4000 ± \S+ \(2\)")

    db = sqlite3.connect(fleet.repo / ".autoresearch" / "ledger.sqlite3")
    db.row_factory = sqlite3.Row
    seeds = lambda cid: sorted(  # noqa: E731
        (r["seed_index"], json.loads(r["summary"] or "{}").get("settings", {}).get("seed"),
         r["val_bpb"]) for r in db.execute(
            "SELECT * FROM attempts WHERE candidate_id = ? AND state = 'done' AND "
            "flagged IS NULL", (cid,)))
    # the head's three runs and the lucky variant's three runs pair up by seed index
    assert [s[0] for s in seeds(0)] == [0, 1, 2]
    assert seeds(lucky["candidate_id"]) == [(0, 42, 1.47), (1, 43, 1.50), (2, 44, 1.50)]
    d = db.execute("SELECT * FROM decisions WHERE candidate_id = ?",
                   (lucky["candidate_id"],)).fetchone()
    assert d["verdict"] == "discarded" and (d["n_candidate"], d["n_head"]) == (3, 3)
    assert d["val_bpb"] == pytest.approx(1.49) and d["confidence"] < 0.95
    assert json.loads(d["details"])["paired_differences"] == pytest.approx([-0.03, 0.0, 0.0])
    # its repeats ran at the same time on the two workers
    reps = db.execute("SELECT worker_id, leased_at, finished_at FROM attempts WHERE "
                      "candidate_id = ? AND seed_index > 0", (lucky["candidate_id"],)).fetchall()
    assert len({r["worker_id"] for r in reps}) == 2
    assert max(r["leased_at"] for r in reps) < min(r["finished_at"] for r in reps)
    kept = db.execute("SELECT * FROM decisions WHERE candidate_id = ?",
                      (better["candidate_id"],)).fetchone()
    assert kept["verdict"] == "kept" and kept["n_candidate"] == 2
    db.close()
    # the head's number on the class is now the mean of the kept runs, shown mean ± sem (n)
    st = json.loads(cli("status", "--json", "--connect", ep).stdout)
    head = st["heads"][0]
    assert head["val_bpb"] == pytest.approx(1.40) and head["runs"] >= 2
    assert st["settings"]["policy"] == "sequential"
    text = cli("status", "--connect", ep).stdout
    assert "1.4000 ± " in text and "σ" in text
    log = cli("log", "--connect", ep, "-n", "50").stdout
    assert "1.4900 ± 0.0115 (3)" in log
