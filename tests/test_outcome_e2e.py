"""The worker's classification note, end to end: real worker -> real coordinator -> ledger -> log.

A real ``worker.agent.Agent`` runs real trainer subprocesses (``worker.runner``) for a real
``Coordinator`` behind a real ``Server`` on loopback (plain TCP, as ``--insecure``). Three
stand-in train.py files die in the three ways only the worker can name: the hard timeout, an
out-of-memory SIGKILL (the OS's OOM killer leaves no result file, only the log), and the log
limit. Each one's note must be in ``attempts.note``, lead its failure decision's reason, and be
printed by ``autoresearch-coord log``.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time

import pytest

from coordinator.core import Coordinator
from coordinator.repo import SINGLE_RUN, init_repo
from coordinator.server import Server
from worker.agent import Agent, AgentConfig
from worker.runner import AttemptProcess

pytestmark = pytest.mark.slow

DEADLINE = 60.0      # only turns a hang into a failure
LOG_LIMIT = 64 * 1024
TIMEOUT = 3.0        # the run's hard timeout (time budget 1 s)

TIMEOUT_PY = "import time\ntime.sleep(120)\n"
OOM_PY = ("import os, signal\n"
          "print('[malloc] Unable to allocate 68719476736 bytes', flush=True)\n"
          "os.kill(os.getpid(), signal.SIGKILL)\n")
CHATTY_PY = "while True:\n    print('x' * 1000)\n"


@pytest.fixture
def lab(tmp_path, fleet_train_py):
    repo = tmp_path / "research"
    init_repo(repo, tag="notes", preset="tiny", train_py=fleet_train_py, time_budget=1,
              timeout=TIMEOUT, **SINGLE_RUN)
    core = Coordinator(repo)
    events: list[str] = []
    server = Server(core, bind="tcp://127.0.0.1:*", heartbeat_interval=0.2, liveness=10,
                    event=events.append)
    st = threading.Thread(target=server.run, daemon=True)
    st.start()
    agent = Agent(AgentConfig(server.endpoint, "notes", tmp_path / "cache", heartbeat_interval=0.2,
                              liveness=10, ready_resend=0.2),
                  {"hw_class": "Test/8GB/cpu"}, event=lambda line: None,
                  start_attempt=functools.partial(AttemptProcess.start, log_limit=LOG_LIMIT,
                                                  kill_grace=1.0, min_free_bytes=0),
                  run_root=tmp_path / "runs", env=dict(os.environ))
    at = threading.Thread(target=agent.run, daemon=True)
    at.start()
    yield core, server
    agent.interrupts = 2
    at.join(DEADLINE)
    server.stop()
    st.join(DEADLINE)
    server.close()
    core.close()


def wait_decided(core: Coordinator, cids: list[int]) -> None:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if all(core.candidate(c)["state"] == "failed" for c in cids):
            return
        time.sleep(0.1)
    raise AssertionError({c: core.candidate(c) for c in cids})


def test_timeout_oom_and_log_limit_notes_reach_the_ledger_and_the_log(lab):
    core, server = lab
    cases = {
        "sleeps past the timeout": ("timeout", TIMEOUT_PY, f"no result within {TIMEOUT:g}s"),
        "dies of out-of-memory": ("oom", OOM_PY,
                                  "killed by SIGKILL; the log mentions running out of memory"),
        "prints without end": ("crash", CHATTY_PY, f"log limit exceeded ({LOG_LIMIT} bytes)"),
    }
    cids = {desc: core.submit(text, desc)["candidate_id"] for desc, (_, text, _) in cases.items()}
    wait_decided(core, list(cids.values()))

    for desc, (status, _, note) in cases.items():
        row = core.ledger.one("SELECT status, note FROM attempts WHERE candidate_id = ? "
                              "AND state = 'done'", cids[desc])
        assert (row["status"], row["note"]) == (status, note), desc
        reason = core.ledger.decision(cids[desc])["reason"]
        assert reason.startswith(f"{status} on Test/8GB/cpu") and f": {note}" in reason, reason

    out = subprocess.run([sys.executable, "-m", "coordinator.cli", "log", "--connect",
                          server.endpoint, "--insecure", "-n", "50"],
                         capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    for desc, (status, _, note) in cases.items():
        line = next(ln for ln in out.stdout.splitlines()
                    if f"#{cids[desc]} " in ln and "done" in ln)
        assert status in line and note in line, out.stdout
