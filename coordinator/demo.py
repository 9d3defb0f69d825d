"""`autoresearch-coord demo`: a whole fleet on one machine, in a few minutes, offline.

It does what a lab does overnight, at toy scale: prepares the embedded sample corpus, makes a
research repo with the `tiny` preset, starts a coordinator and two workers as real processes on
loopback, submits a handful of real train.py variants (depth, learning rate, batch size, and one
that crashes), relays keeps and reverts as they happen, then prints the ledger and the branch.

Everything is an ordinary subprocess running the same console scripts a person would run, so the
demo is also the three-terminal walkthrough in one command.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

# How long the demo waits for the fleet to decide every submission before giving up. Generous:
# a 2-core CI machine under load can take several times longer than an idle one.
DEMO_TIMEOUT = 900.0


@dataclass
class Variant:
    description: str
    edits: dict[str, Callable]   # constant name -> function of its baseline value
    crash: bool = False          # append a line that makes the run fail at start


def variants() -> list[Variant]:
    """The research a person might try first, each one a real edit of the baseline."""
    return [
        Variant("double the matrix learning rate", {"MATRIX_LR": lambda v: v * 2}),
        Variant("one layer deeper", {"DEPTH": lambda v: v + 1}),
        Variant("halve the batch", {"DEVICE_BATCH_SIZE": lambda v: v // 2,
                                    "TOTAL_BATCH_SIZE": lambda v: v // 2}),
        Variant("quarter the matrix learning rate", {"MATRIX_LR": lambda v: v / 4}),
        Variant("freeze the token embeddings", {"EMBEDDING_LR": lambda v: 0.0}),
        Variant("typo: nn.Linaer (crashes)", {}, crash=True),
    ]


def constant(text: str, name: str):
    """The literal value of `NAME = ...` at column 0 of train.py."""
    m = re.search(rf"^{re.escape(name)}\s*=\s*([^#\n]+)", text, re.M)
    if not m:
        raise click.ClickException(f"demo: baseline train.py has no constant {name}")
    return ast.literal_eval(m.group(1).strip())


def apply_variant(baseline: str, v: Variant) -> str:
    """The baseline with the variant's constants rewritten (same rewriter the presets use)."""
    from trainer.presets import apply_overrides
    text = apply_overrides(baseline, {k: f(constant(baseline, k)) for k, f in v.edits.items()})
    if v.crash:
        # A typo an agent might make: the module imports fine, the model build fails.
        if "nn.Linear(" not in text:
            raise click.ClickException("demo: baseline train.py has no nn.Linear( to misspell")
        text = text.replace("nn.Linear(", "nn.Linaer(", 1)
    return text


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(proc: subprocess.Popen, prefix: str, sink: list[str] | None = None) -> threading.Thread:
    """Copy a child's output to ours, line by line, with a prefix naming the process."""
    def pump():
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            if sink is not None:
                sink.append(line)
            click.echo(f"{prefix} {line}")
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _spawn(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=env, stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen, sig=signal.SIGINT, wait: float = 20.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_demo(workdir: Path, cache_dir: Path, workers: int = 2, keep: bool = True,
             budget: int | None = None) -> int:
    from shared.client import Client
    from coordinator.repo import init_repo
    from coordinator.trust import TrustStore
    from shared.keys import (
        COORDINATOR_KEY_NAME, coordinator_key_dir, fingerprint, load_or_create_keypair,
    )
    from trainer.prepare import prepare_sample

    bindir = Path(sys.executable).parent
    coord_cmd = [str(bindir / "autoresearch-coord")]
    worker_cmd = [str(bindir / "autoresearch-worker")]
    if not Path(coord_cmd[0]).exists():  # not installed as scripts: run the modules
        coord_cmd = [sys.executable, "-m", "coordinator.cli"]
        worker_cmd = [sys.executable, "-m", "worker.cli"]

    click.echo(f"[demo] preparing the embedded sample corpus in {cache_dir} ...")
    data_dir = prepare_sample(cache_dir)
    click.echo(f"[demo] dataset ready: {data_dir}")

    repo = workdir / "research"
    if repo.exists():
        shutil.rmtree(repo)
    overrides = {"time_budget": budget} if budget else {}
    init_repo(repo, tag="demo", preset="tiny", **overrides)
    click.echo(f"[demo] research repo: {repo} (branch autoresearch/demo, preset tiny)")
    # Keys, as in a real lab: the coordinator's keypair pins it for the workers and the client,
    # and the workers enrol themselves with a one-time invite (they share this user's key).
    server_key = load_or_create_keypair(coordinator_key_dir(repo), COORDINATOR_KEY_NAME).public_str
    with TrustStore.open(repo) as store:
        invite = store.create_invite("worker", ttl_s=3600)
    click.echo(f"[demo] coordinator key {fingerprint(server_key)}; workers enrol with invite {invite[:8]}...")

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    coord_lines: list[str] = []
    try:
        coord = _spawn(coord_cmd + ["start", str(repo), "--bind", endpoint], env)
        procs.append(coord)
        _relay(coord, "[coord] ", coord_lines)
        client = Client(endpoint, timeout=30.0, server_key=server_key)
        client.query("status")  # waits until the coordinator answers
        # Split the cores between the workers: OpenBLAS starts one thread per core otherwise,
        # and two workers would fight over them.
        threads = max(1, (os.cpu_count() or 2) // workers)
        for i in range(workers):
            w = _spawn(worker_cmd + ["join", endpoint, "--name", f"demo-w{i + 1}",
                                     "--server-key", server_key, "--invite", invite,
                                     "--cache-dir", str(cache_dir), "--threads", str(threads)], env)
            procs.append(w)
            _relay(w, f"[w{i + 1}]   ")

        baseline = (repo / "train.py").read_text()
        ids = []
        for v in variants():
            reply = client.submit(apply_variant(baseline, v), v.description)
            ids.append(reply["candidate_id"])
            click.echo(f"[demo] submitted #{reply['candidate_id']}: {v.description}")

        deadline = time.monotonic() + DEMO_TIMEOUT
        while time.monotonic() < deadline:
            status = client.query("status")
            if coord.poll() is not None:
                raise click.ClickException("demo: the coordinator exited early (see its lines above)")
            if _all_decided(status, ids):
                break
            time.sleep(2.0)
        else:
            raise click.ClickException(f"demo: not every candidate was decided in {DEMO_TIMEOUT:.0f} s")

        click.echo("\n[demo] ===== ledger =====")
        click.echo(_format_log(client.query("log", limit=50)))
        click.echo("\n[demo] ===== branch autoresearch/demo =====")
        click.echo(subprocess.run(["git", "-C", str(repo), "log", "--format=%h %s", "autoresearch/demo"],
                                  capture_output=True, text=True).stdout)
        click.echo("[demo] results.tsv:")
        click.echo(client.query("export"))
    finally:
        for p in reversed(procs):
            _stop(p)
    if keep:
        click.echo(f"[demo] kept {repo}: `git -C {repo} log autoresearch/demo` to look around")
    return 0


def _all_decided(status: dict, ids: list[int]) -> bool:
    states = {c["id"]: c["state"] for c in status.get("candidates", [])}
    return all(states.get(i) in ("kept", "discarded", "failed") for i in ids)


def _format_log(log: dict) -> str:
    rows = []
    for d in reversed(log.get("decisions", [])):
        rows.append(f"  #{d['candidate_id']:<3} {d['verdict']:<9} {d['reason']}")
    return "\n".join(rows) or "  (no decisions)"


@click.command("demo")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put the demo's research repo (default: a new temp directory).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Prepared-data cache (default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch).")
@click.option("--workers", default=2, show_default=True, help="How many local workers to start.")
@click.option("--budget", type=int, default=None, help="Training seconds per run (default: the tiny preset's).")
def demo_command(workdir: Path | None, cache_dir: Path | None, workers: int, budget: int | None) -> None:
    """Run a coordinator and local workers on the embedded sample, offline, in a few minutes.

    Submits real train.py variants (depth, learning rate, batch size, one that crashes), shows
    keeps and reverts as they happen, then prints the ledger and the branch log.
    """
    workdir = workdir or Path(tempfile.mkdtemp(prefix="autoresearch-demo-"))
    cache_dir = cache_dir or Path(os.environ.get("AUTORESEARCH_CACHE", Path.home() / ".cache" / "autoresearch"))
    sys.exit(run_demo(workdir, cache_dir, workers=workers, budget=budget))
