"""The worker's side of the wire: one DEALER socket, one poll loop, one attempt at a time.

Shape follows the zguide's Paranoid Pirate worker:

* every message from the coordinator (heartbeats included) refreshes its liveness; after
  ``interval * liveness`` seconds of silence the coordinator is presumed dead, the socket is
  closed and a fresh one connects after an exponential backoff (``RECONNECT_INITIAL`` doubling to
  ``RECONNECT_MAX``) -- a fresh socket, because a DEALER would otherwise deliver messages queued
  for the dead peer to its successor;
* the worker heartbeats every interval, carrying the attempt it runs and the trainer's latest
  progress line;
* training is a subprocess (``worker.runner.AttemptProcess``) polled from this same loop, so a
  lost coordinator never stops a run: the worker reconnects, says ``hello`` with the attempt it
  holds, and the coordinator re-attaches it (or tells it to cancel);
* a finished attempt's result stays buffered until ``ack`` arrives, and is resent after every
  (re)``welcome``, so a coordinator restart between result and ack loses nothing (the coordinator
  treats duplicates idempotently);
* idle, the worker sends ``ready`` and re-sends it every ``READY_RESEND`` seconds while nothing is
  assigned, so a coordinator that restarted quietly learns about it.

Ctrl-C once: finish the current attempt, report it, send ``bye``, exit 0. Ctrl-C twice (or
SIGTERM, which service managers send): cancel the attempt, send ``bye`` with the reason, exit 130.
A version mismatch (``error`` code ``version``) ends the worker with exit 2: retrying cannot help.
"""
from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from shared import protocol
from shared.codec import MAX_FRAME_BYTES, CodecError, decode, encode
from shared.protocol import (HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, RECONNECT_INITIAL,
                             RECONNECT_MAX, ProtocolError)

READY_RESEND = 3.0        # seconds between ``ready`` re-sends while idle and unassigned
MAX_POLL_SECONDS = 0.25   # poll slice: how quickly signals and the subprocess are noticed
BYE_LINGER_MS = 1000      # how long close() may spend delivering the final ``bye``
# A cancel waits this long before killing: a trainer that already exited while we were frozen
# (SIGSTOP, lid closed) is still being reaped, and its real result beats "cancelled".
CANCEL_GRACE = 1.0
SHUTDOWN_WAIT = 10.0      # at exit, how long to wait for a cancelled trainer's process group

EXIT_OK = 0
EXIT_VERSION = 2
EXIT_INTERRUPTED = 130

HELLO_FIRST = protocol.ERROR_HELLO_FIRST


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def default_event_sink(line: str) -> None:
    print(f"{stamp()} {line}", flush=True)


def make_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """Create and connect the worker's DEALER; the one place to add CURVE keys later."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    sock.connect(endpoint)
    return sock


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


def trainer_environment(cache_dir: Path, threads: int | None,
                        base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ + the BLAS preload/threads the trainer needs + the shared cache root."""
    env = dict(os.environ if base is None else base)
    try:
        from trainer.backend import trainer_env
    except ImportError:  # no backend helper in this install: run with the plain environment
        pass
    else:
        env = dict(trainer_env(env, threads))
    env["AUTORESEARCH_CACHE"] = str(cache_dir)
    return env


def new_worker_id(name: str) -> str:
    """Stable for this process's lifetime: the coordinator recognises us across reconnects."""
    return f"{name}-{uuid.uuid4().hex[:12]}"


@dataclass
class AgentConfig:
    endpoint: str
    name: str
    cache_dir: Path
    threads: int | None = None
    heartbeat_interval: float = HEARTBEAT_INTERVAL   # until the coordinator's welcome says otherwise
    liveness: int = HEARTBEAT_LIVENESS
    reconnect_initial: float = RECONNECT_INITIAL
    reconnect_max: float = RECONNECT_MAX
    ready_resend: float = READY_RESEND


