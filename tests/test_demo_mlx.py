"""End to end with the real MLX trainer: `autoresearch-coord demo` on the embedded sample.

A coordinator and two workers run as real processes on loopback, every candidate is a real
train.py trained by MLX (tiny preset, a few seconds of budget), the ledger is real SQLite and the
branch a real git repo. The assertions tie the three together: every submission decided, the
crash classified with its error, and the branch holding exactly the ledger's keeps.
"""
from __future__ import annotations

import html
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.demo import variants

pytestmark = pytest.mark.slow


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, AUTORESEARCH_KEYS=str(root / "keys"), PYTHONUNBUFFERED="1")
    env.pop("AUTORESEARCH_COORD", None)
    proc = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "demo", "--dir", str(root / "work"),
         "--cache-dir", str(root / "cache"), "--budget", "4"],
        capture_output=True, text=True, env=env, timeout=900)
    return proc, root / "work" / "research"


def test_demo_exits_cleanly_and_narrates(demo_run):
    proc, _ = demo_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "KEEP #" in out or "DISCARD #" in out
    assert "FAIL #" in out and "Linaer" in out          # the typo variant, with its error
    assert "===== ledger =====" in out and "===== branch autoresearch/demo =====" in out


def test_every_submission_is_decided_with_real_measurements(demo_run):
    proc, repo = demo_run
    assert proc.returncode == 0
    db = sqlite3.connect(repo / ".autoresearch" / "ledger.sqlite3")
    cands = dict(db.execute("SELECT id, state FROM candidates ORDER BY id"))
    n = len(variants())
    assert sorted(cands) == list(range(n + 1))          # baseline #0 + every variant
    assert all(s in ("kept", "discarded", "failed") for s in cands.values()), cands
    descs = dict(db.execute("SELECT id, description FROM candidates"))
    typo = next(i for i, d in descs.items() if "Linaer" in d)
    assert cands[typo] == "failed"
    reason = db.execute("SELECT reason FROM decisions WHERE candidate_id = ?", (typo,)).fetchone()[0]
    assert "AttributeError" in reason
    # Every non-failed candidate (and the head on this class) has a finite MLX-measured val_bpb.
    for cid, state in cands.items():
        if state == "failed":
            continue
        rows = db.execute("SELECT val_bpb, summary FROM attempts WHERE candidate_id = ? AND "
                          "status = 'ok' AND state = 'done'", (cid,)).fetchall()
        assert rows, f"candidate {cid} has no ok attempt"
        assert all(math.isfinite(v) and 0 < v < 20 for v, _ in rows)
    # Exactly one decision per candidate: nothing counted twice.
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT candidate_id) FROM decisions").fetchone() == (n + 1, n + 1)


def test_branch_holds_exactly_the_ledger_keeps(demo_run):
    proc, repo = demo_run
    assert proc.returncode == 0
    db = sqlite3.connect(repo / ".autoresearch" / "ledger.sqlite3")
    kept = [r[0] for r in db.execute(
        "SELECT candidate_id FROM decisions WHERE verdict = 'kept' AND candidate_id > 0 ORDER BY id")]
    subjects = _git(repo, "log", "--format=%s", "autoresearch/demo").splitlines()
    assert len(subjects) == len(kept) + 1                # the baseline commit + one per keep
    assert [s.split(":")[0] for s in reversed(subjects[:-1])] == [f"keep #{c}" for c in kept]
    head = db.execute("SELECT commit_sha FROM head").fetchone()[0]
    assert _git(repo, "rev-parse", "autoresearch/demo").strip() == head
    # Every candidate, kept or not, stays reachable under refs/autoresearch/candidates/<id>.
    refs = _git(repo, "for-each-ref", "--format=%(refname)", "refs/autoresearch/candidates/")
    assert len(refs.split()) >= len(variants())
    tsv = (repo / "results.tsv").read_text().splitlines()
    # upstream's columns first, then how each number was measured (runs, sem, the head's, ...)
    assert tsv[0].split("\t")[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert len(tsv) == len(variants()) + 2


def test_report_of_the_real_mlx_night(demo_run, tmp_path):
    """`autoresearch-coord report` on the demo's stopped run: every keep named, plot embedded."""
    proc, repo = demo_run
    assert proc.returncode == 0
    r = subprocess.run([sys.executable, "-m", "coordinator.cli", "report", str(repo), "-o",
                        str(tmp_path), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in text
    db = sqlite3.connect(repo / ".autoresearch" / "ledger.sqlite3")
    for cid, desc in db.execute("SELECT d.candidate_id, c.description FROM decisions d JOIN "
                                "candidates c ON c.id = d.candidate_id WHERE d.verdict = 'kept' "
                                "AND d.candidate_id > 0"):
        assert f"#{cid}" in text and html.escape(desc) in text
    assert "Linaer" in text                               # the typo variant's failure reason
