"""Restarts and faults, as a person meets them (issue 9): what a start repairs is said in the
coordinator's own log, a SIGKILLed worker takes its trainer with it, an admin can retry a
failed candidate.

Real processes on loopback (the ``fleet`` fixture of test_fleet.py: keyed coordinator and
workers through their console entry points, stand-in train.py from conftest). Deadlines only
turn a hang into a failure; nothing asserts a time.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_fleet import Proc, fleet, git  # noqa: F401  (fleet is a fixture)

pytestmark = pytest.mark.slow


def test_start_logs_what_reconcile_fixed(fleet, fleet_variant):  # noqa: F811
    """Branch moved by hand, a candidate ref deleted, a stale git lock: each repair is a line
    of `start`'s output (the coordinator's log), not only a field of `status`."""
    from coordinator.core import Coordinator

    repo: Path = fleet.repo
    with Coordinator(repo) as core:
        cand = core.submit(fleet_variant(bpb=1.41), "to be displaced")
        branch = core.branch
    git(repo, "update-ref", f"refs/heads/{branch}", cand["commit"])      # moved by hand
    git(repo, "update-ref", "-d", f"refs/autoresearch/candidates/{cand['candidate_id']}")
    gitdir = Path(git(repo, "rev-parse", "--absolute-git-dir").strip())
    (gitdir / "index.lock").write_text("")                              # a killed git's lock

    coord, _ = fleet.started_coord()
    coord.wait_for(r"reconciled git with the ledger: removed stale git lock index\.lock")
    coord.wait_for(rf"reconciled git with the ledger: saved the displaced branch tip "
                   rf"{cand['commit'][:10]}")
    coord.wait_for(rf"reconciled git with the ledger: moved {branch} from {cand['commit'][:10]}")
    coord.wait_for(rf"reconciled git with the ledger: recreated refs/autoresearch/candidates/"
                   rf"{cand['candidate_id']}\b")
    assert git(repo, "rev-parse", f"refs/autoresearch/candidates/{cand['candidate_id']}").strip() \
        == cand["commit"]
    # A clean restart repairs nothing and says nothing about it.
    coord.stop()
    again, _ = fleet.started_coord()
    assert again.count(r"reconciled git with the ledger") == 0
