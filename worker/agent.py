"""The worker's side of the wire: one DEALER socket, one poll loop, one attempt at a time.

What the worker is doing is one field, ``Agent.state``, moved only along ``worker.states``'
table (``python -m worker.states`` prints it); the other fields are the facts those moves read
(the link's timers, the attempt, what the welcome said). Messages are dispatched through
``HANDLERS``, which ``shared.protocol.check_handlers`` compares with the wire schema at import.

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

Keys (``AgentConfig.keypair`` + ``server_key``; ``None`` = --insecure): the DEALER is a CURVE
client pinned to the coordinator's key and watched by ``shared.keys.HandshakeMonitor``. If the
machine at the endpoint does not hold that key the handshake fails and the worker exits 4
*before anything is received*, so it never runs code from an impostor. If the coordinator does
not trust our key (error ``untrusted``), a worker given an invite token sends ``enrol`` once and
then ``hello`` again; otherwise it prints its key and the admin's command and exits 3 (a
service manager restarts it later). ``revoked`` and ``forbidden`` also exit 3.

Harness and data: ``welcome`` names the coordinator's harness fingerprint and dataset hash. A
different harness fingerprint means no work (the worker asks ``query harness`` to say which
file differs, keeps heartbeating, never sends ``ready``). A dataset it lacks is fetched with
``shared.datasync.fetch_dataset`` in a thread over its own DEALER socket to the same endpoint with
the same keys (so this loop keeps heartbeating), with resume, sha256 checks and a progress bar on
stderr, into ``<cache>/datasets/<name>-<hash8>``; runs get ``AUTORESEARCH_DATA`` pointing there.
Before *every* run the harness fingerprint is recomputed and the dataset directory quick-checked
(manifest hash, file sizes); on a difference the attempt is reported ``cancelled`` with the
reason (the candidate is requeued, no strike) and the worker stops taking work (harness) or
fetches the dataset again (data). Too little disk to start a run (``LowDiskSpace``) is likewise
``cancelled``, and the worker waits ``DISK_BACKOFF`` seconds before asking for work again.

Test hook: ``AUTORESEARCH_TEST_HARNESS_FINGERPRINT`` (test-only) replaces this worker's computed
harness fingerprint, to simulate a modified harness.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import zmq

from shared import protocol
from shared.awake import KeepAwake
from shared.codec import CodecError, decode, encode
from shared.datasync import (DataSyncError, check_manifest, fetch_dataset, harness_difference,
                             harness_file_hashes, harness_fingerprint)
from shared.dealer import Requester, make_dealer
from shared.keys import fingerprint
from shared.outcome import Outcome
from shared.protocol import (HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, RECONNECT_INITIAL,
                             RECONNECT_MAX, ProtocolError)
from trainer.backend import trainer_env
from trainer.dataset import DatasetError, read_manifest
from worker import gate, kernel_cache, states
from worker.conditions import read_conditions
from worker.runner import AttemptProcess, AttemptSpec, LowDiskSpace, default_run_root
from worker.states import (BLOCKED, CONNECTING, ENROLLING, FETCHING, HOLDING, IDLE, PAUSED,
                           REPORTING, RUNNING, STOPPED)

READY_RESEND = 3.0        # seconds between ``ready`` re-sends while idle and unassigned
MAX_POLL_SECONDS = 0.25   # poll slice: how quickly signals and the subprocess are noticed
BYE_LINGER_MS = 1000      # how long close() may spend delivering the final ``bye``
# A cancel waits this long before killing: a trainer that already exited while we were frozen
# (SIGSTOP, lid closed) is still being reaped, and its real result beats "cancelled".
CANCEL_GRACE = 1.0
SHUTDOWN_WAIT = 10.0      # at exit, how long to wait for a cancelled trainer's process group
DISK_BACKOFF = 60.0       # after LowDiskSpace, seconds before asking for work again
FETCH_RETRY = 30.0        # after a failed dataset fetch, seconds before trying again
FETCH_REQUEST_TIMEOUT = 30.0   # one dataset query's reply

EXIT_OK = 0
EXIT_VERSION = 2
EXIT_TRUST = 3            # untrusted / revoked / forbidden: an admin must act
EXIT_SERVER_KEY = 4       # the coordinator does not hold the pinned key
EXIT_INTERRUPTED = 130

TEST_HARNESS_ENV = "AUTORESEARCH_TEST_HARNESS_FINGERPRINT"   # test-only override

def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def default_event_sink(line: str) -> None:
    print(f"{stamp()} {line}", flush=True)


def local_harness_fingerprint() -> str:
    """This machine's harness fingerprint (or the test-only override)."""
    override = os.environ.get(TEST_HARNESS_ENV)
    if override:
        return override
    return harness_fingerprint()


