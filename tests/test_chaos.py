"""Chaos in the suite (issue 9): one coordinator and two keyed workers on loopback through the
real CLIs, random ``kill -9`` of all three during a stream of short legitimate runs, then the
run's invariants checked from the ledger and git (tests/chaos_fleet.py says which and how).

Seeded (AUTORESEARCH_CHAOS_SEED, default 9) and bounded: about 35 s of kills, then the queue
drains; a few minutes at most on 2 cores. benchmarks/chaos.py runs longer sessions for figures.
One session serves both tests below (module-scoped).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from chaos_fleet import ChaosConfig, Lab, Session, check

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, prepared_sample):
    root = tmp_path_factory.mktemp("chaos")
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_KEYS", str(root / "keys"))
    mp.setenv("AUTORESEARCH_DATA", str(prepared_sample))
    mp.delenv("AUTORESEARCH_SERVER_KEY", raising=False)
    try:
        cfg = ChaosConfig(seed=int(os.environ.get("AUTORESEARCH_CHAOS_SEED", "9")),
                          duration=35.0, settle=90.0)
        session = Session(Lab.make(root), cfg)
        report = session.run()
    finally:
        mp.undo()
    print(json.dumps(report.to_dict(), indent=1, sort_keys=True))
    report.session = session
    return report


def test_chaos_keeps_every_invariant(chaos):
    assert chaos.kills["total"] >= 5 and chaos.kills["coordinator"] >= 1, chaos.kills
    assert chaos.candidates["submitted"] >= 5, chaos.candidates
    assert chaos.violations == [], "\n".join(chaos.violations)
    assert chaos.settled


def test_chaos_records_no_spurious_strikes(chaos):
    """No lost lease is held against a worker process that was alive (never killed, or not
    yet killed when its lease was declared lost)."""
    assert chaos.spurious_strikes == [], json.dumps(chaos.spurious_strikes, indent=1)


def test_the_checker_sees_a_broken_run(chaos, tmp_path):
    """The invariants can fail: on a copy of the session's repo, move the branch back, drop a
    candidate ref, truncate results.tsv and forget a submission -- each is reported."""
    s = chaos.session
    repo = tmp_path / "research"
    shutil.copytree(s.lab.repo, repo, symlinks=True)
    assert check(repo, s.acked, s.tried, s.lives).violations == []
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout.strip()
    branch = git("symbolic-ref", "--short", "HEAD")
    # A candidate's own commit is never a keep commit (a keep is a new commit on the head).
    git("update-ref", f"refs/heads/{branch}", git("rev-parse", "refs/autoresearch/candidates/1"))
    git("update-ref", "-d", "refs/autoresearch/candidates/1")
    tsv = repo / "results.tsv"
    tsv.write_text("".join(tsv.read_text().splitlines(keepends=True)[:-1]))
    acked = dict(s.acked, **{"0" * 64: 999})
    found = "\n".join(check(repo, acked, s.tried, s.lives).violations)
    for words in ("is not the ledger's head", "refs/autoresearch/candidates/1 is not",
                  "results.tsv rows", "acknowledged as #999"):
        assert words in found, found
