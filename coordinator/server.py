"""The coordinator's ZeroMQ side: one ROUTER socket, one poll loop, no threads.

Shape follows the zguide's Paranoid Pirate queue: every peer message refreshes that worker's
liveness; each heartbeat interval the server sends a heartbeat to every known worker and
declares lost the ones silent for ``interval * liveness`` seconds. All state changes go through
``coordinator.core.Coordinator``; this module only owns the wire and the clock. With a live
dashboard (``snapshot``, a ``coordinator.dashboard.SnapshotHolder``) each loop turn offers it
the status, taken at most once a second; the dashboard's HTTP thread only reads the holder, so
no web request ever runs on this loop.

Identity mapping: a worker's ROUTER identity changes every time it reconnects (new DEALER
socket), so the ``worker_id`` inside each message is the truth and the identity is just where
replies go. A worker the server does not know (it restarted, or the worker's lease was lost)
that sends anything but hello/result/bye is answered with ``error`` code ``hello_first`` (with
this process's ``incarnation``, which ``welcome`` carries too), and the worker says hello once,
carrying the attempt it still holds. A hello that carries no attempt while an assign to that
worker is in flight crossed the assign: the lease is kept and the assign sent again (as for a
ready that crossed one). A hello without the lease the ledger holds means the assign never
reached the worker: cancelled and requeued, never a strike (the same worker id is the same live
process; a worker that crashed comes back with a new id, and its old one goes silent).

Security (``keypair`` given; the CLI always gives one unless ``start --insecure``): the ROUTER is
a CURVE server; ``coordinator.trust.FleetAuthenticator`` (ZAP, in the server's own zmq.Context)
lets every well-formed key finish the handshake and stamps each frame with the sender's public
key, and every message is judged by ``TrustStore.check`` (roles, revocation) before it is
handled. Unknown keys may only ``enrol`` (redeem an invite); anything else is answered with
error ``untrusted`` carrying the peer's key and the admin command that trusts it. A worker_id is
bound to the key that first spoke for it (kept in the ledger, ``trust_worker_ids``, so it holds
across our restarts and after a revoke), so one trusted worker cannot speak for another's
lease; a key may own several worker_ids (several workers on one machine). Every heartbeat tick
the keys of connected workers are looked up again (SQLite reads), so ``autoresearch-coord
revoke`` -- which writes the same ledger from another process -- cuts a worker off within one
interval: it is told ``revoked`` and its lease is lost (candidate requeued). Without a keypair
the server speaks plain TCP and trusts everyone (``--insecure``; the Python API default, kept
for scripts and benchmarks).

Data and harness: with ``dataset`` (a ``shared.datasync.DatasetServer``) the server answers the
workers' ``dataset_manifest``/``dataset_chunk`` queries and ``welcome`` names the dataset hash;
``welcome`` always carries the coordinator's harness fingerprint and ``query harness`` gives the
per-file hashes. A worker whose hello/ready states another harness fingerprint or dataset hash
gets error ``mismatch`` (with the reason) instead of work, and ``status`` shows it.
"""
from __future__ import annotations

import ipaddress
import signal
import socket as pysocket
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq

from coordinator import snapshot
from coordinator import states as st
from coordinator.core import RetryRefused, SubmitRejected
from coordinator.trust import FleetAuthenticator, TrustError, TrustStore
from shared import datasync, protocol
from shared.codec import MAX_FRAME_BYTES, CodecError, decode, encode
from shared.datasync import DataSyncError, harness_file_hashes, harness_fingerprint
from shared.keys import configure_server, fingerprint, peer_key
from shared.outcome import Outcome
from shared.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, RECONNECT_MAX, ProtocolError

# Longest the poll loop sleeps, so a signal-requested shutdown is noticed promptly.
MAX_POLL_SECONDS = 0.25

# Error code telling a worker that this coordinator does not know it (yet): send hello.
HELLO_FIRST = protocol.ERROR_HELLO_FIRST



class QueryRefused(Exception):
    """A query this coordinator cannot answer (no dataset served, no trust list): the reply
    carries ok false and this message."""


def stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def default_event_sink(line: str) -> None:
    print(f"{stamp()} {line}", flush=True)


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach (tcp loopback, ipc, inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or hostname: assume it is reachable from outside


def make_router(ctx: zmq.Context, bind: str, keypair: Any = None) -> zmq.Socket:
    """Create and bind the coordinator's ROUTER socket; a CURVE server when ``keypair`` is
    given (a ZAP handler must already run in ``ctx``)."""
    if bind.startswith("tcp://") and bind.endswith(":0"):
        bind = bind[:-2] + ":*"   # libzmq spells "any free port" as *
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # Frames above the codec's limit are dropped by libzmq before they reach Python.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    if keypair is not None:
        configure_server(sock, keypair)
    sock.bind(bind)
    return sock


def join_endpoint(bound: str) -> str:
    """The endpoint a worker on another machine would type, given what we bound."""
    scheme, _, rest = bound.partition("://")
    if scheme != "tcp":
        return bound
    host, _, port = rest.rpartition(":")
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = pysocket.gethostname()
    return f"tcp://{host}:{port}"


@dataclass
class WorkerConn:
    worker_id: str
    identity: bytes
    name: str
    hw_class: str
    last_seen: float
    attempt_id: str | None = None
    waiting: bool = False     # said ready and got nothing: offer it work when some appears
    key: str | None = None    # its CURVE public key (None on an insecure server)
    harness_fingerprint: str | None = None
    dataset_hash: str | None = None
    mismatch: str | None = None   # why it gets no work (harness/dataset differ), else None
    assign_msg: dict | None = None  # the last assign sent, re-sent if the worker never got it


@dataclass
class Server:
    """Drive a ``Coordinator`` from a ROUTER socket. ``run()`` blocks until ``stop()``."""

    core: Any
    bind: str = "tcp://127.0.0.1:5555"
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    liveness: int = HEARTBEAT_LIVENESS
    event: Callable[[str], None] = default_event_sink
    # Extra seconds, after a restart, for the workers it believed alive to come back (their
    # reconnect backoff tops out at RECONNECT_MAX).
    restart_grace: float = RECONNECT_MAX
    clock: Callable[[], float] = time.monotonic
    # Security and data (see the module docstring). keypair None = plain TCP, everyone trusted.
    keypair: Any = None          # shared.keys.Keypair of the coordinator
    trust: Any = None            # coordinator.trust.TrustStore; default: opened on core.repo_dir
    dataset: Any = None          # shared.datasync.DatasetServer, or None (workers use their own)
    # The live dashboard's coordinator.dashboard.SnapshotHolder, or None: each loop turn offers
    # it the status (taken at most once a second); its HTTP thread only ever reads the holder.
    snapshot: Any = None

    endpoint: str = ""                                   # what we actually bound (port resolved)
    workers: dict[str, WorkerConn] = field(default_factory=dict)
    by_identity: dict[bytes, str] = field(default_factory=dict)
    # Workers the ledger believed alive when we (re)started: one window to say hello again.
    awaiting: dict[str, float] = field(default_factory=dict)
    # Workers gone on the wire whose ledger record failed (worker_id -> (name, lease state,
    # reason)), retried every heartbeat: see _record_gone.
    deferred: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    _stop: bool = False
    asker: str | None = None     # key of the query being answered (query handlers take args only)

    def __post_init__(self) -> None:
        # Names this process to workers (welcome, hello_first): they say hello once to each.
        self.incarnation = uuid.uuid4().hex[:12]
        self.harness_files = harness_file_hashes()
        self.harness_fingerprint = harness_fingerprint(self.harness_files)
        self.dataset_hash = self.dataset.manifest()["dataset_hash"] if self.dataset else None
        self.auth = None
        self._own_trust = False
        if self.keypair is not None:
            # Own context: only one ZAP handler may exist per context, and tests or scripts
            # may run several servers (or clients) in one process.
            self.ctx = zmq.Context()
            self.auth = FleetAuthenticator(self.ctx)
            self.auth.start()
            if self.trust is None:
                self.trust = TrustStore.open(self.core.repo_dir)
                self._own_trust = True
        else:
            self.ctx = zmq.Context.instance()
        try:
            self.sock = make_router(self.ctx, self.bind, self.keypair)
        except Exception:
            self._close_security()
            raise
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def secure(self) -> bool:
        return self.keypair is not None

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def window(self) -> float:
        return self.heartbeat_interval * self.liveness

    def stop(self, *_: Any) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)

    def close(self) -> None:
        self.sock.close(linger=0)
        self._close_security()

    def _close_security(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
            self.ctx.term()
        if self._own_trust and self.trust is not None:
            self.trust.close()
            self._own_trust = False

    def run(self) -> None:
        now = self.clock()
        leased = self.core.leased_workers()
        for wid in sorted(self.core.live_workers()):
            # Every worker the ledger believes alive, lease or not (an idle one that died just
            # before the restart would otherwise stay "idle" forever). One liveness window is
            # not enough: a worker that saw us go silent is in its reconnect backoff (up to
            # RECONNECT_MAX) with its socket closed, still training.
            wait = self.window + self.restart_grace
            self.awaiting[wid] = now + wait
            why = "held a lease" if wid in leased else "was connected"
            self.event(f"waiting {wait:.1f}s for worker {wid} ({why} before restart)")
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_beat = now + self.heartbeat_interval
        while not self._stop:
            timeout = max(0.0, min(next_beat - self.clock(), MAX_POLL_SECONDS))
            try:
                ready = dict(poller.poll(timeout * 1000))
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EINTR:
                    continue
                raise
            if ready.get(self.sock):
                # Drain what is queued, but bounded, so heartbeats still go out under load.
                for _ in range(100):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._on_frames(frames)
            now = self.clock()
            if now >= next_beat:
                self._send_heartbeats()
                self._retry_deferred()
                self._check_keys()
                self._expire(now)
                next_beat = now + self.heartbeat_interval
            if self.snapshot is not None:
                self.snapshot.offer(self._dashboard_status)

    # ---- inbound ------------------------------------------------------------------------

    def _on_frames(self, frames: list) -> None:
        identity = frames[0].bytes
        # The ZAP user id (= sender's public key) rides on every frame of the connection.
        key = peer_key(frames[-1]) if self.secure else None
        try:
            # DEALER peers send one frame; tolerate a REQ-style empty delimiter.
            body = [f.bytes for f in frames[1:] if len(f.bytes)]
            if len(body) != 1:
                raise CodecError(f"expected one message frame, got {len(frames) - 1}")
            raw = decode(body[0])
        except CodecError as exc:
            self._reject(identity, "bad_frame", str(exc), None)
            return
        req_id = raw.get("req_id") if isinstance(raw.get("req_id"), str) else None
        try:
            msg = protocol.validate(raw)
        except ProtocolError as exc:
            self._reject(identity, exc.code, str(exc), req_id)
            return
        if self.trust is not None:
            what = msg.get("what") if msg["type"] == "query" else None
            verdict = self.trust.check(key, msg["type"], what,
                                       server_public=self.keypair.public)
            if not verdict.ok:
                self._refuse(identity, key, verdict, msg, req_id)
                return
        try:
            self._dispatch(identity, msg, key)
        except ProtocolError as exc:
            self._reject(identity, exc.code, str(exc), req_id)
        except Exception as exc:  # a bug or a core refusal must not stop the fleet
            self.event(f"error handling {msg['type']}: {type(exc).__name__}: {exc}")
            self._send(identity, protocol.make(
                "error", code="internal", message=f"{type(exc).__name__}: {exc}",
                **({"req_id": req_id} if req_id else {})))

    def _refuse(self, identity: bytes, key: str | None, verdict: Any, msg: dict,
                req_id: str | None) -> None:
        """A message the trust list does not allow: tell the peer why, and if its key was
        revoked, cut off every worker that key owns right away."""
        extra = {"req_id": req_id} if req_id else {}
        self._send(identity, protocol.make("error", code=verdict.code, message=verdict.message,
                                           **extra))
        who = verdict.entry.name if verdict.entry is not None else \
            (f"key {fingerprint(key)}" if key else self._who(identity))
        if msg["type"] != "heartbeat":   # an untrusted worker's heartbeats would flood the log
            self.event(f"refused {msg['type']} from {who}: {verdict.code}")
        if verdict.code == "revoked" and key:
            self._cut_off_key(key, "key revoked")

    def _reject(self, identity: bytes, code: str, message: str, req_id: str | None) -> None:
        self.event(f"refused message from {self._who(identity)}: {message}")
        extra = {"req_id": req_id} if req_id else {}
        self._send(identity, protocol.make("error", code=code, message=message, **extra))

    def _dispatch(self, identity: bytes, msg: dict, key: str | None = None) -> None:
        handler = HANDLERS.get(msg["type"])
        if handler is None:   # a type only the coordinator sends (welcome, assign, ...)
            raise ProtocolError("unexpected", f"{msg['type']} is not a message the coordinator "
                                "accepts")
        handler(self, identity, msg, key)

    # ---- worker messages ----------------------------------------------------------------

    def _worker_id(self, identity: bytes, msg: dict, key: str | None) -> str | None:
        """The sender's worker_id, checked against the key that owns it; None (after telling
        the peer) when it is missing."""
        wid = msg.get("worker_id")
        if not isinstance(wid, str):  # heartbeat's worker_id is optional in the schema
            self._send(identity, protocol.make(
                "error", code="bad_field", message="heartbeat: worker_id required from workers"))
            return None
        owner = self._owner(wid)
        if key is not None and owner is not None and owner != key:
            raise ProtocolError("forbidden", f"worker id {wid} belongs to another key "
                                f"({fingerprint(owner)}); a worker speaks only for itself")
        return wid

    def _owner(self, wid: str) -> str | None:
        """The key that owns worker id ``wid`` (kept in the ledger: it survives our restarts,
        so right after one no other key can claim a worker id), or None."""
        return self.trust.worker_owner(wid) if self.trust is not None else None

    def _bind(self, wid: str, key: str | None) -> None:
        if key is not None and self.trust is not None and self._owner(wid) is None:
            self.trust.bind_worker(wid, key)

    def _heard(self, identity: bytes, wid: str, key: str | None) -> WorkerConn | None:
        """A worker spoke (anything but hello): refresh its liveness and follow its socket."""
        self._bind(wid, key)   # e.g. a result arriving before hello after our restart
        conn = self.workers.get(wid)
        if conn is not None:
            conn.last_seen = self.clock()
            if conn.identity != identity:  # reconnected without hello: follow the new socket
                self.by_identity.pop(conn.identity, None)
                conn.identity = identity
                self.by_identity[identity] = wid
        return conn

    def _joined(self, identity: bytes, msg: dict, key: str | None) -> WorkerConn | None:
        """The connection of a worker that must have said hello, or None after answering
        ``hello_first`` (we restarted, or lost it)."""
        wid = self._worker_id(identity, msg, key)
        if wid is None:
            return None
        conn = self._heard(identity, wid, key)
        if conn is None:
            self._send(identity, protocol.make(
                "error", code=HELLO_FIRST, message=f"worker {wid} unknown here: send hello",
                incarnation=self.incarnation))
        return conn

    def _on_ready(self, identity: bytes, msg: dict, key: str | None) -> None:
        conn = self._joined(identity, msg, key)
        if conn is None:
            return
        self.core.worker_seen(conn.worker_id)
        if "harness_fingerprint" in msg:
            conn.harness_fingerprint = msg["harness_fingerprint"]
        if "dataset_hash" in msg:
            conn.dataset_hash = msg["dataset_hash"]
        conn.mismatch = self._mismatch(conn.harness_fingerprint, conn.dataset_hash)
        if conn.mismatch:
            conn.waiting = False
            self._send(identity, protocol.make(
                "error", code=protocol.ERROR_MISMATCH,
                message=f"no work for this worker: {conn.mismatch}"))
            return
        # A worker sends ready only when it holds nothing. If we think it holds an attempt,
        # either this ready crossed our assign, or the assign was lost (a connection that
        # dropped and came back inside the liveness window: ZeroMQ reconnects silently and
        # drops what was queued for the old one). Re-send the same assign: a worker that
        # already has it ignores a duplicate, one that lost it starts it. Never a second.
        if conn.attempt_id is None:
            conn.waiting = not self._assign(conn)
        elif conn.assign_msg is not None and conn.assign_msg["attempt_id"] == conn.attempt_id:
            self._send(identity, conn.assign_msg)
            self.event(f"re-sent assign {conn.attempt_id} to {conn.name}: it says it holds "
                       "nothing (lost on a reconnect, or crossed its ready)")

    def _on_heartbeat(self, identity: bytes, msg: dict, key: str | None) -> None:
        conn = self._joined(identity, msg, key)
        if conn is not None:
            self.core.worker_seen(conn.worker_id, msg.get("attempt_id"), msg.get("progress"),
                                  msg.get("paused"))

    def _mismatch(self, harness_fp: str | None, data_hash: str | None) -> str | None:
        """Why a worker with these must not train for us, or None. A worker that states no
        harness fingerprint (an older release, a test peer) is not held to one; with a dataset
        served, the worker must hold exactly it."""
        if harness_fp is not None and harness_fp != self.harness_fingerprint:
            return (f"harness: its trainer harness ({harness_fp[:12]}) differs from the "
                    f"coordinator's ({self.harness_fingerprint[:12]}); install the same "
                    "autoresearch-fleet release on both")
        if self.dataset_hash is not None and data_hash != self.dataset_hash:
            have = data_hash[:12] if data_hash else "none yet"
            return (f"dataset: it holds {have}, the run uses {self.dataset_hash[:12]}; "
                    "the worker fetches it from the coordinator on join")
        return None

    def _on_hello(self, identity: bytes, msg: dict, key: str | None) -> None:
        wid = self._worker_id(identity, msg, key)
        if wid is None:
            return
        old = self.workers.get(wid)
        if old is not None:
            self.by_identity.pop(old.identity, None)
        # A hello without an attempt from a worker we just sent an assign crossed that assign
        # (the worker says hello when told hello_first, before the assign reaches it): keep
        # the lease and send the assign again, as for a ready that crossed one. A worker that
        # already has it ignores the duplicate; one that lost it starts it.
        in_flight = None
        if (old is not None and msg["attempt_id"] is None and old.attempt_id is not None
                and old.assign_msg is not None
                and old.assign_msg["attempt_id"] == old.attempt_id):
            in_flight = old.attempt_id
        self._bind(wid, key)
        conn = WorkerConn(wid, identity, msg["name"], msg["hw_class"], self.clock(),
                          msg["attempt_id"], key=key,
                          harness_fingerprint=msg.get("harness_fingerprint"),
                          dataset_hash=msg.get("dataset_hash"))
        conn.mismatch = self._mismatch(conn.harness_fingerprint, conn.dataset_hash)
        reply = self.core.worker_hello(wid, msg["name"], msg["profile"], msg["hw_class"],
                                       msg["attempt_id"], in_flight=in_flight)
        self.workers[wid] = conn
        self.by_identity[identity] = wid
        self.awaiting.pop(wid, None)
        self.deferred.pop(wid, None)   # back before its loss was recorded: it is not lost
        extra: dict[str, Any] = {"harness_fingerprint": self.harness_fingerprint}
        if self.dataset is not None:
            extra["dataset_hash"] = self.dataset_hash
            extra["dataset_name"] = str(self.dataset.manifest()["name"])
        self._send(identity, protocol.make(
            "welcome", heartbeat_interval=self.heartbeat_interval, liveness=self.liveness,
            incarnation=self.incarnation, **extra))
        held = f", holding {msg['attempt_id']}" if msg["attempt_id"] else ""
        self.event(f"worker {msg['name']} ({wid}) joined [{msg['hw_class']}]{held}")
        if in_flight is not None and reply.reattached:
            conn.attempt_id, conn.assign_msg = in_flight, old.assign_msg
            self._send(identity, conn.assign_msg)
            self.event(f"re-sent assign {in_flight} to {conn.name}: its hello crossed the assign")
        cancel = getattr(reply, "cancel_attempt", None)
        if cancel:
            conn.attempt_id = None
            self._send(identity, protocol.make(
                "cancel", attempt_id=cancel, reason="attempt no longer leased to this worker"))
            self.event(f"cancel {cancel} on {msg['name']}: no longer leased to it")

    def _assign(self, conn: WorkerConn) -> bool:
        a = self.core.next_assignment(conn.worker_id)
        for d in self.core.take_assign_decisions():   # went stale on the way (rebase)
            self.event(describe_decision(d))
        if a is None:
            return False
        conn.attempt_id, conn.waiting = a.attempt_id, False
        fields = dict(attempt_id=a.attempt_id, candidate_id=a.candidate_id, commit=a.commit,
                      train_py=a.train_py, settings=dict(a.settings), timeout=float(a.timeout))
        purpose = getattr(a, "purpose", "candidate")
        conn.assign_msg = protocol.make("assign", purpose=purpose, **fields)
        self._send(conn.identity, conn.assign_msg)
        what = "head" if purpose == "head" else "candidate"
        self.event(f"assign {a.attempt_id} {what} #{a.candidate_id} ({a.commit[:8]}) "
                   f"-> {conn.name} [{conn.hw_class}]")
        return True

    def _offer_work(self) -> None:
        """Something changed (submission, requeue, head measured): wake idle workers now
        rather than when their next ``ready`` comes round. Also called from the timer paths:
        a lease that cannot be written now (sqlite3.OperationalError) waits for the worker's
        next ``ready``."""
        for conn in list(self.workers.values()):
            if conn.waiting and conn.attempt_id is None:
                try:
                    conn.waiting = not self._assign(conn)
                except sqlite3.OperationalError as exc:
                    self.event(f"ledger write failed ({exc}): no assignment now; "
                               "idle workers get one on their next ready")
                    return

    def _on_result(self, identity: bytes, msg: dict, key: str | None) -> None:
        wid = self._worker_id(identity, msg, key)
        if wid is None:
            return
        conn = self._heard(identity, wid, key)   # a result needs no hello: it is idempotent
        attempt_id = msg["attempt_id"]
        outcome = Outcome.from_wire(msg["outcome"])  # the peer's map is untrusted
        ack = self.core.record_result(wid, attempt_id, outcome)
        if conn is not None and conn.attempt_id == attempt_id:
            conn.attempt_id = None
        self._send(identity, protocol.make(
            "ack", attempt_id=attempt_id, accepted=bool(ack.accepted), note=str(ack.note or "")))
        who = conn.name if conn else wid
        bpb_s = f"{outcome.val_bpb:.4f}" if outcome.val_bpb is not None else "-"
        state = "accepted" if ack.accepted else "not counted"
        note = f" ({ack.note})" if ack.note else ""
        self.event(f"result {attempt_id} from {who}: {outcome.status} "
                   f"val_bpb {bpb_s}, {state}{note}")
        for d in getattr(ack, "decisions", None) or []:
            self.event(describe_decision(d))
        self._offer_work()

    def _on_bye(self, identity: bytes, msg: dict, key: str | None) -> None:
        wid = self._worker_id(identity, msg, key)
        if wid is None:
            return
        conn = self._heard(identity, wid, key)
        reason = msg["reason"]
        requeued = self.core.worker_bye(wid, reason)
        self._forget(wid)
        who = conn.name if conn else wid
        self.event(f"worker {who} left: {reason}{_requeued(requeued)}")
        self._offer_work()

    # ---- client messages ----------------------------------------------------------------

    def _reply(self, identity: bytes, req_id: str, data: Any = None,
               error: str | None = None) -> None:
        self._send(identity, protocol.make("reply", req_id=req_id, ok=error is None,
                                           data={"error": error} if error is not None else data))

    def _on_enrol(self, identity: bytes, msg: dict, key: str | None) -> None:
        req_id = msg["req_id"]
        if self.trust is None or key is None:
            self._reply(identity, req_id, error="this coordinator runs without keys "
                        "(--insecure): there is nothing to enrol in")
            return
        try:
            entry = self.trust.redeem_invite(msg["token"], key, msg["name"])
        except TrustError as exc:
            self.event(f"enrolment refused for key {fingerprint(key)}: {exc}")
            self._reply(identity, req_id, error=str(exc))
            return
        self.event(f"enrolled {entry.name} as {entry.role} ({entry.fingerprint})")
        self._reply(identity, req_id, entry.to_dict())

    def _on_submit(self, identity: bytes, msg: dict, key: str | None) -> None:
        req_id = msg["req_id"]
        try:
            data = self.core.submit(msg["train_py"], msg["description"], msg.get("base"),
                                    origin=msg.get("origin"))
        except SubmitRejected as exc:
            self._reply(identity, req_id, error=str(exc))
            self.event(f"submission refused: {_first_line(str(exc))}")
            return
        self._reply(identity, req_id, data)
        self.event(describe_submission(data, msg["description"]))
        self._offer_work()

    def _on_query(self, identity: bytes, msg: dict, key: str | None) -> None:
        what, req_id = msg["what"], msg["req_id"]
        answer = QUERY_HANDLERS.get(what)
        if answer is None:
            self._reply(identity, req_id, error=f"unknown query {what!r}; one of "
                        f"{', '.join(QUERY_HANDLERS)}")
            return
        try:
            self.asker = key   # who asks, for a handler that records it (retry)
            data = answer(self, msg["args"])
        except QueryRefused as exc:
            self._reply(identity, req_id, error=str(exc))
            return
        self._reply(identity, req_id, data)

    # ---- queries: args -> reply data (QueryRefused -> a reply with ok false) ------------

    def _q_status(self, args: dict) -> dict:
        data = self.core.status()
        data = dict(data, connected=sorted(c.name for c in self.workers.values()),
                    not_working={c.name: c.mismatch for c in self.workers.values()
                                 if c.mismatch},
                    security="curve" if self.secure else "insecure",
                    harness_fingerprint=self.harness_fingerprint)
        if self.keypair is not None:
            data["server_key"] = self.keypair.public_str
        if self.trust is not None:
            data["trusted"] = [{"name": e.name, "role": e.role, "fingerprint": e.fingerprint}
                               for e in self.trust.list(include_revoked=False)]
        if self.dataset is not None:
            m = self.dataset.manifest()
            data["dataset"] = {"name": m["name"], "dataset_hash": m["dataset_hash"]}
        return data

    def _dashboard_status(self) -> dict:
        """What ``status`` answers, for the dashboard's holder (which keeps only what the page
        may show: coordinator.dashboard.public_status)."""
        return self._q_status({})

    def _q_log(self, args: dict) -> Any:
        limit = args.get("limit", 50)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ProtocolError("bad_field", "query log: limit must be a positive integer")
        return self.core.log(limit=limit)

    def _q_head(self, args: dict) -> dict:
        return snapshot.head_files(self.core.ledger, self.core.repo_dir)

    def _q_brief(self, args: dict) -> dict:
        decisions = args.get("decisions", snapshot.DEFAULT_DECISIONS)
        if not isinstance(decisions, int) or isinstance(decisions, bool) or not \
                0 < decisions <= snapshot.MAX_DECISIONS:
            raise ProtocolError("bad_field", "query brief: decisions must be an integer in "
                                f"1..{snapshot.MAX_DECISIONS}")
        watch = args.get("watch", [])
        if not isinstance(watch, list) or len(watch) > snapshot.MAX_WATCH or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in watch):
            raise ProtocolError("bad_field", "query brief: watch must be a list of at most "
                                f"{snapshot.MAX_WATCH} candidate ids")
        data = snapshot.proposer_snapshot(self.core.ledger, self.core.repo_dir,
                                          decisions=decisions, watch=watch)
        # Workers that can take work: connected and not refused for a harness/data mismatch.
        data["workers"] = sum(1 for c in self.workers.values() if not c.mismatch)
        return data

    def _q_export(self, args: dict) -> str:
        return self.core.export_tsv()

    def _q_keys(self, args: dict) -> list:
        if self.trust is None:
            raise QueryRefused("this coordinator runs without keys (--insecure): no trust list")
        return [e.to_dict() for e in self.trust.list()]

    def _q_harness(self, args: dict) -> dict:
        return {"fingerprint": self.harness_fingerprint, "files": dict(self.harness_files)}

    def _q_dataset(self, what: str, args: dict) -> Any:
        if self.dataset is None:
            raise QueryRefused("this coordinator serves no dataset")
        try:
            return self.dataset.handle(what, args)
        except DataSyncError as exc:
            raise QueryRefused(str(exc)) from None

    def _q_dataset_manifest(self, args: dict) -> Any:
        return self._q_dataset(datasync.QUERY_MANIFEST, args)

    def _q_dataset_chunk(self, args: dict) -> Any:
        return self._q_dataset(datasync.QUERY_CHUNK, args)

    def _q_retry(self, args: dict) -> dict:
        """An admin queues a failed candidate again (args candidate_id, reason)."""
        entry = self.trust.lookup(self.asker) if self.trust is not None and self.asker else None
        who = entry.name if entry is not None else None
        try:
            data = self.core.retry(args.get("candidate_id"), args.get("reason"),
                                   requested_by=who)
        except RetryRefused as exc:
            raise QueryRefused(str(exc)) from None
        self.event(f"retry #{data['candidate_id']} by {who or 'an admin'}: "
                   f"{data['reason']} (was {data['retried_from']}: "
                   f"{data.get('previous_reason') or '-'}); queued again")
        self._offer_work()
        return data

    # ---- timers -------------------------------------------------------------------------

    def _send_heartbeats(self) -> None:
        beat = encode(protocol.make("heartbeat"))
        for conn in self.workers.values():
            self._send_raw(conn.identity, beat)

    def _check_keys(self) -> None:
        """Cut off connected workers whose key was revoked (or removed) since they joined:
        ``autoresearch-coord revoke`` writes the ledger from another process."""
        if self.trust is None:
            return
        for key in {c.key for c in self.workers.values() if c.key}:
            entry = self.trust.lookup(key)
            if entry is None or not entry.active or entry.role != "worker":
                self._cut_off_key(key, "key revoked" if entry is not None and not entry.active
                                  else "key no longer trusted as a worker")

    def _cut_off_key(self, key: str, reason: str) -> None:
        lost = [wid for wid, conn in self.workers.items() if conn.key == key]
        for wid in lost:
            conn = self.workers[wid]
            entry = self.trust.lookup(key) if self.trust is not None else None
            verdict = self.trust.check(key, "ready", server_public=self.keypair.public) \
                if self.trust is not None else None
            message = verdict.message if verdict is not None and verdict.message else reason
            code = verdict.code if verdict is not None and verdict.code else "revoked"
            self._send(conn.identity, protocol.make("error", code=code, message=message))
            self._forget(wid)
            _, requeued = self._record_gone(wid, conn.name, st.LOST, reason)
            name = entry.name if entry is not None else fingerprint(key)
            self.event(f"worker {conn.name} ({wid}) cut off: {reason} ({name})"
                       f"{_requeued(requeued)}")
        if lost:
            self._offer_work()

    def _expire(self, now: float) -> None:
        before = len(self.workers) + len(self.awaiting)
        for wid, conn in list(self.workers.items()):
            silent = now - conn.last_seen
            if silent > self.window:
                self._forget(wid)
                _, requeued = self._record_gone(wid, conn.name, st.LOST,
                                                f"silent for {silent:.1f}s")
                self.event(f"worker {conn.name} ({wid}) lost: silent {silent:.1f}s"
                           f"{_requeued(requeued)}")
        for wid, deadline in list(self.awaiting.items()):
            if now >= deadline:
                del self.awaiting[wid]
                # Our restart, not the candidate's fault: cancelled, no strike toward LOST_LIMIT.
                _, requeued = self._record_gone(wid, wid, st.CANCELLED,
                                                "did not return after coordinator restart")
                self.event(f"worker {wid} lost: did not return after restart{_requeued(requeued)}")
        if len(self.workers) + len(self.awaiting) != before:
            self._offer_work()

    def _record_gone(self, wid: str, name: str, lease_state: str,
                     reason: str) -> tuple[bool, list[int]]:
        """Record in the ledger that a worker is gone (its lease lost, or cancelled: no strike).
        Called from the timer paths, where nothing else would catch an exception: a failed
        write (disk full, the ledger write-locked by another process beyond the busy timeout)
        must not end the coordinator. Then the change waits in ``deferred`` -- the worker is
        already forgotten on the wire -- and is retried every heartbeat (``_retry_deferred``);
        what it waits for is said once. Returns (recorded, requeued candidate ids)."""
        gone = self.core.worker_lost if lease_state == st.LOST else self.core.worker_bye
        try:
            requeued = gone(wid, reason)
        except sqlite3.OperationalError as exc:
            if wid not in self.deferred:
                self.event(f"ledger write failed ({exc}): worker {name} ({wid}) gone but not "
                           f"yet recorded; retrying every {self.heartbeat_interval:g}s")
            self.deferred[wid] = (name, lease_state, reason)
            return False, []
        if self.deferred.pop(wid, None) is not None:
            self.event(f"ledger writable again: recorded worker {name} ({wid}) "
                       f"{'lost' if lease_state == st.LOST else 'gone'}: {reason}"
                       f"{_requeued(requeued)}")
        return True, list(requeued or [])

    def _retry_deferred(self) -> None:
        recorded = False
        for wid, (name, lease_state, reason) in list(self.deferred.items()):
            done, _ = self._record_gone(wid, name, lease_state, reason)
            if not done:
                return   # still failing: the rest would fail the same way
            recorded = True
        if recorded:
            self._offer_work()

    # ---- helpers ------------------------------------------------------------------------

    def _forget(self, wid: str) -> None:
        conn = self.workers.pop(wid, None)
        if conn is not None:
            self.by_identity.pop(conn.identity, None)
        self.awaiting.pop(wid, None)

    def _who(self, identity: bytes) -> str:
        wid = self.by_identity.get(identity)
        if wid and wid in self.workers:
            return self.workers[wid].name
        return f"peer {identity.hex()[:10]}"

    def _send(self, identity: bytes, msg: dict) -> None:
        self._send_raw(identity, encode(msg))

    def _send_raw(self, identity: bytes, payload: bytes) -> None:
        try:
            self.sock.send_multipart([identity, payload], zmq.NOBLOCK)
        except zmq.Again:
            pass  # peer's queue is full (it is stuck): heartbeats will declare it lost