class Agent:
    def __init__(self, config: AgentConfig, profile: dict, *,
                 event: Callable[[str], None] = default_event_sink,
                 start_attempt: Callable[..., Any] | None = None,
                 run_root: Path | None = None,
                 env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = config
        self.profile = profile
        self.hw_class = profile["hw_class"]
        self.worker_id = new_worker_id(config.name)
        self.event = event
        self.clock = clock
        if start_attempt is None:
            from worker.runner import AttemptProcess
            start_attempt = AttemptProcess.start
        self.start_attempt = start_attempt
        if run_root is None:
            from worker.runner import default_run_root
            run_root = Path(default_run_root(config.cache_dir, config.name))
        self.run_root = run_root
        self.env = env if env is not None else trainer_environment(config.cache_dir, config.threads)
        self.interval = config.heartbeat_interval
        self.liveness = config.liveness

        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self.backoff = config.reconnect_initial
        self.reconnect_at = 0.0
        self.last_heard = 0.0
        self.next_beat = 0.0
        self.next_ready = 0.0
        self.welcomed = False

        self.proc: Any = None              # the running AttemptProcess
        self.attempt_id: str | None = None
        self.pending: dict | None = None   # {"attempt_id", "outcome"} awaiting ack
        self.cancel_at: float | None = None  # when to kill the attempt the coordinator cancelled
        self.cancel_reason = ""
        self.interrupts = 0
        self.exit_code: int | None = None

    # ---- signals ------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigint(self, *_: Any) -> None:
        self.interrupts += 1

    def _on_sigterm(self, *_: Any) -> None:
        self.interrupts = max(self.interrupts, 2)

    # ---- connection ---------------------------------------------------------------------

    @property
    def window(self) -> float:
        return self.interval * self.liveness

    def _connect(self) -> None:
        self.sock = make_dealer(self.ctx, self.cfg.endpoint)
        self.poller.register(self.sock, zmq.POLLIN)
        self.welcomed = False
        now = self.clock()
        self.last_heard = now   # give the new connection one full window
        self.next_beat = now + self.interval
        self._hello()

    def _disconnect(self, linger_ms: int = 0) -> None:
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=linger_ms)
            self.sock = None
        self.welcomed = False

    def _send(self, type_: str, **fields: Any) -> None:
        if self.sock is None:
            return  # disconnected: whatever matters (hello, result) is re-sent on reconnect
        try:
            self.sock.send(encode(protocol.make(type_, **fields)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _held_attempt(self) -> str | None:
        if self.proc is not None:
            return self.attempt_id
        return self.pending["attempt_id"] if self.pending else None

    def _hello(self) -> None:
        self._send("hello", worker_id=self.worker_id, name=self.cfg.name, profile=self.profile,
                   hw_class=self.hw_class, attempt_id=self._held_attempt())

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        self.event(f"worker {self.cfg.name} ({self.worker_id}) [{self.hw_class}] "
                   f"joining {self.cfg.endpoint}")
        self._connect()
        try:
            while self.exit_code is None:
                self._step()
        finally:
            self._disconnect(linger_ms=BYE_LINGER_MS)
            if self.proc is not None:  # never leave a trainer behind
                self.proc.cancel("worker exiting")
                self.proc.wait(timeout=SHUTDOWN_WAIT)
        return self.exit_code

    def _step(self) -> None:
        now = self.clock()
        if self.sock is None:
            if now >= self.reconnect_at:
                self._connect()
            else:
                time.sleep(min(MAX_POLL_SECONDS, self.reconnect_at - now))
        else:
            timeout = max(0.0, min(self.next_beat - now, MAX_POLL_SECONDS))
            try:
                events = dict(self.poller.poll(timeout * 1000))
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EINTR:
                    raise
                events = {}
            if events.get(self.sock):
                self._drain()
        self._handle_interrupts()
        if self.exit_code is not None:
            return
        # Check the trainer before liveness: a result that finished while we were frozen
        # (SIGSTOP, lid closed) is reported even if the coordinator has since moved on.
        self._poll_attempt()
        now = self.clock()
        if self.sock is not None and now - self.last_heard > self.window:
            self._disconnect()
            self.reconnect_at = now + self.backoff
            self.event(f"coordinator silent for {now - self.last_heard:.1f}s; "
                       f"reconnecting in {self.backoff:.1f}s")
            self.backoff = min(self.backoff * 2, self.cfg.reconnect_max)
            return
        if self.sock is not None and now >= self.next_beat:
            progress = self.proc.progress() if self.proc is not None else None
            self._send("heartbeat", worker_id=self.worker_id, attempt_id=self.attempt_id,
                       progress=progress if isinstance(progress, dict) else None)
            self.next_beat = now + self.interval
        if self.interrupts and self.proc is None and self.pending is None:
            self._send("bye", worker_id=self.worker_id, reason="worker stopped by its operator")
            self.event("leaving: bye sent")
            self.exit_code = EXIT_OK
            return
        if (self.welcomed and self.proc is None and self.pending is None
                and not self.interrupts and now >= self.next_ready):
            self._send("ready", worker_id=self.worker_id)
            self.next_ready = now + self.cfg.ready_resend

    def _drain(self) -> None:
        while self.sock is not None:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = self.clock()
            self.backoff = self.cfg.reconnect_initial
            try:
                msg = protocol.validate(decode(data))
            except (CodecError, ProtocolError) as exc:
                if getattr(exc, "code", None) == "version":
                    self.event(f"version mismatch with the coordinator: {exc}")
                    self.exit_code = EXIT_VERSION
                    return
                self.event(f"bad message from coordinator ignored: {exc}")
                continue
            self._on_message(msg)
            if self.exit_code is not None:
                return

    def _on_message(self, msg: dict) -> None:
        t = msg["type"]
        if t == "heartbeat":
            return
        if t == "welcome":
            self.welcomed = True
            self.interval = float(msg["heartbeat_interval"])
            self.liveness = int(msg["liveness"])
            self.next_ready = self.clock()
            self.event(f"connected to {self.cfg.endpoint} (heartbeat {self.interval:g}s, "
                       f"liveness {self.liveness})")
            if self.pending is not None:
                self._send("result", worker_id=self.worker_id, **self.pending)
        elif t == "assign":
            self._on_assign(msg)
        elif t == "cancel":
            self._on_cancel(msg["attempt_id"], msg["reason"])
        elif t == "ack":
            if self.pending is not None and self.pending["attempt_id"] == msg["attempt_id"]:
                self.pending = None
                self.next_ready = self.clock()
                how = "accepted" if msg["accepted"] else "not counted"
                note = f" ({msg['note']})" if msg["note"] else ""
                self.event(f"result {msg['attempt_id']} {how}{note}")
        elif t == "error":
            if msg["code"] == HELLO_FIRST:
                self._hello()
            elif msg["code"] == "version":
                self.event(f"coordinator refused us: {msg['message']}")
                self.exit_code = EXIT_VERSION
            else:
                self.event(f"coordinator error ({msg['code']}): {msg['message']}")
        else:
            self.event(f"ignoring unexpected {t} from coordinator")

    def _on_assign(self, msg: dict) -> None:
        attempt_id = msg["attempt_id"]
        if self.proc is not None or self.pending is not None or self.interrupts:
            # The coordinator only assigns on ``ready``; this is a duplicate or a race.
            self.event(f"ignoring assign {attempt_id}: busy with {self._held_attempt()}")
            return
        from worker.runner import AttemptSpec
        spec = AttemptSpec(attempt_id=attempt_id, train_py=msg["train_py"],
                           settings=dict(msg["settings"]), timeout=float(msg["timeout"]))
        purpose = msg.get("purpose", "candidate")
        self.event(f"assigned {attempt_id}: {purpose} #{msg['candidate_id']} "
                   f"({msg['commit'][:8]}), timeout {float(msg['timeout']):.0f}s")
        try:
            self.proc = self.start_attempt(spec, self.run_root, self.env)
        except Exception as exc:  # bad id/settings (ValueError) or cannot spawn (OSError)
            from worker.runner import Outcome
            note = f"worker could not start the trainer: {type(exc).__name__}: {exc}"
            self.event(f"could not start {attempt_id}: {note}")
            self.pending = {"attempt_id": attempt_id, "outcome": Outcome.refused(note).to_wire()}
            self._send("result", worker_id=self.worker_id, **self.pending)
            return
        self.attempt_id = attempt_id

    def _on_cancel(self, attempt_id: str, reason: str) -> None:
        if self.proc is None or self.attempt_id != attempt_id:
            return  # already finished: its result (if any) is reported and recorded as stale
        if self.cancel_at is None:
            self.cancel_at = self.clock() + CANCEL_GRACE
            self.cancel_reason = reason
        self._poll_attempt()

    def _poll_attempt(self) -> None:
        if self.proc is None:
            return
        outcome = self.proc.poll()
        if outcome is not None:
            self._finished(outcome)
        elif self.cancel_at is not None and self.clock() >= self.cancel_at:
            self.cancel_at = float("inf")   # once: the runner escalates to SIGKILL itself
            self.proc.cancel(self.cancel_reason)
            self.event(f"cancelling {self.attempt_id}: {self.cancel_reason}")

    def _finished(self, outcome: Any) -> None:
        wire = outcome.to_wire() if hasattr(outcome, "to_wire") else dict(outcome)
        self.pending = {"attempt_id": self.attempt_id, "outcome": wire}
        self.proc, self.attempt_id, self.cancel_at = None, None, None
        bpb = wire.get("val_bpb")
        bpb_s = f" val_bpb {bpb:.4f}" if isinstance(bpb, (int, float)) else ""
        self.event(f"finished {self.pending['attempt_id']}: {wire.get('status')}{bpb_s} "
                   f"in {float(wire.get('wall_seconds') or 0):.1f}s")
        self._send("result", worker_id=self.worker_id, **self.pending)

    def _handle_interrupts(self) -> None:
        if self.interrupts == 1 and not getattr(self, "_said_finishing", False):
            self._said_finishing = True
            if self.proc is not None or self.pending is not None:
                self.event("stopping after the current attempt is reported "
                           "(Ctrl-C again to cancel it)")
        if self.interrupts >= 2:
            reason = "worker interrupted by its operator"
            if self.proc is not None:
                # SIGTERM now; run()'s exit path waits for the group (SIGKILL after a grace).
                self.proc.cancel(reason)
                reason += f"; attempt {self.attempt_id} cancelled"
                self.event(f"cancelled {self.attempt_id}")
            self._send("bye", worker_id=self.worker_id, reason=reason)
            self.event(f"leaving: {reason}")
            self.exit_code = EXIT_INTERRUPTED