def dataset_problem(path: Path | None, want_hash: str) -> str | None:
    """Quick pre-run check of a fetched dataset: its manifest is self-consistent, names
    ``want_hash``, and every file has its manifest size. None when fine."""
    if path is None:
        return "no dataset fetched yet"
    try:
        manifest = check_manifest(read_manifest(path))
    except (DatasetError, DataSyncError) as exc:
        return f"dataset at {path} is damaged: {exc}"
    if manifest["dataset_hash"] != want_hash:
        return (f"dataset at {path} is {manifest['dataset_hash'][:12]}, the coordinator's is "
                f"{want_hash[:12]}")
    for fname, meta in manifest["files"].items():
        p = path / fname
        if not p.is_file() or p.stat().st_size != meta["bytes"]:
            return f"dataset file {p} is missing or changed size"
    return None


class ProgressBar:
    """A one-line progress bar on stderr (redrawn at most 5 times a second)."""

    def __init__(self, label: str, stream: Any = None):
        self.label, self.stream = label, stream or sys.stderr
        self.last = 0.0
        self.done = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        final = total > 0 and done >= total
        if self.done or (not final and now - self.last < 0.2):
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(30 * frac)
        self.stream.write(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% "
                          f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB")
        if final:
            self.stream.write("\n")
            self.done = True
        self.stream.flush()


def default_cache_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")


def trainer_environment(cache_dir: Path, threads: int | None,
                        base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ + the BLAS preload/threads the trainer needs + the shared cache root."""
    env = dict(trainer_env(dict(os.environ if base is None else base), threads))
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
    keypair: Any = None          # shared.keys.Keypair of this worker; None = --insecure
    server_key: Any = None       # the coordinator's pinned public key (Z85)
    invite: str | None = None    # one-time token to enrol with if the coordinator lacks our key
    allow_battery: bool = False  # take new work on battery too (worker.gate)
    when_idle: float | None = None   # seconds of keyboard/mouse idle before new work; None: any
    keep_awake: bool = True      # hold caffeinate (macOS) for every trainer's lifetime
    gate_poll: float = gate.POLL_SECONDS   # how often a waiting worker re-reads its conditions


class Agent:
    """One worker: its state (``worker.states``) plus the facts the transitions read."""

    def __init__(self, config: AgentConfig, profile: dict, *,
                 event: Callable[[str], None] = default_event_sink,
                 start_attempt: Callable[..., Any] | None = None,
                 run_root: Path | None = None,
                 env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 conditions: Callable[..., dict] = read_conditions,
                 system: str | None = None):
        self.cfg = config
        self.profile = profile
        self.hw_class = profile["hw_class"]
        self.worker_id = new_worker_id(config.name)
        self.event = event
        self.clock = clock
        self.start_attempt = start_attempt or AttemptProcess.start
        self.run_root = run_root or Path(default_run_root(config.cache_dir, config.name))
        self.env = dict(env if env is not None else
                        trainer_environment(config.cache_dir, config.threads))
        # one warm MLX kernel cache per worker, across runs
        self.env.setdefault(kernel_cache.ENV,
                            str(kernel_cache.default_dir(config.cache_dir, config.name)))
        self.interval = config.heartbeat_interval
        self.liveness = config.liveness
        self.state = CONNECTING
        self.exit_code: int | None = None  # set with the move to ``stopped``
        self.interrupts = 0

        # the link (Paranoid Pirate): one DEALER, its handshake monitor, the timers
        self.ctx = zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.monitor: Any = None
        self.poller = zmq.Poller()
        self.backoff = config.reconnect_initial
        self.reconnect_at = 0.0
        self.last_heard = 0.0
        self.next_beat = 0.0
        self.next_ready = 0.0              # idle: when to send ready again
        self.hello_at: float | None = None  # when our last hello went out, until its welcome
        self.incarnation: str | None = None  # the coordinator process that welcomed us last

        # the attempt (running / reporting)
        self.proc: Any = None              # the running AttemptProcess
        self.attempt_id: str | None = None
        self.pending: dict | None = None   # {"attempt_id", "outcome"} awaiting ack
        self.next_result = float("inf")    # when to send the unacked result again
        self.cancel_at: float | None = None  # when to kill the attempt the coordinator cancelled
        self.cancel_reason = ""

        # facts the waiting states follow from (``_settle``)
        self.enrol_req: str | None = None  # req_id of our enrol, while enrolling
        self.enrolled = False
        self.harness_fp = local_harness_fingerprint()
        self.coord_harness: str | None = None   # from welcome
        self.harness_req: str | None = None
        self.block_reason: str | None = None    # why this worker takes no work (harness)
        self.hold_until = 0.0                   # no ready before this (back-off)
        self.want_hash: str | None = None       # coordinator's dataset hash (None: serves none)
        self.want_name = ""
        self.dataset_dir: Path | None = None    # fetched dataset matching want_hash
        self.have_hash: str | None = None
        self.fetch_thread: threading.Thread | None = None
        self.fetch_result: tuple | None = None
        self.fetch_retry_at = 0.0

        # the machine's conditions (worker.gate): why no new work now, and the run's readings
        self.conditions = conditions
        self.gate_settings = gate.GateSettings(config.allow_battery, config.when_idle)
        self.pause_reason: str | None = None
        self.next_gate = 0.0                    # when to re-read the conditions while waiting
        self.start_conditions: dict | None = None   # read just before the trainer started
        self.awake: KeepAwake | None = None
        self.system = system                    # None: this machine's (tests pass "Darwin")

    # ---- state --------------------------------------------------------------------------

    def _to(self, new: str) -> None:
        self.state = states.check(self.state, new)

    def _stop(self, code: int) -> None:
        self._to(STOPPED)
        self.exit_code = code

    def _settle(self) -> None:
        """Holding nothing: move to the waiting state the facts say (or leave, if the operator
        asked) -- or back to ``connecting`` while our hello is unanswered: the coordinator
        may not know us yet, and the welcome settles again."""
        now = self.clock()
        if self.interrupts:
            self._leave()
        elif self.hello_at is not None:
            self._to(CONNECTING)
        elif self.block_reason:
            self._to(BLOCKED)
        elif now < self.hold_until:
            self._to(HOLDING)
        elif self.want_hash is not None and self.have_hash != self.want_hash:
            self._to(FETCHING)
        elif self._gate(now):
            self._to(PAUSED)
        else:
            if self.state != IDLE:   # a second welcome while idle sends no second ready
                self.next_ready = now
            self._to(IDLE)

    def _gate(self, now: float, force: bool = False) -> str | None:
        """Why the machine's conditions say no new work (``worker.gate``), re-read at most every
        ``gate_poll`` seconds; logs each change once."""
        if not self._gating:
            return None
        if force or now >= self.next_gate:
            self._judge_gate(self._read_conditions(), now)
        return self.pause_reason

    def _judge_gate(self, conditions: dict, now: float) -> str | None:
        self.next_gate = now + self.cfg.gate_poll
        reason = gate.paused_reason(conditions, self.gate_settings)
        if reason != self.pause_reason:
            self.event(f"paused: {reason}" if reason else
                       "resuming: the machine's conditions allow new work again")
            self.pause_reason = reason
        return reason

    @property
    def _gating(self) -> bool:
        return not self.cfg.allow_battery or bool(self.cfg.when_idle)

    def _read_conditions(self) -> dict:
        try:
            return self.conditions(with_idle=bool(self.cfg.when_idle))
        except Exception as exc:   # a probe must never stop the worker
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _leave(self) -> None:
        if self.state == STOPPED:
            return   # settling after the last report already left; one bye is the goodbye
        self._send("bye", worker_id=self.worker_id, reason="worker stopped by its operator")
        self.event("leaving: bye sent")
        self._stop(EXIT_OK)

    def _unwelcomed(self) -> None:
        """The coordinator no longer knows us on this link (lost, or it forgot us)."""
        if self.state in states.WAITING or self.state == ENROLLING:
            self._to(CONNECTING)
        self.enrol_req = None

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
        self.sock, self.monitor = make_dealer(self.ctx, self.cfg.endpoint, self.cfg.keypair,
                                              self.cfg.server_key, monitor=True)
        self.poller.register(self.sock, zmq.POLLIN)
        self._unwelcomed()
        now = self.clock()
        self.last_heard = now   # give the new connection one full window
        self.next_beat = now + self.interval
        self._hello()

    def _disconnect(self, linger_ms: int = 0) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.sock is not None:
            self.poller.unregister(self.sock)
            self.sock.close(linger=linger_ms)
            self.sock = None

    def _send(self, type_: str, **fields: Any) -> None:
        if self.sock is None:
            return  # disconnected: whatever matters (hello, result) is re-sent on reconnect
        try:
            self.sock.send(encode(protocol.make(type_, **fields)), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _send_pending(self) -> None:
        """Send the finished result; again every ready_resend seconds until it is acked. A
        result (or its ack) lost on a connection ZeroMQ silently re-made would otherwise leave
        this worker waiting forever; the coordinator acks duplicates without counting them."""
        self._send("result", worker_id=self.worker_id, **self.pending)
        self.next_result = self.clock() + self.cfg.ready_resend

    def _held_attempt(self) -> str | None:
        if self.proc is not None:
            return self.attempt_id
        return self.pending["attempt_id"] if self.pending else None

    def _hello(self) -> None:
        self.hello_at = self.clock()
        self._send("hello", worker_id=self.worker_id, name=self.cfg.name, profile=self.profile,
                   hw_class=self.hw_class, attempt_id=self._held_attempt(),
                   harness_fingerprint=self.harness_fp, dataset_hash=self.have_hash)

    def _check_handshake(self) -> None:
        """Exit before anything is received when the peer does not hold the pinned key."""
        if self.monitor is None or self.monitor.poll(0) != "server_key":
            return
        if self.cfg.keypair is None:
            self.event(f"the coordinator at {self.cfg.endpoint} requires CURVE keys: join with "
                       "--server-key KEY (printed by `autoresearch-coord start`), not --insecure")
        else:
            self.event(f"the coordinator at {self.cfg.endpoint} does not have the pinned key "
                       f"{fingerprint(self.cfg.server_key)} -- refusing to run anything")
        self._stop(EXIT_SERVER_KEY)

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        self.event(f"worker {self.cfg.name} ({self.worker_id}) [{self.hw_class}] "
                   f"joining {self.cfg.endpoint}")
        if self.cfg.keypair is not None:
            self.event(f"this worker's key: {self.cfg.keypair.public_str} "
                       f"(fingerprint {fingerprint(self.cfg.keypair.public)}); coordinator key "
                       f"pinned: {fingerprint(self.cfg.server_key)}")
        else:
            self.event("insecure: no keys (the coordinator must run with --insecure)")
        self._connect()
        try:
            while self.state != STOPPED:
                self._step()
        finally:
            self._disconnect(linger_ms=BYE_LINGER_MS)
            if self.proc is not None:  # never leave a trainer behind
                self.proc.cancel("worker exiting")
                self.proc.wait(timeout=SHUTDOWN_WAIT)
            if self.awake is not None:
                self.awake.stop()
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
            self._check_handshake()
            if self.state == STOPPED:
                return
            if events.get(self.sock):
                self._drain()
        self._handle_interrupts()
        if self.state == STOPPED:
            return
        # Check the trainer before liveness: a result that finished while we were frozen
        # (SIGSTOP, lid closed) is reported even if the coordinator has since moved on.
        self._poll_attempt()
        self._poll_fetch()
        now = self.clock()
        if self.sock is not None and now - self.last_heard > self.window:
            self._disconnect()
            self._unwelcomed()
            self.reconnect_at = now + self.backoff
            self.event(f"coordinator silent for {now - self.last_heard:.1f}s; "
                       f"reconnecting in {self.backoff:.1f}s")
            self.backoff = min(self.backoff * 2, self.cfg.reconnect_max)
            return
        if self.sock is not None and now >= self.next_beat:
            progress = self.proc.progress() if self.proc is not None else None
            beat = {"paused": self.pause_reason} if self.state == PAUSED else {}
            self._send("heartbeat", worker_id=self.worker_id, attempt_id=self.attempt_id,
                       progress=progress if isinstance(progress, dict) else None, **beat)
            self.next_beat = now + self.interval
        if self.state == REPORTING and now >= self.next_result:
            self._send_pending()
        elif self.state == HOLDING and now >= self.hold_until:
            self._settle()
        elif self.state == PAUSED and now >= self.next_gate:
            if not self._gate(now):
                self._settle()
        elif self.state == IDLE and now >= self.next_gate and self._gate(now):
            self._settle()   # unplugged (or someone came back) while idle
        elif self.state == FETCHING and self.fetch_thread is None and now >= self.fetch_retry_at:
            self._start_fetch()
        elif self.state == IDLE and now >= self.next_ready:
            self._send("ready", worker_id=self.worker_id, harness_fingerprint=self.harness_fp,
                       dataset_hash=self.have_hash)
            self.next_ready = now + self.cfg.ready_resend

    # ---- dataset ------------------------------------------------------------------------

    def _start_fetch(self) -> None:
        want, name = self.want_hash, self.want_name
        self.event(f"fetching dataset {name} ({want[:12]}) from the coordinator "
                   f"into {self.cfg.cache_dir}")
        bar = ProgressBar(f"dataset {name}")
        req = Requester(self.cfg.endpoint, keypair=self.cfg.keypair,
                        server_key=self.cfg.server_key, timeout=FETCH_REQUEST_TIMEOUT,
                        retries=3, ctx=self.ctx)
        cache_dir, log = self.cfg.cache_dir, self.event

        def work() -> None:
            try:
                path = fetch_dataset(req.ask, cache_dir, progress=bar, log=log)
                self.fetch_result = ("ok", want, path)
            except Exception as exc:   # reported by the loop; the worker takes no work
                self.fetch_result = ("error", want, f"{type(exc).__name__}: {exc}")
            finally:
                req.close()

        self.fetch_result = None
        self.fetch_thread = threading.Thread(target=work, name="dataset-fetch", daemon=True)
        self.fetch_thread.start()

    def _poll_fetch(self) -> None:
        if self.fetch_thread is None or self.fetch_thread.is_alive():
            return
        self.fetch_thread = None
        status, want, value = self.fetch_result or ("error", None, "fetch thread died")
        self.fetch_result = None
        if status == "ok":
            problem = dataset_problem(Path(value), self.want_hash or "")
            if want == self.want_hash and problem is None:
                self.dataset_dir, self.have_hash = Path(value), want
                self.event(f"dataset {self.want_name} ({want[:12]}) ready at {value}")
                if self.state == FETCHING:
                    self._settle()
                return
            value = problem or "the coordinator's dataset changed during the fetch"
        self.fetch_retry_at = self.clock() + FETCH_RETRY
        self.event(f"cannot use the coordinator's dataset, taking no work (retrying in "
                   f"{FETCH_RETRY:g}s): {value}")

    def _preflight(self) -> str | None:
        """Checked before every run: the harness and the evaluation data are what the
        coordinator runs. Returns why not, or None."""
        if self.coord_harness is not None:
            mine = local_harness_fingerprint()
            if mine != self.coord_harness:
                self.harness_fp = mine
                self.block_reason = (f"harness changed on this machine: fingerprint "
                                     f"{mine[:12]} != coordinator's {self.coord_harness[:12]}")
                return self.block_reason
        if self.want_hash is not None:
            problem = dataset_problem(self.dataset_dir, self.want_hash)
            if problem is not None:
                self.have_hash = None     # fetch it again (a re-fetch repairs and verifies)
                return problem
        return None

    # ---- inbound ------------------------------------------------------------------------

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
                    self._stop(EXIT_VERSION)
                    return
                self.event(f"bad message from coordinator ignored: {exc}")
                continue
            handler = HANDLERS.get(msg["type"])
            if handler is None:
                self.event(f"ignoring unexpected {msg['type']} from coordinator")
            else:
                handler(self, msg)
            if self.state == STOPPED:
                return

    def _on_heartbeat(self, msg: dict) -> None:
        pass   # receiving it refreshed our liveness (``_drain``)

    def _on_welcome(self, msg: dict) -> None:
        self.hello_at = None
        self.interval = float(msg["heartbeat_interval"])
        self.liveness = int(msg["liveness"])
        incarnation = msg.get("incarnation")
        again = (" (the coordinator restarted)" if self.incarnation is not None
                 and incarnation is not None and incarnation != self.incarnation else "")
        self.incarnation = incarnation
        self.event(f"connected to {self.cfg.endpoint} (heartbeat {self.interval:g}s, "
                   f"liveness {self.liveness}){again}")
        self._on_welcome_info(msg)
        if self.state == REPORTING:
            self._send_pending()
        elif self.state == CONNECTING or self.state in states.WAITING:
            self._settle()

    def _on_welcome_info(self, msg: dict) -> None:
        """What the welcome says about the coordinator's harness and dataset. Every welcome
        decides afresh (this machine's harness is hashed again): a worker blocked for a
        mismatch takes work again once a later welcome matches (the coordinator upgraded, or
        the same release reinstalled here)."""
        self.coord_harness = msg.get("harness_fingerprint")
        self.harness_fp = local_harness_fingerprint()
        if self.coord_harness is None or self.coord_harness == self.harness_fp:
            if self.block_reason:
                self.event("harness matches the coordinator's now: taking work again")
            self.block_reason = None
        else:
            self.block_reason = (f"this machine's trainer harness ({self.harness_fp[:12]}) "
                                 f"differs from the coordinator's ({self.coord_harness[:12]})")
            self.event(f"taking no work: {self.block_reason}; install the same "
                       "autoresearch-fleet release here (asking the coordinator which files "
                       "differ)")
            self.harness_req = uuid.uuid4().hex
            self._send("query", req_id=self.harness_req, what="harness", args={})
        want = msg.get("dataset_hash")
        if want != self.want_hash:
            self.want_hash, self.have_hash, self.dataset_dir = want, None, None
            self.want_name = str(msg.get("dataset_name") or "dataset")

    def _on_ack(self, msg: dict) -> None:
        if self.pending is None or self.pending["attempt_id"] != msg["attempt_id"]:
            return
        self.pending = None
        how = "accepted" if msg["accepted"] else "not counted"
        note = f" ({msg['note']})" if msg["note"] else ""
        self.event(f"result {msg['attempt_id']} {how}{note}")
        self._settle()

    def _on_reply(self, msg: dict) -> None:
        req_id = msg["req_id"]
        if req_id == self.enrol_req and self.state == ENROLLING:
            self.enrol_req = None
            if msg["ok"]:
                data = msg["data"] if isinstance(msg["data"], dict) else {}
                self.enrolled = True
                self.event(f"enrolled with the invite as {data.get('name')} "
                           f"(role {data.get('role')})")
                self._to(CONNECTING)
                self._hello()
            else:
                err = msg["data"].get("error") if isinstance(msg["data"], dict) else msg["data"]
                self.event(f"enrolment refused: {err}")
                self._stop(EXIT_TRUST)
        elif req_id == self.harness_req and msg["ok"] and isinstance(msg["data"], dict):
            self.harness_req = None
            theirs = msg["data"].get("files")
            lines = harness_difference(harness_file_hashes(), theirs) \
                if isinstance(theirs, dict) else []
            self.event("harness differs from the coordinator's: "
                       + ("; ".join(lines) if lines else "same files, different fingerprint "
                          "(modified installation?)"))

    def _on_error(self, msg: dict) -> None:
        handler = ERROR_HANDLERS.get(msg["code"])
        if handler is None:
            self.event(f"coordinator error ({msg['code']}): {msg['message']}")
        else:
            handler(self, msg)

    def _on_hello_first(self, msg: dict) -> None:
        """The coordinator does not know us (it restarted, or declared us lost): one hello.
        While that hello is unanswered, further hello_first errors answer what we sent before
        it and are ignored; a second hello (without the attempt an assign may be bringing)
        would cost a lease. Only a hello unanswered for a whole window (lost with a dropped
        connection) is sent again."""
        if self.hello_at is not None and self.clock() - self.hello_at < self.window:
            return
        self.event("the coordinator does not know us (it restarted, or lost us): hello again")
        self._unwelcomed()
        self._hello()

    def _on_untrusted(self, msg: dict) -> None:
        if self.state == ENROLLING:
            return   # our other messages crossed the enrol; its reply decides
        if self.cfg.invite and not self.enrolled and self.state == CONNECTING:
            self.enrol_req = uuid.uuid4().hex
            self.event("the coordinator does not know our key yet: enrolling with the "
                       "invite token")
            self._to(ENROLLING)
            self._send("enrol", req_id=self.enrol_req, token=self.cfg.invite,
                       name=self.cfg.name)
            return
        self._on_refused(msg)

    def _on_refused(self, msg: dict) -> None:
        self.event(f"coordinator refused us ({msg['code']}): {msg['message']}")
        self._stop(EXIT_TRUST)

    def _on_mismatch(self, msg: dict) -> None:
        self.event(f"coordinator gives us no work: {msg['message']}")
        self.hold_until = self.clock() + max(self.cfg.ready_resend, 10.0)
        if self.state == IDLE:
            self._to(HOLDING)

    def _on_version(self, msg: dict) -> None:
        self.event(f"coordinator refused us: {msg['message']}")
        self._stop(EXIT_VERSION)

    def _on_assign(self, msg: dict) -> None:
        attempt_id = msg["attempt_id"]
        if self.state not in states.TAKES_WORK or self.interrupts:
            # The coordinator only assigns on ``ready``; this is a duplicate or a race.
            self.event(f"ignoring assign {attempt_id}: busy with {self._held_attempt()}")
            return
        spec = AttemptSpec(attempt_id=attempt_id, train_py=msg["train_py"],
                           settings=dict(msg["settings"]), timeout=float(msg["timeout"]))
        purpose = msg.get("purpose", "candidate")
        self.event(f"assigned {attempt_id}: {purpose} #{msg['candidate_id']} "
                   f"({msg['commit'][:8]}), timeout {float(msg['timeout']):.0f}s")
        problem = self._preflight()
        # The machine now: the run's first reading, and a last look at the gate (an assign
        # may have crossed an unplugging, or the pause itself).
        self.start_conditions = self._read_conditions()
        if problem is None and self._gating:
            reason = self._judge_gate(self.start_conditions, self.clock())
            if reason:
                problem = f"paused: {reason}"
        if problem is not None:
            self.start_conditions = None
            self._refuse_attempt(attempt_id, f"worker will not run it: {problem}")
            return
        env = dict(self.env)
        if self.dataset_dir is not None:
            env["AUTORESEARCH_DATA"] = str(self.dataset_dir)
        try:
            self.proc = self.start_attempt(spec, self.run_root, env)
        except LowDiskSpace as exc:
            self.hold_until = self.clock() + DISK_BACKOFF
            self._refuse_attempt(attempt_id, f"worker low on disk, waiting {DISK_BACKOFF:g}s: "
                                             f"{exc}")
            return
        except Exception as exc:  # bad id/settings (ValueError) or cannot spawn (OSError)
            note = f"worker could not start the trainer: {type(exc).__name__}: {exc}"
            self.event(f"could not start {attempt_id}: {note}")
            self._report(attempt_id, Outcome.refused(note).to_wire())
            return
        self.attempt_id = attempt_id
        self._to(RUNNING)
        pid = getattr(self.proc, "pid", None)
        if self.cfg.keep_awake and isinstance(pid, int):
            self.awake = KeepAwake.start(pid, system=self.system)
            if self.awake.note and self.awake.argv:
                self.event(f"the machine may sleep during {attempt_id}: {self.awake.note}")

    def _report(self, attempt_id: str, outcome: dict) -> None:
        self.pending = {"attempt_id": attempt_id, "outcome": outcome}
        self._to(REPORTING)
        self._send_pending()

    def _refuse_attempt(self, attempt_id: str, note: str) -> None:
        """Report an assignment as ``cancelled``: the worker's problem, not the candidate's
        (the coordinator requeues it without a strike)."""
        self.event(f"not running {attempt_id}: {note}")
        self._report(attempt_id, Outcome.cancelled(note).to_wire())

    def _on_cancel(self, msg: dict) -> None:
        if self.proc is None or self.attempt_id != msg["attempt_id"]:
            return  # already finished: its result (if any) is reported and recorded as stale
        if self.cancel_at is None:
            self.cancel_at = self.clock() + CANCEL_GRACE
            self.cancel_reason = msg["reason"]
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
        attempt_id = self.attempt_id
        self.proc, self.attempt_id, self.cancel_at = None, None, None
        if self.awake is not None:
            self.awake.stop()
            self.awake = None
        # the machine before and after: the coordinator judges whether it slowed the run
        wire["conditions"] = {"start": self.start_conditions, "end": self._read_conditions()}
        self.start_conditions = None
        bpb = wire.get("val_bpb")
        bpb_s = f" val_bpb {bpb:.4f}" if isinstance(bpb, (int, float)) else ""
        self.event(f"finished {attempt_id}: {wire.get('status')}{bpb_s} "
                   f"in {float(wire.get('wall_seconds') or 0):.1f}s")
        self._report(attempt_id, wire)

    def _handle_interrupts(self) -> None:
        if self.interrupts == 1 and not getattr(self, "_said_finishing", False):
            self._said_finishing = True
            if self.state in states.HOLDS_ATTEMPT:
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
            self._stop(EXIT_INTERRUPTED)
        elif self.interrupts and self.state not in states.HOLDS_ATTEMPT:
            self._leave()   # Ctrl-C holding nothing: leave now


# What the worker does with each message type it receives (checked against the wire schema
# when this module is imported), and with each error code it knows.
HANDLERS: dict[str, Callable[[Agent, dict], None]] = {
    "heartbeat": Agent._on_heartbeat,
    "welcome": Agent._on_welcome,
    "assign": Agent._on_assign,
    "cancel": Agent._on_cancel,
    "ack": Agent._on_ack,
    "reply": Agent._on_reply,
    "error": Agent._on_error,
}
protocol.check_handlers(protocol.WORKER, HANDLERS)

ERROR_HANDLERS: dict[str, Callable[[Agent, dict], None]] = {
    protocol.ERROR_HELLO_FIRST: Agent._on_hello_first,
    protocol.ERROR_UNTRUSTED: Agent._on_untrusted,
    protocol.ERROR_REVOKED: Agent._on_refused,
    protocol.ERROR_FORBIDDEN: Agent._on_refused,
    protocol.ERROR_MISMATCH: Agent._on_mismatch,
    "version": Agent._on_version,
}
