"""Downloading ClimbMix parquet shards: parallel, resumable, retried, atomic.

Each file is fetched into ``<name>.part`` and renamed to its final name only once complete and
recognisably parquet, so a final name always holds a whole file. An interrupted download keeps
its ``.part`` and continues with an HTTP Range request the next time (or on the next retry).
Only the standard library is used (urllib), so this works wherever Python does.
"""
from __future__ import annotations

import http.client
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from filelock import FileLock

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542          # the last shard; pinned as the validation shard
VAL_SHARD = MAX_SHARD
DEFAULT_NUM_SHARDS = 10
DEFAULT_WORKERS = 4
DEFAULT_RETRIES = 5
DEFAULT_TIMEOUT = 60.0    # seconds without data before a connection counts as failed
CHUNK = 1 << 20
USER_AGENT = "autoresearch-fleet-prepare/0.1"
NO_NETWORK_HINT = "(no network?); use --sample or --corpus PATH"


class DownloadError(RuntimeError):
    """A download failed for good; the message is one line meant for the user."""


class _Retryable(Exception):
    """A failure worth another attempt (after backoff)."""


class _Cancelled(Exception):
    """Another file failed for good; stop quietly and keep the .part for a later resume."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def climbmix_shards(num_shards: int) -> tuple[list[int], int]:
    """(training shard indices, validation shard index)."""
    if not 1 <= num_shards <= MAX_SHARD:
        raise ValueError(f"--num-shards must be between 1 and {MAX_SHARD} (got {num_shards})")
    return list(range(num_shards)), VAL_SHARD


# --------------------------------------------------------------------------- progress

class Progress:
    """Download progress on stderr: a redrawn bar on a TTY, else one line per finished file."""

    def __init__(self, total_files: int, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_files = total_files
        self.done_files = 0
        self.expected = 0     # bytes announced by servers so far (files in flight or done)
        self.received = 0     # bytes received in this run
        self.resumed = 0      # bytes already on disk when a file was (re)started
        self.t0 = time.monotonic()
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def start(self, total: int | None, already: int) -> None:
        with self._lock:
            self.expected += total or 0
            self.resumed += already
            self._draw()

    def restart(self, total: int | None, already: int) -> None:
        """A retry of the same file: forget what the previous attempt announced."""
        with self._lock:
            self.expected -= total or 0
            self.resumed -= already

    def add(self, n: int) -> None:
        with self._lock:
            self.received += n
            self._draw()

    def file_done(self, name: str, nbytes: int, seconds: float, resumed: bool) -> None:
        with self._lock:
            self.done_files += 1
            if self.tty:
                self._draw(force=True)
            else:
                how = " (resumed)" if resumed else ""
                self.stream.write(f"downloaded {name}{how}: {nbytes / 1e6:.1f} MB in {seconds:.1f} s "
                                  f"[{self.done_files}/{self.total_files}]\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty:
            with self._lock:
                self._draw(force=True)
                self.stream.write("\n")
                self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        have = self.resumed + self.received
        frac = have / self.expected if self.expected else 0.0
        width = 30
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        rate = self.received / max(now - self.t0, 1e-6) / 1e6
        self.stream.write(f"\r[{bar}] {self.done_files}/{self.total_files} files "
                          f"{have / 1e6:8.1f}/{self.expected / 1e6:.1f} MB {rate:6.1f} MB/s ")
        self.stream.flush()


# --------------------------------------------------------------------------- one file

@dataclass
class FetchPolicy:
    retries: int = DEFAULT_RETRIES      # extra attempts after the first
    backoff: float = 1.0                # seconds before the first retry; doubles each time
    timeout: float = DEFAULT_TIMEOUT


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _unreachable(url: str, reason: object) -> DownloadError:
    return DownloadError(f"cannot reach {_host(url)}: {reason} {NO_NETWORK_HINT}")


def fetch(url: str, dest: Path, policy: FetchPolicy | None = None,
          progress: Progress | None = None, stop: threading.Event | None = None,
          validate: Callable[[Path], str | None] | None = None) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), retrying with exponential backoff.

    ``validate(part_path)`` returns a problem description or None; an invalid file is deleted
    and fetched again. Raises DownloadError with a one-line message when it gives up.
    """
    policy = policy or FetchPolicy()
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    last: object = None
    connect_failures = 0
    attempts = policy.retries + 1
    for attempt in range(attempts):
        if stop is not None and stop.is_set():
            raise _Cancelled()
        if attempt:
            delay = policy.backoff * 2 ** (attempt - 1) * (1 + 0.25 * random.random())
            if stop is not None:
                if stop.wait(delay):
                    raise _Cancelled()
            else:
                time.sleep(delay)
        t0 = time.monotonic()
        try:
            resumed = _fetch_once(url, part, policy.timeout, progress, stop)
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.reason}"
            if e.code in (401, 403, 404, 410):
                raise DownloadError(f"{dest.name}: {last} from {url}") from None
            continue
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, socket.gaierror):  # name lookup failed: no point retrying
                raise _unreachable(url, reason) from None
            last = reason
            if isinstance(reason, (ConnectionRefusedError, OSError, TimeoutError)):
                connect_failures += 1
            continue
        except (_Retryable, http.client.HTTPException, OSError) as e:
            last = e if str(e) else type(e).__name__
            continue
        problem = validate(part) if validate else None
        if problem:
            part.unlink(missing_ok=True)
            last = problem
            continue
        os.replace(part, dest)
        if progress:
            progress.file_done(dest.name, dest.stat().st_size, time.monotonic() - t0, resumed)
        return dest
    if connect_failures == attempts:
        raise _unreachable(url, last)
    raise DownloadError(f"{dest.name}: download failed after {attempts} attempts: {last} ({url})")


