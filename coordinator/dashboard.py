"""The live dashboard: a small read-only web page that updates itself.

``autoresearch-coord start DIR --dashboard [HOST:]PORT`` serves one page (``coordinator/web``)
that fetches ``/api/snapshot`` every 1.5 s and redraws: the head's val_bpb per hardware class,
the workers with a progress bar of the current run (step, loss, tok/s, seconds left), the
queue, candidates still being measured, recent decisions, the progress plot and each kept
commit's diff (``/api/diff/<candidate id>``, fetched when opened).

How it stays off the coordinator's back:

  * the poll loop calls ``SnapshotHolder.offer(status_fn)`` each turn; at most once per
    ``interval`` (1 s) that runs ``status_fn`` (the same data as ``status``) and stores the
    result. The HTTP thread only reads the holder: no HTTP work ever runs on the loop, and a
    slow or hostile browser cannot delay a heartbeat;
  * the slower-changing half -- the plot's series, kept changes, decisions, noise
    (``coordinator.history``) -- is read by the HTTP thread itself from its own read-only
    ledger connection, recomputed only when the ledger changed (SQLite's ``data_version``) and
    at most every ``HISTORY_EVERY`` seconds; kept diffs are computed once per commit;
  * the plot is drawn by the browser (SVG from the JSON), not by matplotlib in this process,
    which would hold the interpreter lock for every redraw.

What it shows is a whitelist (``public_status``): never keys, fingerprints, the trust list or
invite tokens. It binds loopback unless an address is given explicitly: ``Dashboard`` refuses
a non-loopback host without ``public=True`` (the CLI passes it only when ``--dashboard`` names
a host). On loopback it also refuses requests whose ``Host`` header is not a loopback name, so a
web page elsewhere cannot read it through DNS rebinding.
"""
from __future__ import annotations

import ipaddress
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from coordinator import history

WEB = Path(__file__).with_name("web")
PUBLISH_EVERY = 1.0        # seconds between snapshots the poll loop takes (at most)
HISTORY_EVERY = 3.0        # seconds between history recomputations (at most, when changed)
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


class DashboardError(ValueError):
    """A dashboard address that is malformed or not allowed (the message says why)."""


# ---- where to listen ------------------------------------------------------------------------

def parse_address(text: str) -> tuple[str, int, bool]:
    """``PORT`` | ``HOST:PORT`` | ``[V6]:PORT`` -> (host, port, host_given)."""
    text = str(text).strip()
    m = re.fullmatch(r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d+)|"
                     r"(?P<only>\d+)", text)
    if not m:
        raise DashboardError(f"dashboard address {text!r}: expected PORT or HOST:PORT "
                             "(e.g. 8080, 127.0.0.1:8080, 0.0.0.0:8080)")
    port = int(m.group("port") or m.group("only"))
    if not 0 <= port <= 65535:
        raise DashboardError(f"dashboard port {port} is out of range (0-65535)")
    if m.group("only"):
        return "127.0.0.1", port, False
    return (m.group("v6") or m.group("host")), port, True