# What the coordinator does with each message type it receives, and how it answers each query
# kind: both checked against the wire schema (shared.protocol) when this module is imported.
HANDLERS: dict[str, Callable[[Server, bytes, dict, str | None], None]] = {
    "hello": Server._on_hello,
    "ready": Server._on_ready,
    "heartbeat": Server._on_heartbeat,
    "result": Server._on_result,
    "bye": Server._on_bye,
    "submit": Server._on_submit,
    "query": Server._on_query,
    "enrol": Server._on_enrol,
}
QUERY_HANDLERS: dict[str, Callable[[Server, dict], Any]] = {
    "status": Server._q_status,
    "log": Server._q_log,
    "head": Server._q_head,
    "brief": Server._q_brief,
    "export": Server._q_export,
    "keys": Server._q_keys,
    "harness": Server._q_harness,
    "dataset_manifest": Server._q_dataset_manifest,
    "dataset_chunk": Server._q_dataset_chunk,
    "retry": Server._q_retry,
}
protocol.check_handlers(protocol.COORDINATOR, HANDLERS, QUERY_HANDLERS)


def _requeued(ids: Any) -> str:
    ids = list(ids or [])
    return f"; requeued {', '.join(f'#{i}' for i in ids)}" if ids else ""


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def describe_decision(d: Any) -> str:
    """One line for a decision: KEEP / DISCARD / FAIL with the numbers that decided it."""
    get = d.get if isinstance(d, dict) else (lambda k, default=None: getattr(d, k, default))
    verdict = str(get("verdict", None) or "?")
    word = {"kept": "KEEP", "discarded": "DISCARD", "failed": "FAIL", "stale": "STALE"}.get(
        verdict.lower(), verdict.upper())
    parts = [f"{word} #{get('candidate_id', '?')}"]
    desc = get("description", None)
    if desc:
        parts.append(repr(desc))
    if word == "STALE":   # never ran: what it conflicts with, where to resubmit
        parts.append(f": {get('reason', None) or 'stale'}")
        return " ".join(parts)
    if word == "FAIL":
        parts.append(f"[{get('hw_class', None) or '-'}]: {get('reason', None) or 'failed'}")
        return " ".join(parts)
    runs, head_runs = get("runs", None), get("head_runs", None)
    if runs and head_runs:  # mean ± sem (n) each side, and how sure the rule was
        conf = get("confidence", None)
        parts.append(f"val_bpb {runs} vs head {head_runs}"
                     + (f", {100 * conf:.1f}% confident better" if conf is not None else ""))
    else:
        parts.append(f"val_bpb {_fmt(get('val_bpb', None))} vs head "
                     f"{_fmt(get('head_bpb', None))}")
    parts.append(f"[{get('hw_class', None) or '-'}]")
    after = get("head_after", None)
    if word == "KEEP" and after:
        parts.append(f"branch -> {str(after)[:10]}")
    return " ".join(parts)


