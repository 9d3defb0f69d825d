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
DISK_BACKOFF = 60.0       # after LowDiskSpace, seconds before asking for work again
FETCH_RETRY = 30.0        # after a failed dataset fetch, seconds before trying again
FETCH_REQUEST_TIMEOUT = 30.0   # one dataset query's reply

EXIT_OK = 0
EXIT_VERSION = 2
EXIT_TRUST = 3            # untrusted / revoked / forbidden: an admin must act
EXIT_SERVER_KEY = 4       # the coordinator does not hold the pinned key
EXIT_INTERRUPTED = 130

TEST_HARNESS_ENV = "AUTORESEARCH_TEST_HARNESS_FINGERPRINT"   # test-only override

HELLO_FIRST = protocol.ERROR_HELLO_FIRST


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def default_event_sink(line: str) -> None:
    print(f"{stamp()} {line}", flush=True)


def make_dealer(ctx: zmq.Context, endpoint: str, keypair: Any = None,
                server_key: Any = None) -> zmq.Socket:
    """Create and connect a DEALER; a CURVE client pinned to ``server_key`` with a keypair."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if keypair is not None:
        from shared.keys import configure_client
        configure_client(sock, keypair, server_key)
    sock.connect(endpoint)
    return sock


def local_harness_fingerprint() -> str:
    """This machine's harness fingerprint (or the test-only override)."""
    override = os.environ.get(TEST_HARNESS_ENV)
    if override:
        return override
    from shared.datasync import harness_fingerprint
    return harness_fingerprint()


def dataset_problem(path: Path | None, want_hash: str) -> str | None:
    """Quick pre-run check of a fetched dataset: its manifest is self-consistent, names
    ``want_hash``, and every file has its manifest size. None when fine."""
    from shared.datasync import DataSyncError, check_manifest
    from trainer.dataset import DatasetError, read_manifest

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


