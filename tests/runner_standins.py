"""Helpers for tests that run stand-in train.py scripts through worker.runner for real.

Stand-ins fake a run without MLX: PRELUDE gives them, in a few lines, what the harness does
(write the result file, append progress) plus pid/marker files the tests synchronise on.
"""
from __future__ import annotations

import os
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

from worker.runner import AttemptProcess, AttemptSpec, Outcome

SETTINGS = {"seq_len": 64, "eval_tokens": 1024, "time_budget": 2, "seed": 7, "eval_batch": 4}
HANG = 20.0  # upper bound for waits that only guard against a hung test, never asserted

PRELUDE = textwrap.dedent("""\
    import json, os, sys, time
    def write_result(status, **figures):
        path = os.environ["AUTORESEARCH_RESULT"]
        with open(path + ".tmp", "w") as f:
            json.dump({"schema": 1, "status": status, **figures}, f)
        os.replace(path + ".tmp", path)
    def progress(**line):
        with open(os.environ["AUTORESEARCH_PROGRESS"], "a") as f:
            f.write(json.dumps(line) + "\\n")
    def note_pid(name, pid=None):
        with open(name + ".tmp", "w") as f:
            f.write(str(pid or os.getpid()))
        os.replace(name + ".tmp", name)
    def wait_for(name):
        deadline = time.time() + 20
        while not os.path.exists(name) and time.time() < deadline:
            time.sleep(0.01)
""")


def start(tmp_path: Path, body: str, *, timeout: float = 30.0, attempt_id: str | None = None,
          **kw) -> AttemptProcess:
    spec = AttemptSpec(attempt_id=attempt_id or str(uuid.uuid4()),
                       train_py=PRELUDE + textwrap.dedent(body), settings=dict(SETTINGS),
                       timeout=timeout)
    return AttemptProcess.start(spec, tmp_path / "runs", dict(os.environ), **kw)


def finish(proc: AttemptProcess) -> Outcome:
    outcome = proc.wait(timeout=HANG)
    assert outcome is not None, "attempt did not finish"
    return outcome


def wait_until(predicate, what: str):
    deadline = time.monotonic() + HANG
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """True if pid runs; zombies count as dead (PID 1 in a container may never reap them)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return bool(out.stdout.strip()) and not out.stdout.strip().startswith("Z")


def read_pids(proc: AttemptProcess, *names: str) -> list[int]:
    """The pids stand-ins wrote to run_dir/<name>; fails fast (with the log) if it died first."""
    def ready(name):
        path = proc.run_dir / name
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        early = proc.poll()
        assert early is None, f"stand-in ended before writing {name}: {early.log_tail}"
        return None

    return [wait_until(lambda n=n: ready(n), n) for n in names]