def describe_submission(data: Any, description: str) -> str:
    if not isinstance(data, dict):
        return f"submission: {description}"
    cid = data.get("candidate_id")
    state = data.get("state") or data.get("status") or "queued"
    dup = " (duplicate of an earlier submission)" if data.get("duplicate") else ""
    return f"submitted #{cid} {state}{dup}: {description}"


def serve(core: Any, bind: str, heartbeat_interval: float = HEARTBEAT_INTERVAL,
          liveness: int = HEARTBEAT_LIVENESS, banner: Callable[[str], None] | None = None,
          keypair: Any = None, dataset: Any = None,
          restart_grace: float = RECONNECT_MAX, snapshot: Any = None) -> None:
    """Run the server until SIGINT/SIGTERM; the caller closes the core afterwards.
    ``keypair`` None = plain TCP (insecure); ``dataset`` = a DatasetServer to serve;
    ``snapshot`` = the live dashboard's SnapshotHolder, fed from the loop."""
    server = Server(core, bind=bind, heartbeat_interval=heartbeat_interval, liveness=liveness,
                    keypair=keypair, dataset=dataset, restart_grace=restart_grace,
                    snapshot=snapshot)
    server.install_signal_handlers()
    try:
        if banner:
            banner(server.endpoint)
        server.run()
    finally:
        server.close()
    print(f"{stamp()} coordinator stopped", file=sys.stdout, flush=True)