def is_loopback_host(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False    # a hostname or interface: assume others can reach it


# ---- the snapshot the poll loop publishes ---------------------------------------------------

class SnapshotHolder:
    """The latest status, published by the poll loop, read by the HTTP thread (thread-safe).

    ``offer(fn)`` is what the loop calls every turn: cheap unless ``interval`` has passed, then
    it stores ``fn()``. The stored dict is replaced, never mutated, so a reader holding the old
    one is safe."""

    def __init__(self, interval: float = PUBLISH_EVERY, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._data: dict | None = None
        self._seq = 0
        self._at = 0.0             # wall time of the last publish
        self._next = 0.0

    def offer(self, fn: Callable[[], dict]) -> bool:
        now = self.clock()
        if now < self._next:
            return False
        self._next = now + self.interval
        self.publish(fn())
        return True

    def publish(self, data: dict) -> None:
        with self._lock:
            self._data = data
            self._seq += 1
            self._at = time.time()

    def get(self) -> tuple[int, dict | None, float]:
        with self._lock:
            return self._seq, self._data, self._at


# ---- what the page may see ------------------------------------------------------------------

def _pick(d: Any, keys: tuple[str, ...]) -> dict:
    return {k: d.get(k) for k in keys if k in d} if isinstance(d, dict) else {}


WORKER_KEYS = ("name", "hw_class", "state", "candidate_id", "purpose", "last_seen",
               "gone_reason", "paused", "seed_index")
PROGRESS_KEYS = ("step", "progress", "loss", "tok_per_sec", "elapsed", "dt")
HEAD_KEYS = ("hw_class", "val_bpb", "runs", "failed_runs", "state", "commit", "sem", "sigma",
             "sigma_source", "noise", "drift", "text")
QUEUE_KEYS = ("candidate_id", "description", "submitted")
MEASURED_KEYS = ("candidate_id", "description", "state", "hw_class", "val_bpb", "waiting_for",
                 "runs", "runs_wanted")
SETTING_KEYS = ("time_budget", "margin", "seq_len", "timeout")


def public_status(status: dict | None) -> dict | None:
    """The part of ``status`` the page shows, by whitelist: no keys, fingerprints, trust list,
    invite tokens, server key, worker ids or profiles -- whatever ``status`` grows later."""
    if not isinstance(status, dict):
        return None
    workers = []
    for w in status.get("workers") or []:
        item = _pick(w, WORKER_KEYS)
        item["progress"] = _pick(w.get("progress"), PROGRESS_KEYS) or None
        workers.append(item)
    out = {
        "tag": status.get("tag"), "branch": status.get("branch"),
        "head": status.get("head"), "head_candidate": status.get("head_candidate"),
        "heads": [_pick(h, HEAD_KEYS) for h in status.get("heads") or []],
        "workers": workers,
        "queue": [_pick(q, QUEUE_KEYS) for q in status.get("queue") or []],
        "measured": [_pick(m, MEASURED_KEYS) for m in status.get("measured") or []],
        "counts": {k: v for k, v in (status.get("counts") or {}).items()
                   if isinstance(v, int)},
        "problems": [str(p) for p in status.get("problems") or []],
        "settings": _pick(status.get("settings"), SETTING_KEYS),
        "not_working": {str(k): str(v) for k, v in (status.get("not_working") or {}).items()},
    }
    if isinstance(status.get("in_progress"), list):    # candidates with runs, not decided
        out["in_progress"] = [_pick(m, MEASURED_KEYS) for m in status["in_progress"]]
    return out


class HistoryCache:
    """``coordinator.history`` for the page, from a read-only ledger of its own, recomputed
    only when the ledger changed and at most every ``every`` seconds."""

    def __init__(self, repo_dir: Path, every: float = HISTORY_EVERY):
        self.repo_dir = Path(repo_dir)
        self.every = every
        self._lock = threading.Lock()
        self._ledger = None
        self._version: Any = None
        self._at = 0.0
        self._data: dict = {"progress": [], "kept": [], "decisions": [], "noise": []}
        self.diffs: dict[str, str] = {}
        self.error: str | None = None

    def get(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if now - self._at < self.every:
                return self._data
            self._at = now
            try:
                if self._ledger is None:
                    self._ledger = history.open_run(self.repo_dir)
                version = (self._ledger.scalar("PRAGMA data_version"),
                           self._ledger.scalar("SELECT COUNT(*) FROM attempts"))
                if version != self._version:
                    with self._ledger.reading():
                        kept = history.kept(self._ledger, self.repo_dir, self.diffs)
                        self._data = {
                            "progress": history.progress(self._ledger),
                            "kept": [{k: v for k, v in item.items() if k != "diff"}
                                     for item in kept],
                            "decisions": history.decisions(self._ledger, limit=15),
                            "noise": history.noise(self._ledger)}
                    self._version = version
                self.error = None
            except Exception as exc:   # shown on the page; the next request tries again
                self.error = f"{type(exc).__name__}: {exc}"
            return self._data

    def diff(self, cid: int) -> str | None:
        with self._lock:
            for k in self._data.get("kept", []):
                if k["candidate_id"] == cid:
                    return self.diffs.get(k["commit"])
        return None

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None


# ---- the HTTP side --------------------------------------------------------------------------

class Dashboard:
    """Serve the page from a daemon thread; ``start()`` binds (DashboardError if not allowed or
    the port is taken), ``url`` says where, ``stop()`` ends it."""

    def __init__(self, holder: SnapshotHolder, repo_dir: Path, host: str = "127.0.0.1",
                 port: int = 0, public: bool = False):
        if not is_loopback_host(host) and not public:
            raise DashboardError(
                f"refusing to serve the dashboard on {host}: it would be readable from other "
                f"machines; give the address explicitly (--dashboard {host}:{port or 8080}) "
                "if that is what you want")
        self.holder = holder
        self.repo_dir = Path(repo_dir)
        self.host, self.port = host, port
        self.loopback = is_loopback_host(host)
        self.history = HistoryCache(self.repo_dir)
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> "Dashboard":
        handler = type("Handler", (_Handler,), {"dash": self})
        server_cls = ThreadingHTTPServer
        if ":" in self.host:
            import socket

            server_cls = type("Server6", (ThreadingHTTPServer,),
                              {"address_family": socket.AF_INET6})
        try:
            self.httpd = server_cls((self.host.strip("[]"), self.port), handler)
        except OSError as exc:
            raise DashboardError(f"cannot serve the dashboard on {self.host}:{self.port}: "
                                 f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.25}, name="dashboard",
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        self.history.close()

    def snapshot(self) -> dict:
        seq, data, at = self.holder.get()
        hist = self.history.get()
        return {"seq": seq, "published_at": at, "age": time.time() - at if at else None,
                "status": public_status(data), "history": hist,
                "history_error": self.history.error, "now": time.time()}


def _finite(obj: Any) -> Any:
    """NaN/inf (a diverging run's loss) -> None: JSON has no spelling for them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class _Handler(BaseHTTPRequestHandler):
    dash: Dashboard
    server_version = "autoresearch-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:   # noqa: A002 (stdlib's name)
        pass    # the coordinator's terminal is for the fleet's events, not page loads

    def _host_ok(self) -> bool:
        if not self.dash.loopback:
            return True
        host = (self.headers.get("Host") or "").strip()
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return name in LOOPBACK_NAMES

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 (stdlib's name)
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok():
            self._send(421, b"misdirected request: this dashboard answers to localhost only\n",
                       "text/plain; charset=utf-8")
            return
        path = self.path.split("?", 1)[0]
        if path in ASSETS:
            name, ctype = ASSETS[path]
            self._send(200, (WEB / name).read_bytes(), ctype)
        elif path == "/api/snapshot":
            body = json.dumps(_finite(self.dash.snapshot()), default=str,
                              allow_nan=False).encode()
            self._send(200, body, "application/json")
        elif m := re.fullmatch(r"/api/diff/(\d{1,12})", path):
            diff = self.dash.history.diff(int(m.group(1)))
            if diff is None:
                self._send(404, b"no kept candidate with that id\n", "text/plain; charset=utf-8")
            else:
                self._send(200, diff.encode("utf-8", "replace"), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _refuse(self) -> None:
        self._send(405, b"read-only\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse
