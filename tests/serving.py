"""A real Coordinator + Server on a loopback port, run in a thread of the test process."""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path


@contextlib.contextmanager
def served(repo: Path, bind: str = "tcp://127.0.0.1:*", **server_kw):
    """Yield (core, server) with ``server.run`` in a daemon thread; stop and close both after.
    ``bind`` the endpoint of an earlier one to restart "it" on the same port."""
    from coordinator.core import Coordinator
    from coordinator.server import Server

    core = Coordinator(repo)
    server = Server(core, bind=bind, **server_kw)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield core, server
    finally:
        server.stop()
        thread.join(20)
        server.close()
        core.close()


@contextlib.contextmanager
def write_locked(path: Path):
    """Another process holds ``BEGIN IMMEDIATE`` on the SQLite file at ``path`` (a stuck
    ``autoresearch-coord`` command, say) until the block ends."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys\n"
         f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
         "c.execute('BEGIN IMMEDIATE')\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(30)
