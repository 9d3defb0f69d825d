"""Restarts and faults, as a person meets them (issue 9): what a start repairs is said in the
coordinator's own log, a SIGKILLed worker takes its trainer with it, an admin can retry a
failed candidate.

Real processes on loopback (the ``fleet`` fixture of test_fleet.py: keyed coordinator and
workers through their console entry points, stand-in train.py from conftest). Deadlines only
turn a hang into a failure; nothing asserts a time.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
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


# ---- a SIGKILLed worker takes its trainer with it (issue 9, item 5) -------------------------

LONG_TRAIN_PY = '''"""Stand-in that trains 'forever': forks a helper into its own group, records both pids."""
import os
import time

child = os.fork()
if child == 0:
    while True:
        time.sleep(0.1)
with open("pids.txt.tmp", "w") as f:
    f.write(f"{os.getpid()} {child}\\n")
os.replace("pids.txt.tmp", "pids.txt")
while True:   # never writes a result: only a kill ends it
    time.sleep(0.1)
'''


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: PID 1 in a container may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                           text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def test_sigkilled_worker_takes_its_trainer_group_with_it(fleet):  # noqa: F811
    from test_fleet import submit, wait_file, wait_head_measured

    coord, ep = fleet.started_coord()
    worker = fleet.worker(ep, "w1")
    wait_head_measured(coord)
    cand = submit(ep, LONG_TRAIN_PY, "never finishes")["candidate_id"]
    attempt = coord.wait_for(rf"assign (\S+) candidate #{cand}\b").group(1)
    pids_file = wait_file(fleet.cache, f"runs/*/{attempt}/pids.txt")
    trainer, helper = (int(x) for x in pids_file.read_text().split())
    assert _alive(trainer) and _alive(helper)
    assert os.getpgid(helper) == os.getpgid(trainer) == trainer   # the trainer's own group

    worker.signal(signal.SIGKILL)
    worker.wait()
    deadline = time.monotonic() + 30.0    # only for a hang: the kill is prompt
    while (_alive(trainer) or _alive(helper)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(trainer), "the trainer outlived its SIGKILLed worker"
    assert not _alive(helper), "the trainer's group outlived its SIGKILLed worker"


# ---- retry, over the wire and the CLI (issue 9, item 5) -------------------------------------

def test_admin_retries_a_failed_candidate_which_then_runs_again(fleet, tmp_path):  # noqa: F811
    """A candidate that failed for a reason outside itself (here: a flag file standing in for a
    broken machine) is retried by the local admin, runs again and is kept; the retry and its
    reason are in `log`; a submitter key may not retry."""
    import json
    import re

    from shared.client import Client, ClientError
    from coordinator.trust import TrustStore
    from shared.keys import load_or_create_keypair
    from test_fleet import cli, submit, wait_head_measured

    flag = tmp_path / "machine-is-broken"
    flag.write_text("1")
    text = (f"import os, sys\nif os.path.exists({str(flag)!r}):\n"
            "    sys.exit('the machine is broken')\n"
            + (fleet.repo / "train.py").read_text().replace("BPB = 1.50", "BPB = 1.30"))
    coord, ep = fleet.started_coord()
    fleet.worker(ep, "w1")
    wait_head_measured(coord)
    cid = submit(ep, text, "good, on a bad day")["candidate_id"]
    coord.wait_for(rf"FAIL #{cid}\b")

    # Only admins retry: a submitter key is refused and nothing changes.
    sub = load_or_create_keypair(tmp_path / "subkeys", "client")
    with TrustStore.open(fleet.repo) as store:
        store.trust(sub.public, "a-submitter", "submitter")
    st = cli("status", "--json", "--connect", ep)
    assert st.returncode == 0, st
    server_key = json.loads(st.stdout)["server_key"]
    with Client(ep, server_key=server_key, keypair=sub, timeout=15) as c:
        with pytest.raises(ClientError, match="admin"):
            c.query("retry", candidate_id=cid, reason="sneaky")

    r = cli("retry", str(cid), "--connect", ep)
    assert r.returncode == 2 and "--reason" in r.stderr, r     # the reason is required
    r = cli("retry", "0", "--reason", "x", "--connect", ep)
    assert r.returncode == 2, r                                  # not a candidate id
    flag.unlink()   # the machine is fixed
    r = cli("retry", str(cid), "--reason", "the disk was full that night", "--connect", ep)
    assert r.returncode == 0 and re.search(rf"#{cid} queued again \(was failed: ", r.stdout), r
    coord.wait_for(rf"retry #{cid} by \S+: the disk was full that night")
    coord.wait_for(rf"KEEP #{cid}\b.*1\.3000")
    again = cli("retry", str(cid), "--reason", "twice", "--connect", ep)
    assert again.returncode == 1 and f"candidate #{cid} is kept" in again.stderr, again

    log = json.loads(cli("log", "--json", "-n", "50", "--connect", ep).stdout)
    retries = [e for e in log["entries"] if e["kind"] == "retry"]
    assert len(retries) == 1 and retries[0]["reason"] == "the disk was full that night"
    runs = [a for a in log["attempts"] if a["candidate_id"] == cid]
    assert sorted(a["status"] for a in runs) == ["crash", "ok"]   # both runs stay recorded
    assert "retried" in cli("log", "-n", "50", "--connect", ep).stdout