def _fetch_once(url: str, part: Path, timeout: float, progress: Progress | None,
                stop: threading.Event | None) -> bool:
    """One attempt; appends to ``part`` when the server honours Range. Returns True if resumed."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Our .part may already be whole (a crash between download and rename).
            total = _content_range_total(e.headers.get("Content-Range"))
            if total is not None and total == have:
                return True
            part.unlink(missing_ok=True)
            raise _Retryable("HTTP 416 for a partial file; starting over") from None
        raise
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        if have and resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Retryable(f"server resumed at byte {start}, expected {have}")
            mode, resumed = "ab", True
        else:
            have, mode, resumed = 0, "wb", False  # no Range support: start over
        total = have + length if length is not None else None
        if progress:
            progress.start(total, have)
        ok = False
        try:
            with open(part, mode) as fh:
                while True:
                    if stop is not None and stop.is_set():
                        raise _Cancelled()
                    chunk = resp.read(CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    if progress:
                        progress.add(len(chunk))
            size = part.stat().st_size
            if total is not None and size != total:
                raise _Retryable(f"connection closed at {size} of {total} bytes")
            ok = True
        finally:
            if progress and not ok:
                progress.restart(total, have)
    return resumed


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _content_range_total(value: str | None) -> int | None:
    # "bytes */200"
    try:
        return int(value.rsplit("/", 1)[1])
    except (AttributeError, IndexError, ValueError):
        return None


def parquet_problem(path: Path) -> str | None:
    """None if ``path`` starts and ends with the parquet magic (catches HTML error pages)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(size - 4, 0))
            tail = fh.read(4)
    except OSError as e:
        return f"cannot read downloaded file: {e}"
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        return "downloaded file is not parquet"
    return None


# --------------------------------------------------------------------------- many files

def download_files(items: list[tuple[str, Path]], workers: int = DEFAULT_WORKERS,
                   policy: FetchPolicy | None = None, stream: TextIO | None = None,
                   tty: bool | None = None,
                   validate: Callable[[Path], str | None] | None = parquet_problem) -> list[Path]:
    """Fetch (url, dest) pairs in a thread pool; files already present are skipped.

    The first file that fails for good stops the others (their .part files stay for resume)
    and its DownloadError is raised.
    """
    if workers < 1:
        raise ValueError(f"--download-workers must be at least 1 (got {workers})")
    stream = stream or sys.stderr
    todo = [(u, Path(d)) for u, d in items if not Path(d).is_file()]
    present = len(items) - len(todo)
    if present:
        stream.write(f"{present} of {len(items)} files already downloaded\n")
        stream.flush()
    if not todo:
        return [Path(d) for _, d in items]
    for _, d in todo:
        d.parent.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(todo), stream=stream, tty=tty)
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=min(workers, len(todo)),
                            thread_name_prefix="download") as pool:
        futures = [pool.submit(fetch, u, d, policy, progress, stop, validate) for u, d in todo]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except KeyboardInterrupt:
            stop.set()
            raise
        finally:
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                stop.set()
            progress.close()
        for f in futures:
            f.cancel()
    errors = [f.exception() for f in futures
              if not f.cancelled() and f.exception() is not None
              and not isinstance(f.exception(), _Cancelled)]
    if errors:
        raise errors[0]
    return [Path(d) for _, d in items]


def download_climbmix(raw_dir: Path, num_shards: int = DEFAULT_NUM_SHARDS,
                      base_url: str = DEFAULT_BASE_URL, workers: int = DEFAULT_WORKERS,
                      policy: FetchPolicy | None = None, stream: TextIO | None = None,
                      tty: bool | None = None) -> tuple[list[Path], Path]:
    """Download training shards 0..num_shards-1 and the pinned validation shard into raw_dir.

    Holds raw_dir/.lock so that two preparers sharing a cache do not write the same .part.
    """
    train_idx, val_idx = climbmix_shards(num_shards)
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    items = [(f"{base}/{shard_name(i)}", raw_dir / shard_name(i)) for i in [*train_idx, val_idx]]
    with FileLock(str(raw_dir / ".lock")):
        paths = download_files(items, workers=workers, policy=policy, stream=stream, tty=tty)
    return paths[:-1], paths[-1]
