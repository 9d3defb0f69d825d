"""The sequential rule with the real MLX trainer: a loopback fleet (coordinator and two workers as
real processes) on the tiny preset with a 2 s budget. The variant changes nothing numerically
(one unused constant) and its screen is wide open (every first run is repeated): it gets its
repeat with the head's second seed, both sides' real runs pair by seed, it is decided once on
the two means, and is not kept.

The σ prior is wide (0.2) on purpose: on this shared 2-core machine the load of other processes
moves a 2 s run's val_bpb by up to ~0.15 between rounds (measured: head 2.91, 2.74 with both
workers busy; the same text 2.69, 2.66 a minute later), a drift no seed pairing removes. What
is tested here is the mechanics with real runs; the statistics are tests/test_rule.py's and
benchmarks/decisions.py's.
"""
from __future__ import annotations

import json
import math
import sqlite3

import pytest

from tests.test_fleet import fleet, git, submit  # noqa: F401 (fleet is a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet_repo(tmp_path):
    from coordinator.repo import init_repo

    repo = tmp_path / "research"
    init_repo(repo, tag="mlx", preset="tiny", time_budget=2, head_runs=2, max_repeats=2,
              screen=-100.0, confidence=0.999, noise_prior=0.2, remeasure_every=0,
              remeasure_seconds=0)
    return repo


def attempts_report(db, candidate_ids) -> str:
    """Every attempt of these candidates, oldest first, one line each."""
    lines = ["attempts:"]
    for r in db.execute(
            "SELECT * FROM attempts WHERE candidate_id IN (%s) ORDER BY leased_at"
            % ",".join("?" * len(candidate_ids)), tuple(candidate_ids)):
        summary = json.loads(r["summary"] or "null") or {}
        seed = (summary.get("settings") or {}).get("seed")
        lines.append(
            f"  #{r['candidate_id']} {r['purpose']} idx={r['seed_index']} seed={seed} "
            f"{r['state']}/{r['status']} flagged={r['flagged']!r} sha={(r['text_sha'] or '')[:8]}"
            f" {r['worker_id']} leased={r['leased_at']:.2f} finished={r['finished_at']} "
            f"bpb={r['val_bpb']} tok/s={r['tok_per_sec']} note={r['note']!r}")
    lines += [f"  decision {tuple(d)}" for d in db.execute(
        "SELECT candidate_id, verdict, n_candidate, n_head, reason FROM decisions")]
    return "\n".join(lines)


def test_real_runs_of_a_do_nothing_variant_pair_by_seed_and_are_not_kept(fleet):
    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    fleet.worker(ep, "w2")
    baseline = (fleet.repo / "train.py").read_text()
    same = submit(ep, "UNUSED_CONSTANT = 0  # changes nothing numerically\n" + baseline,
                  "an unused constant")
    cid = same["candidate_id"]
    coord.wait_for(rf"(KEEP|DISCARD|FAIL) #{cid}\b", timeout=600)
    before = git(fleet.repo, "rev-parse", "autoresearch/mlx").strip()

    db = sqlite3.connect(fleet.repo / ".autoresearch" / "ledger.sqlite3")
    db.row_factory = sqlite3.Row
    try:
        def runs(c):
            return sorted((r["seed_index"], json.loads(r["summary"])["settings"]["seed"],
                           r["val_bpb"]) for r in db.execute(
                "SELECT * FROM attempts WHERE candidate_id = ? AND state = 'done' AND "
                "status = 'ok' AND flagged IS NULL", (c,)))   # a slowed run is run again
        head, cand = runs(0), runs(cid)
        why = attempts_report(db, (0, cid))   # a failure explains itself
        # real MLX numbers, seeds 42 and 43 on both sides
        assert [(i, s) for i, s, _ in head] == [(0, 42), (1, 43)], why
        assert [(i, s) for i, s, _ in cand] == [(0, 42), (1, 43)], why
        assert all(math.isfinite(v) and 0 < v < 20 for *_, v in head + cand)
        d = db.execute("SELECT * FROM decisions WHERE candidate_id = ?", (cid,)).fetchall()
        assert len(d) == 1 and d[0]["verdict"] == "discarded", (d[0]["reason"], why)
        assert (d[0]["n_candidate"], d[0]["n_head"]) == (2, 2)
        assert d[0]["rule"].startswith("sequential/") and d[0]["confidence"] < 0.999
        assert d[0]["val_bpb"] == pytest.approx(sum(v for *_, v in cand) / 2)
        assert d[0]["head_bpb"] == pytest.approx(sum(v for *_, v in head) / 2)
        diffs = json.loads(d[0]["details"])["paired_differences"]
        assert diffs == pytest.approx([c[2] - h[2] for c, h in zip(cand, head)])
        # Under load a 2 s run can train >25% slower than the same text's runs before it: it
        # is flagged as slowed and run again at its seed index (coordinator.slowdown). So an
        # index may hold more than one ok attempt, but every extra one is flagged, was done
        # before its index's counted run was leased, and the decision used the counted ones.
        counted, extra = [], []
        for r in db.execute("SELECT * FROM attempts WHERE candidate_id IN (0, ?) AND "
                            "state = 'done' AND status = 'ok'", (cid,)):
            (extra if r["flagged"] else counted).append(r)
        assert sorted(json.loads(d[0]["attempt_ids"])) == \
            sorted(r["attempt_id"] for r in counted), why
        for r in extra:
            rerun = [x for x in counted if (x["candidate_id"], x["seed_index"]) ==
                     (r["candidate_id"], r["seed_index"])]
            assert len(rerun) == 1 and rerun[0]["leased_at"] >= r["finished_at"], why
    finally:
        db.close()
    assert git(fleet.repo, "rev-parse", "autoresearch/mlx").strip() == before
    assert "keep #" not in git(fleet.repo, "log", "--format=%s", "autoresearch/mlx")
