"""A real Agent against a real Coordinator + Server on loopback, with the machine's conditions
fed in (power, idle): it takes no work on battery, resumes on AC, finishes a run that started
before it was unplugged, keeps the machine awake for exactly the trainer's lifetime (a stand-in
`caffeinate` on PATH), and reports the conditions at the start and end of the run."""
from __future__ import annotations

import json
import os
import stat
import threading
import time

import pytest

from serving import served
from worker import states as ws


def wait_for(pred, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Machine:
    """Conditions a test can change while the agent runs (thread-safe enough: one writer)."""

    def __init__(self, source="battery", idle=None):
        self.source, self.idle, self.reads = source, idle, 0

    def __call__(self, with_idle=False):
        self.reads += 1
        return {"power": {"source": self.source, "has_battery": True, "battery_percent": 80,
                          "battery_state": "discharging" if self.source == "battery"
                          else "charging"},
                "thermal": {"state": "nominal"},
                "memory": {"level": "normal", "swapins": 10, "swapouts": 20 + self.reads,
                           "page_size": 16384},
                "idle_seconds": self.idle}


@pytest.fixture
def slow_repo(tmp_path, fleet_variant):
    from coordinator.repo import init_repo

    repo = tmp_path / "research"
    init_repo(repo, tag="laptop", preset="tiny", train_py=fleet_variant(bpb=1.5, sleep=1.5))
    return repo


def stop_agent(agent, thread):
    agent.interrupts = 2
    thread.join(30)
    assert not thread.is_alive()


def worker_row(core):
    return next(w for w in core.status()["workers"] if w["name"] == "mbp")


def attempts(core):
    return core.ledger.all("SELECT * FROM attempts ORDER BY rowid")


def test_battery_pauses_ac_resumes_and_a_started_run_finishes(slow_repo, tmp_path,
                                                              monkeypatch):
    # a stand-in caffeinate that records its argv and waits for -w PID, like the real one
    log = tmp_path / "caffeinate.log"
    fake = tmp_path / "bin" / "caffeinate"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                    'while [ $# -gt 1 ]; do shift; done\n'
                    'while kill -0 "$1" 2>/dev/null; do sleep 0.05; done\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")

    from worker.agent import Agent, AgentConfig

    machine = Machine("battery")
    events: list[str] = []
    with served(slow_repo, heartbeat_interval=0.1, liveness=20,
                event=lambda line: None) as (core, server):
        agent = Agent(AgentConfig(server.endpoint, "mbp", tmp_path / "cache",
                                  heartbeat_interval=0.1, ready_resend=0.2, gate_poll=0.05),
                      {"hw_class": "Test/16GB/metal"}, event=events.append,
                      run_root=tmp_path / "runs", env=dict(os.environ), conditions=machine,
                      system="Darwin")
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(agent.run()), daemon=True)
        thread.start()
        try:
            wait_for(lambda: agent.state == ws.PAUSED, what="paused on battery")
            assert "paused: on battery power (80%): no new work until plugged in " \
                   "(--allow-battery to work on battery)" in events
            reads = machine.reads
            wait_for(lambda: machine.reads >= reads + 5, what="the conditions re-read")
            assert agent.state == ws.PAUSED and attempts(core) == []   # no work was taken
            # the coordinator's status says why (from the paused worker's heartbeats)
            from coordinator.cli import format_status
            wait_for(lambda: worker_row(core)["state"] == "paused", what="status: paused")
            assert worker_row(core)["paused"].startswith("on battery power (80%)")
            assert "workers paused by their machine:\n  mbp: on battery power (80%)" \
                in format_status(core.status())

            machine.source = "ac"                                       # plugged in
            wait_for(lambda: agent.state == ws.RUNNING, what="a run after plugging in")
            assert "resuming: the machine's conditions allow new work again" in events
            assert worker_row(core)["paused"] is None
            trainer_pid = agent.proc.pid
            machine.source = "battery"                                  # unplugged mid-run
            wait_for(lambda: agent.state == ws.PAUSED, what="paused after the run")
            rows = attempts(core)
            assert len(rows) == 1
            assert (rows[0]["state"], rows[0]["status"]) == ("done", "ok")   # it finished
            # the machine at the run's start (plugged in) and end (unplugged), stored with it
            cond = json.loads(rows[0]["conditions"])
            assert cond["start"]["power"]["source"] == "ac"
            assert cond["end"]["power"]["source"] == "battery"
            assert cond["end"]["memory"]["swapouts"] > cond["start"]["memory"]["swapouts"]
            assert rows[0]["flagged"] is None   # a few pages swapped are no evidence
            time.sleep(0.5)
            assert len(attempts(core)) == 1   # and no new one was taken on battery
        finally:
            stop_agent(agent, thread)
    # caffeinate held the machine awake for the trainer's pid, and is gone
    assert log.read_text().split("\n")[0] == f"-i -s -w {trainer_pid}"
    assert agent.awake is None
    assert any(e.startswith("finished ") and ": ok" in e for e in events)


def test_when_idle_waits_for_the_keyboard(slow_repo, tmp_path):
    from worker.agent import Agent, AgentConfig

    machine = Machine("ac", idle=5.0)
    events: list[str] = []
    with served(slow_repo, heartbeat_interval=0.1, liveness=20,
                event=lambda line: None) as (core, server):
        agent = Agent(AgentConfig(server.endpoint, "mbp", tmp_path / "cache",
                                  heartbeat_interval=0.1, ready_resend=0.2, gate_poll=0.05,
                                  when_idle=600.0),
                      {"hw_class": "Test/16GB/metal"}, event=events.append,
                      run_root=tmp_path / "runs", env=dict(os.environ), conditions=machine)
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: agent.state == ws.PAUSED, what="paused while in use")
            assert any(e.startswith("paused: in use: keyboard/mouse idle 5s, waiting for "
                                    "10m00s idle") for e in events)
            assert attempts(core) == []
            machine.idle = 3600.0
            wait_for(lambda: agent.state == ws.RUNNING, what="a run once idle")
            machine.idle = 1.0            # someone is back: the run still finishes
            wait_for(lambda: agent.state == ws.PAUSED, what="paused after the run")
            rows = attempts(core)
            assert [(r["state"], r["status"]) for r in rows] == [("done", "ok")]
        finally:
            stop_agent(agent, thread)
