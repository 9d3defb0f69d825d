"""The worker's state machine: the table, its printout, and a real agent walking it.

The agent test runs a real ``Agent`` against a real ``Server`` + ``Coordinator`` on loopback; its
trainer start is replaced by one that reports low disk (the only stand-in), so the walk is
connecting -> idle -> reporting (the head run refused, cancelled) -> holding -> stopped.
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time

import pytest

from serving import served
from worker import states as ws

LEGAL = {(s, t) for s, ts in ws.TRANSITIONS.items() for t in ts}


@pytest.mark.parametrize("old,new", list(itertools.product(ws.STATES, repeat=2)))
def test_only_listed_transitions_are_allowed(old, new):
    if (old, new) in LEGAL or old == new:   # staying in a state is no move
        assert ws.check(old, new) == new
    else:
        with pytest.raises(ws.IllegalTransition, match=f"{old} -> {new} is not allowed"):
            ws.check(old, new)


def test_the_shape_of_the_machine():
    assert not ws.TRANSITIONS[ws.STOPPED]
    assert all(ws.STOPPED in ws.TRANSITIONS[s] for s in ws.STATES if s != ws.STOPPED)
    # a running trainer outlives the link: only its result (or leaving) ends it
    assert ws.TRANSITIONS[ws.RUNNING] == {ws.REPORTING, ws.STOPPED}
    # a worker that cannot run (harness differs, no dataset) never starts a trainer
    assert ws.RUNNING not in ws.TRANSITIONS[ws.BLOCKED] | ws.TRANSITIONS[ws.FETCHING]
    with pytest.raises(ws.IllegalTransition, match="unknown state 'asleep'"):
        ws.check(ws.IDLE, "asleep")


def test_python_m_worker_states_prints_every_transition():
    out = subprocess.run([sys.executable, "-m", "worker.states"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    lines = [line.split() for line in out.splitlines()]
    for old, new in LEGAL:
        assert [old, "->", new] in lines, (old, new)
    assert ["stopped", "(final)"] in lines
    assert out.startswith("worker states:")


def test_a_real_agent_walks_the_table(fleet_repo, tmp_path):
    from worker.agent import EXIT_OK, Agent, AgentConfig
    from worker.runner import LowDiskSpace

    class Recording(Agent):
        def _to(self, new: str) -> None:
            super()._to(new)
            if not walked or walked[-1] != new:
                walked.append(new)

    def start(spec, run_root, env):
        raise LowDiskSpace("only 1 MiB free: free some disk space")

    walked: list[str] = []
    codes: list[int] = []
    with served(fleet_repo, heartbeat_interval=0.1, liveness=5,
                event=lambda line: None) as (core, server):
        agent = Recording(AgentConfig(server.endpoint, "walk", tmp_path / "c",
                                      heartbeat_interval=0.1, ready_resend=0.2),
                          {"hw_class": "Test/8GB/cpu"}, event=lambda line: None,
                          start_attempt=start, run_root=tmp_path / "runs", env={})
        at = threading.Thread(target=lambda: codes.append(agent.run()), daemon=True)
        at.start()
        end = time.monotonic() + 30
        while time.monotonic() < end and ws.HOLDING not in walked:
            time.sleep(0.05)
        assert agent.state == ws.HOLDING and agent.hold_until > agent.clock()
        agent.interrupts = 1   # Ctrl-C once, holding nothing: leave now
        at.join(20)
        if at.is_alive():
            agent.interrupts = 2
            at.join(20)
    assert walked == [ws.IDLE, ws.REPORTING, ws.HOLDING, ws.STOPPED]
    assert codes == [EXIT_OK]