class Requester:
    """Request/reply over a DEALER of its own (the dataset fetch thread's connection): same
    endpoint, same keys, same trust as the agent's main socket."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keypair: Any, server_key: Any,
                 timeout: float = FETCH_REQUEST_TIMEOUT, retries: int = 3):
        self.ctx, self.endpoint = ctx, endpoint
        self.keypair, self.server_key = keypair, server_key
        self.timeout, self.retries = timeout, retries
        self.sock: zmq.Socket | None = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def ask(self, what: str, args: dict) -> Any:
        """Send ``query what args``; return the reply data; DataSyncError on a refusal or when
        ``retries`` requests in a row get no answer."""
        from shared.datasync import DataSyncError

        for _ in range(self.retries):
            if self.sock is None:
                self.sock = make_dealer(self.ctx, self.endpoint, self.keypair, self.server_key)
            req_id = uuid.uuid4().hex
            self.sock.send(encode(protocol.make("query", req_id=req_id, what=what, args=args)))
            deadline = time.monotonic() + self.timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(left * 1000):
                    self.close()   # a late reply must never answer the next request
                    break
                try:
                    msg = protocol.validate(decode(self.sock.recv()))
                except (CodecError, ProtocolError):
                    continue
                if msg.get("req_id") != req_id:
                    continue
                if msg["type"] == "error":
                    raise DataSyncError(f"coordinator refused {what}: {msg['message']}")
                if msg["type"] != "reply":
                    continue
                if not msg["ok"]:
                    data = msg["data"]
                    raise DataSyncError(str(data.get("error") if isinstance(data, dict)
                                            else data))
                return msg["data"]
        raise DataSyncError(f"coordinator at {self.endpoint} did not answer {what} "
                            f"({self.retries} tries of {self.timeout:g} s)")


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
    keypair: Any = None          # shared.keys.Keypair of this worker; None = --insecure
    server_key: Any = None       # the coordinator's pinned public key (Z85)
    invite: str | None = None    # one-time token to enrol with if the coordinator lacks our key


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
        self.env = dict(env if env is not None else
                        trainer_environment(config.cache_dir, config.threads))
        from worker import kernel_cache  # one warm MLX kernel cache per worker, across runs
        self.env.setdefault(kernel_cache.ENV,
                            str(kernel_cache.default_dir(config.cache_dir, config.name)))
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
        self.next_result = float("inf")    # when to send the unacked result again
        self.cancel_at: float | None = None  # when to kill the attempt the coordinator cancelled
        self.cancel_reason = ""
        self.interrupts = 0
        self.exit_code: int | None = None

        self.monitor: Any = None           # HandshakeMonitor of the current socket
        self.enrol_req: str | None = None  # req_id of our enrol, while it is in flight
        self.enrolled = False
        self.harness_fp = local_harness_fingerprint()
        self.coord_harness: str | None = None   # from welcome
        self.want_hash: str | None = None       # coordinator's dataset hash (None: serves none)
        self.want_name = ""
        self.dataset_dir: Path | None = None    # fetched dataset matching want_hash
        self.have_hash: str | None = None
        self.fetch_thread: threading.Thread | None = None
        self.fetch_result: tuple | None = None
        self.fetch_retry_at = 0.0
        self.harness_req: str | None = None
        self.blocked: str | None = None    # why this worker takes no work (harness mismatch)
        self.hold_until = 0.0              # no ready before this (low disk back-off)

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
        from shared.keys import HandshakeMonitor

        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if self.cfg.keypair is not None:
            from shared.keys import configure_client
            configure_client(sock, self.cfg.keypair, self.cfg.server_key)
        self.monitor = HandshakeMonitor(sock)
        sock.connect(self.cfg.endpoint)
        self.sock = sock
        self.poller.register(self.sock, zmq.POLLIN)
        self.welcomed = False
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
        self.welcomed = False

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
            from shared.keys import fingerprint
            self.event(f"the coordinator at {self.cfg.endpoint} does not have the pinned key "
                       f"{fingerprint(self.cfg.server_key)} -- refusing to run anything")
        self.exit_code = EXIT_SERVER_KEY

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> int:
        self.event(f"worker {self.cfg.name} ({self.worker_id}) [{self.hw_class}] "
                   f"joining {self.cfg.endpoint}")
        if self.cfg.keypair is not None:
            from shared.keys import fingerprint
            self.event(f"this worker's key: {self.cfg.keypair.public_str} "
                       f"(fingerprint {fingerprint(self.cfg.keypair.public)}); coordinator key "
                       f"pinned: {fingerprint(self.cfg.server_key)}")
        else:
            self.event("insecure: no keys (the coordinator must run with --insecure)")
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
            self._check_handshake()
            if self.exit_code is not None:
                return
            if events.get(self.sock):
                self._drain()
        self._handle_interrupts()
        if self.exit_code is not None:
            return
        # Check the trainer before liveness: a result that finished while we were frozen
        # (SIGSTOP, lid closed) is reported even if the coordinator has since moved on.
        self._poll_attempt()
        self._poll_fetch()
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
        if self.welcomed and self.pending is not None and now >= self.next_result:
            self._send_pending()
        if self.interrupts and self.proc is None and self.pending is None:
            self._send("bye", worker_id=self.worker_id, reason="worker stopped by its operator")
            self.event("leaving: bye sent")
            self.exit_code = EXIT_OK
            return
        if (self.welcomed and self.proc is None and self.pending is None
                and not self.interrupts and now >= self.next_ready and self._may_work(now)):
            self._send("ready", worker_id=self.worker_id, harness_fingerprint=self.harness_fp,
                       dataset_hash=self.have_hash)
            self.next_ready = now + self.cfg.ready_resend

    def _may_work(self, now: float) -> bool:
        if self.blocked or now < self.hold_until:
            return False
        if self.want_hash is None:
            return True   # the coordinator serves no dataset: runs use this machine's own
        if self.have_hash != self.want_hash:
            if self.fetch_thread is None and now >= self.fetch_retry_at:
                self._start_fetch()
            return False
        return True

    # ---- dataset ------------------------------------------------------------------------

    def _start_fetch(self) -> None:
        from shared.datasync import fetch_dataset

        want, name = self.want_hash, self.want_name
        self.event(f"fetching dataset {name} ({want[:12]}) from the coordinator "
                   f"into {self.cfg.cache_dir}")
        bar = ProgressBar(f"dataset {name}")
        endpoint, keypair, server_key = self.cfg.endpoint, self.cfg.keypair, self.cfg.server_key
        cache_dir, log = self.cfg.cache_dir, self.event

        def work() -> None:
            req = Requester(self.ctx, endpoint, keypair, server_key)
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
                self.next_ready = self.clock()
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
                self.blocked = (f"harness changed on this machine: fingerprint {mine[:12]} "
                                f"!= coordinator's {self.coord_harness[:12]}")
                return self.blocked
        if self.want_hash is not None:
            problem = dataset_problem(self.dataset_dir, self.want_hash)
            if problem is not None:
                self.have_hash = None     # fetch it again (a re-fetch repairs and verifies)
                return problem
        return None

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
                self._send_pending()
            self._on_welcome_info(msg)
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
        elif t == "reply":
            self._on_reply(msg)
        elif t == "error":
            code = msg["code"]
            if code == HELLO_FIRST:
                self._hello()
            elif code == protocol.ERROR_UNTRUSTED and self.cfg.invite and not self.enrolled \
                    and self.enrol_req is None:
                self.enrol_req = uuid.uuid4().hex
                self.event("the coordinator does not know our key yet: enrolling with the "
                           "invite token")
                self._send("enrol", req_id=self.enrol_req, token=self.cfg.invite,
                           name=self.cfg.name)
            elif code == protocol.ERROR_UNTRUSTED and self.enrol_req is not None:
                pass   # our other messages crossed the enrol; its reply decides
            elif code in (protocol.ERROR_UNTRUSTED, protocol.ERROR_REVOKED,
                          protocol.ERROR_FORBIDDEN):
                self.event(f"coordinator refused us ({code}): {msg['message']}")
                self.exit_code = EXIT_TRUST
            elif code == protocol.ERROR_MISMATCH:
                self.event(f"coordinator gives us no work: {msg['message']}")
                self.next_ready = self.clock() + max(self.cfg.ready_resend, 10.0)
            elif msg["code"] == "version":
                self.event(f"coordinator refused us: {msg['message']}")
                self.exit_code = EXIT_VERSION
            else:
                self.event(f"coordinator error ({msg['code']}): {msg['message']}")
        else:
            self.event(f"ignoring unexpected {t} from coordinator")

    def _on_welcome_info(self, msg: dict) -> None:
        self.coord_harness = msg.get("harness_fingerprint")
        if self.coord_harness is not None and self.coord_harness != self.harness_fp:
            self.blocked = (f"this machine's trainer harness ({self.harness_fp[:12]}) differs "
                            f"from the coordinator's ({self.coord_harness[:12]})")
            self.event(f"taking no work: {self.blocked}; install the same autoresearch-fleet "
                       "release here (asking the coordinator which files differ)")
            self.harness_req = uuid.uuid4().hex
            self._send("query", req_id=self.harness_req, what="harness", args={})
        want = msg.get("dataset_hash")
        if want != self.want_hash:
            self.want_hash, self.have_hash, self.dataset_dir = want, None, None
            self.want_name = str(msg.get("dataset_name") or "dataset")

    def _on_reply(self, msg: dict) -> None:
        req_id = msg["req_id"]
        if req_id == self.enrol_req:
            self.enrol_req = None
            if msg["ok"]:
                data = msg["data"] if isinstance(msg["data"], dict) else {}
                self.enrolled = True
                self.event(f"enrolled with the invite as {data.get('name')} "
                           f"(role {data.get('role')})")
                self._hello()
            else:
                err = msg["data"].get("error") if isinstance(msg["data"], dict) else msg["data"]
                self.event(f"enrolment refused: {err}")
                self.exit_code = EXIT_TRUST
        elif req_id == self.harness_req and msg["ok"] and isinstance(msg["data"], dict):
            self.harness_req = None
            from shared.datasync import harness_difference, harness_file_hashes
            theirs = msg["data"].get("files")
            lines = harness_difference(harness_file_hashes(), theirs) \
                if isinstance(theirs, dict) else []
            self.event("harness differs from the coordinator's: "
                       + ("; ".join(lines) if lines else "same files, different fingerprint "
                          "(modified installation?)"))

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
        from worker.runner import LowDiskSpace, Outcome
        problem = self._preflight()
        if problem is not None:
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
            self.pending = {"attempt_id": attempt_id, "outcome": Outcome.refused(note).to_wire()}
            self._send_pending()
            return
        self.attempt_id = attempt_id

    def _refuse_attempt(self, attempt_id: str, note: str) -> None:
        """Report an assignment as ``cancelled``: the worker's problem, not the candidate's
        (the coordinator requeues it without a strike)."""
        from worker.runner import Outcome
        self.event(f"not running {attempt_id}: {note}")
        self.pending = {"attempt_id": attempt_id,
                        "outcome": Outcome("cancelled", None, {}, "", None, 0.0, note).to_wire()}
        self._send_pending()

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
        self._send_pending()

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
