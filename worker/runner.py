"""Run one attempt of a train.py as a subprocess, without blocking the worker's poll loop.

Usage from the worker's loop (no sockets here):

    proc = AttemptProcess.start(spec, run_root, env)   # env: base env, e.g. trainer_env(os.environ, threads)
    ...every ~100 ms:
    outcome = proc.poll()          # None while running; enforces timeout and log cap
    heartbeat progress = proc.progress()
    on a cancel message: proc.cancel(reason)   then keep polling until poll() returns the Outcome
    on worker shutdown:  proc.cancel("worker shutting down"); proc.wait(timeout=...)

What happens per attempt:
- ``run_root/<attempt_id>/`` is created fresh (attempt ids must match ``[0-9a-f-]{8,64}``, so an
  id can never name a path outside run_root); ``train.py`` is written into it.
- ``sys.executable train.py`` runs there in its own session / process group, with the caller's
  env plus the run settings (``trainer.settings.RunSettings.to_env()``), AUTORESEARCH_RESULT and
  AUTORESEARCH_PROGRESS pointing into the run dir, and PYTHONUNBUFFERED / PYTHONFAULTHANDLER so
  the log tail shows the last thing the process did.
- stdout+stderr are drained by a thread into ``train.log`` (capped at ``log_limit`` bytes: past
  it the group is killed and the outcome is crash "log limit exceeded"); the last ~8 KB are kept
  in memory for ``Outcome.log_tail``. The child never blocks on the worker's poll rate.
- Timeout (``spec.timeout`` wall seconds) and cancel: SIGTERM to the group, SIGKILL to the group
  ``kill_grace`` seconds later (from a watchdog thread, so it happens even if nobody polls). When the main process exits (for any reason) the rest of its
  group is SIGKILLed too, so forked children never outlive their attempt. The group is signalled
  only while the leader is an unreaped zombie or alive (``os.waitid(..., WNOWAIT)``), so the
  process-group id can't have been recycled.

Classification (status/val_bpb come only from the result file, never from stdout):
  1. cancelled by us                      -> cancelled (whatever the process wrote)
  2. log limit exceeded                   -> crash "log limit exceeded"
  3. valid result.json                    -> its status; ok needs a finite val_bpb, else crash
                                             (a result written before a timeout kill still counts:
                                             the measurement finished, only teardown hung)
  4. killed by us for the timeout         -> timeout
  5. unreadable / invalid result.json     -> crash "bad result file: ..."
  6. no result: exit 3 -> nan, exit 4 -> oom, SIGKILL with out-of-memory words in the log
     tail -> oom (the OS's OOM killer / jetsam leave no result), anything else -> crash.
The exit codes, result statuses and OOM words are the trainer boundary's
(``shared.trainer_contract``); the ``Outcome`` type and its wire form are ``shared.outcome``.

Finished run dirs are pruned to the newest ``keep_runs`` per run_root. Each worker process has
its own run_root (``default_run_root``), so workers sharing one machine and cache never touch
each other's files.

If the worker itself dies (SIGKILL included, on Linux and macOS), its trainer goes with it:
the worker holds the only write end of a *lifeline* pipe; the bootstrap forks a sentinel into
the trainer's group that blocks reading it and SIGKILLs the whole group at EOF (the kernel
closes the worker's end however it dies). A sentinel process, not a thread: it also covers a
trainer stuck in C code or exec'd, and it is killed with the group like everything else (the
bootstrap retires and reaps it when train.py returns). On Linux the trainer also gets
``PR_SET_PDEATHSIG`` = SIGKILL, set only when the attempt is started from the worker's main
thread: the death signal follows the *thread* that forked, and a short-lived thread would kill
a healthy trainer. The worker closes its end once the trainer's group is gone.

Containment of a hostile or broken train.py (it is arbitrary code from an agent):
- Processes. train.py is started through a small bootstrap (``python -c BOOTSTRAP``) that sets
  resource limits and then runs train.py with ``runpy`` as ``__main__`` in the same process.
  Killing the attempt kills its process group, then sweeps descendants that left the group
  (``setsid()``): every process whose parent chain leads to the trainer (read from /proc on
  Linux, ``ps`` elsewhere), and on Linux every process whose initial environment carries this
  attempt's ``AUTORESEARCH_ATTEMPT_TOKEN``. On Linux the trainer is also made a child
  subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so double-forked daemons stay in its tree while
  it lives. The sweep repeats until a round finds nobody new (a fork loop cannot outrun it).
  NOT contained: on Linux, a descendant that leaves the group *and* is orphaned (its parent
  exited) *and* exec'd with an environment that no longer holds the token; on macOS (no /proc),
  any descendant that called setsid() and whose parent chain to the trainer broke before the
  kill (e.g. it outlives a trainer that exited normally). A fork bomb is only stopped at the
  timeout; RLIMIT_NPROC is per user, not per attempt, so it is not set.
- Disk. RLIMIT_FSIZE (soft = hard, so train.py cannot raise it) caps every file the trainer or
  its children write at ``file_size_limit`` bytes (default 2 GiB): the write past it gets
  SIGXFSZ (the bootstrap restores its default action; Python ignores it otherwise) and the
  attempt ends as crash "file size limit exceeded". RLIMIT_CORE = 0: no core dumps. Many files
  below the cap can still fill a disk, so ``start`` refuses to start (``LowDiskSpace``) when the
  run root's file system has less than ``min_free_bytes`` free, and a running attempt is killed
  (crash "disk space low") when free space drops below that, with its scratch files deleted.
- Log. Output past ``log_limit`` kills the attempt (crash "log limit exceeded").
- Time. ``spec.timeout`` wall seconds, then SIGTERM, then SIGKILL.
- Files. The working directory is the run dir, and HOME, TMPDIR/TMP/TEMP point into it
  (``run_dir/home``, ``run_dir/tmp``; XDG_* dirs are unset so they follow HOME), so careless
  writes (``~/.cache/...``, ``tempfile``) land in the run dir and are pruned with it.
  AUTORESEARCH_CACHE (and PYTHONUSERBASE) are pinned to the worker's real paths first.
  MLX's compiled CPU kernels (``$TMPDIR/mlx/<version>/cpu``) are copied in from the worker's
  cache (``AUTORESEARCH_KERNEL_CACHE`` in the worker's env, never the trainer's) before each
  run and new whole ones copied back after a run that exited by itself (worker.kernel_cache).
  This is NOT a sandbox: train.py runs as the worker's user and can read, write or delete
  anything that user can, signal the worker itself, or open network connections. macOS has no
  unprivileged sandbox short of the deprecated sandbox-exec. Run workers as a dedicated user
  with nothing else in its home directory.
- Memory. No RLIMIT_AS / RLIMIT_DATA: MLX reserves large virtual ranges (and Metal maps unified
  memory), so an address-space limit breaks ordinary runs long before it stops a leak. Out of
  memory is left to the OS (OOM killer / jetsam) and classified as oom from the log tail.
- The metric. val_bpb comes only from result.json, never from printed output. But the harness
  runs inside the train.py process, so a train.py can call ``harness.write_result`` (or write
  the file) itself with any number: in-process forgery cannot be prevented here. What limits it
  is that the harness is not part of the submission (its files are checked against the worker's
  release before each run, elsewhere), every kept result is a commit whose train.py anyone can
  read and re-run, and a forged number is caught by re-measuring on another worker.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared.outcome import MAX_DEPTH, Outcome, depth, last_line, plain
from shared.trainer_contract import (
    ENV_CACHE, ENV_DATA, ENV_PROGRESS, ENV_RESULT, RESULT_STATUSES, STATUS_FOR_EXIT, mentions_oom,
)
from trainer.settings import RunSettings
from worker import kernel_cache

__all__ = [
    "AttemptSpec", "Outcome", "AttemptProcess", "default_run_root", "prune_runs",
    "prune_stale_run_roots", "check_attempt_id", "attempt_env", "LowDiskSpace",
    "LOG_LIMIT", "KEEP_RUNS", "KILL_GRACE", "FILE_SIZE_LIMIT", "MIN_FREE_BYTES",
]

ATTEMPT_ID_RE = re.compile(r"[0-9a-f-]{8,64}")
LOG_LIMIT = 64 * 2**20        # bytes of train.log before the attempt is killed
KEEP_RUNS = 20                # finished run dirs kept per run_root
KILL_GRACE = 3.0              # seconds between SIGTERM and SIGKILL
DRAIN_GRACE = 2.0             # after exit, how long to wait for the log pipe to close
TAIL_BYTES = 8192
TAIL_LINES = 60
RESULT_MAX_BYTES = 1 << 20    # a result JSON is ~1 KB; anything huge is not the harness's
PROGRESS_READ_MAX = 64 * 1024 # never read more than this of progress.jsonl per call
FILE_SIZE_LIMIT = 2 * 2**30   # RLIMIT_FSIZE for the trainer: largest file it may write
MIN_FREE_BYTES = 1 * 2**30    # free disk below this under run_root: refuse to start / kill
DISK_CHECK_INTERVAL = 1.0     # seconds between free-space checks while an attempt runs
TOKEN_ENV = "AUTORESEARCH_ATTEMPT_TOKEN"  # marks the trainer's processes (found after setsid)
SWEEP_ROUNDS = 20             # kill sweeps repeat until a round finds nobody new
SCRATCH_DIRS = ("home", "tmp")  # HOME and TMPDIR of the trainer, inside the run dir
RUN_FILES = ("train.py", "train.log", "result.json", "progress.jsonl")

# Runs train.py as __main__ after setting limits the trainer cannot undo. argv: limit,
# lifeline fd, pdeathsig (0|1), path. In-process (runpy), not exec: a fresh
# interpreter would set SIGXFSZ back to ignored.
BOOTSTRAP = """\
import os, sys
def _lifeline(fd, pdeath):
    # The worker holds the only write end of pipe fd. A sentinel child (in the trainer's
    # group, so every kill of the group takes it too) blocks reading it: EOF means the worker
    # is gone, and nothing may keep training for it, so it SIGKILLs the whole group.
    import signal
    if fd < 0:
        return 0
    if pdeath and sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except Exception:
            pass
    pid = os.fork()
    if pid == 0:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # a cancel's SIGTERM is for the trainer
            while os.read(fd, 64):
                pass
        finally:
            os.killpg(0, signal.SIGKILL)
            os._exit(0)
    os.close(fd)
    return pid
def _contain(fsize):
    import resource, signal
    if fsize > 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
        except Exception:
            pass
_contain(int(sys.argv[1]))
_sentinel = _lifeline(int(sys.argv[2]), sys.argv[3] == "1")
del _contain, _lifeline
sys.argv = sys.argv[4:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
import runpy
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    if _sentinel:  # the run is over: retire the sentinel (reaped here, not left a zombie)
        import signal
        try:
            os.kill(_sentinel, signal.SIGKILL)
            os.waitpid(_sentinel, 0)
        except OSError:
            pass
"""

# os.waitid is missing on macOS before Python 3.13; tests flip this to cover the fallback.
_HAVE_WAITID = hasattr(os, "waitid")

# Run dirs of attempts running in this process: pruning never deletes them.
_LIVE_DIRS: set[Path] = set()


@dataclass
class AttemptSpec:
    attempt_id: str
    train_py: str
    settings: dict            # RunSettings research fields (seq_len, eval_tokens, ...)
    timeout: float            # hard wall-clock limit for the whole process, seconds


class LowDiskSpace(OSError):
    """Too little free disk under the run root to start an attempt (the worker's problem,
    not the candidate's)."""


def disk_free(path) -> int:
    """Bytes available to an unprivileged user on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_attempt_id(attempt_id) -> str:
    if not isinstance(attempt_id, str) or not ATTEMPT_ID_RE.fullmatch(attempt_id):
        raise ValueError(f"invalid attempt id {attempt_id!r}: expected 8-64 chars of [0-9a-f-]")
    return attempt_id


def attempt_env(base_env: dict, settings: dict, run_dir: Path,
                token: str | None = None) -> dict[str, str]:
    """The trainer's environment: base env, the run settings, result/progress paths, and a
    scratch HOME / TMPDIR inside the run dir (the paths that need the real home are pinned
    first)."""
    env = {str(k): str(v) for k, v in base_env.items()}
    env.pop(kernel_cache.ENV, None)  # the worker's: it seeds and harvests the kernels itself
    env.update(RunSettings.from_dict(settings).to_env())  # ValueError naming the bad setting
    real_home = env.get("HOME") or os.path.expanduser("~")
    for key in (ENV_CACHE, ENV_DATA):
        if env.get(key):
            env[key] = _expand_home(env[key], real_home)
    if not env.get(ENV_CACHE):
        env[ENV_CACHE] = os.path.join(real_home, ".cache", "autoresearch")
    if not env.get("PYTHONUSERBASE"):  # a `pip install --user` MLX must still import
        import site
        env["PYTHONUSERBASE"] = site.getuserbase()
    for key in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        env.pop(key, None)  # follow the scratch HOME
    env["HOME"] = str(run_dir / "home")
    for key in ("TMPDIR", "TMP", "TEMP"):
        env[key] = str(run_dir / "tmp")
    if token:
        env[TOKEN_ENV] = token
    env[ENV_RESULT] = str(run_dir / "result.json")
    env[ENV_PROGRESS] = str(run_dir / "progress.jsonl")
    env["PYTHONUNBUFFERED"] = "1"      # the log tail should end where the process ended
    env["PYTHONFAULTHANDLER"] = "1"    # a segfault in MLX still leaves a Python traceback
    return env


def _expand_home(path: str, home: str) -> str:
    if path == "~" or path.startswith("~/"):
        return home + path[1:]
    return path


def default_run_root(cache_dir, worker_name: str) -> Path:
    """``<cache>/runs/<worker name>-<pid>``: one per worker process, so several workers can
    share a machine and a cache directory without sharing a mutable file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", worker_name or "").lstrip(".")[:64] or "worker"
    return Path(cache_dir).expanduser() / "runs" / f"{safe}-{os.getpid()}"


def prune_runs(run_root: Path, keep: int = KEEP_RUNS) -> list[Path]:
    """Delete all but the newest ``keep`` finished run dirs in run_root; returns the deleted."""
    run_root = Path(run_root)
    try:
        entries = [d for d in run_root.iterdir()
                   if ATTEMPT_ID_RE.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
                   and d not in _LIVE_DIRS]
    except OSError:
        return []

    def age_key(d: Path):
        try:
            return (d.stat().st_mtime, d.name)
        except OSError:
            return (0.0, d.name)

    entries.sort(key=age_key, reverse=True)
    removed = entries[max(keep, 0):]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def prune_stale_run_roots(cache_dir) -> list[Path]:
    """Delete ``<cache>/runs/<name>-<pid>`` dirs whose worker pid is no longer alive on this
    machine (left behind by workers that were killed). Assumes the cache is machine-local."""
    removed = []
    runs = Path(cache_dir).expanduser() / "runs"
    try:
        roots = list(runs.iterdir())
    except OSError:
        return removed
    for root in roots:
        m = re.fullmatch(r".*-(\d+)", root.name)
        if not m or not root.is_dir() or root.is_symlink():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    except OverflowError:
        return False
    return True


def _process_table() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process we can see."""
    table: dict[int, int] = {}
    if os.path.isdir("/proc/self"):
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields and fields[0] not in (b"Z", b"X"):
                table[int(name)] = int(fields[1])
        return table
    try:  # macOS / BSD
        out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat="],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return table
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            if len(parts) < 3 or not parts[2].startswith("Z"):
                table[int(parts[0])] = int(parts[1])
    return table


def _descendants(root: int, table: dict[int, int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _token_holders(token: str, pids) -> set[int]:
    """Processes (Linux: from /proc/<pid>/environ) started with this attempt's token."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.add(pid)
        except OSError:
            continue  # gone, or another user's
    return found


def _read_regular(path: Path, limit: int) -> bytes:
    """Read a file the trainer made, refusing what would hang or mislead the worker: a FIFO
    (open would block), a device, a symlink, or more than ``limit`` bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise OSError(f"{path.name} is {st.st_size} bytes (limit {limit})")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit + 1]
    finally:
        os.close(fd)


class AttemptProcess:
    """One running attempt. Not thread-safe: drive it from one loop."""

    def __init__(self, spec: AttemptSpec, run_dir: Path, proc: subprocess.Popen, log_file,
                 *, log_limit: int, keep_runs: int, kill_grace: float, token: str = "",
                 file_size_limit: int = FILE_SIZE_LIMIT, min_free_bytes: int = MIN_FREE_BYTES,
                 kernels: Path | None = None):
        self.spec = spec
        self._kernels = kernels  # worker's MLX kernel cache (worker.kernel_cache), or None
        self.run_dir = run_dir
        self.pid = proc.pid
        self._proc = proc
        self._log_limit = log_limit
        self._keep_runs = keep_runs
        self._kill_grace = kill_grace
        self._t0 = time.monotonic()
        self._exit_at: float | None = None
        self._kill_reason: str | None = None   # "timeout" | "cancel" | "log"
        self._cancel_reason = ""
        self._sigkill_at: float | None = None
        self._sigkilled = False
        self._outcome: Outcome | None = None
        self._token = token
        self._lifeline = -1        # write end of the trainer's lifeline pipe (set by start)
        self._file_size_limit = file_size_limit
        self._min_free = min_free_bytes
        self._disk_next = self._t0 + DISK_CHECK_INTERVAL
        self._disk_note = ""
        # log pump state (shared with the reader thread)
        self._lock = threading.Lock()
        self._kill_lock = threading.RLock()
        self._tail = b""
        self._log_bytes = 0
        self._over_limit = False
        # progress reader state
        self._prog_offset = 0
        self._prog_buf = b""
        self._prog_last: dict | None = None
        self._reader = threading.Thread(target=self._pump, args=(proc.stdout, log_file),
                                        name=f"attempt-log-{spec.attempt_id}", daemon=True)
        self._reader.start()

    # ---- public API ---------------------------------------------------------------------

    @classmethod
    def start(cls, spec: AttemptSpec, run_root: Path, env: dict, *, log_limit: int = LOG_LIMIT,
              keep_runs: int = KEEP_RUNS, kill_grace: float = KILL_GRACE,
              file_size_limit: int = FILE_SIZE_LIMIT,
              min_free_bytes: int = MIN_FREE_BYTES) -> "AttemptProcess":
        """Create the run dir, write train.py, start it. Raises ValueError for a bad attempt
        id, timeout or settings (report ``Outcome.refused(str(err))``), LowDiskSpace (an
        OSError) if run_root's disk has less than ``min_free_bytes`` free, OSError if the
        process cannot be started. ``file_size_limit`` <= 0 disables the per-file cap,
        ``min_free_bytes`` <= 0 the free-space checks."""
        check_attempt_id(spec.attempt_id)
        timeout = spec.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"invalid timeout {timeout!r}: expected seconds > 0")
        if not isinstance(spec.train_py, str):
            raise ValueError("train_py must be text")
        # Absolute: the child runs with cwd=run_dir, so relative result paths would miss.
        run_root = Path(run_root).expanduser().absolute()
        run_dir = run_root / spec.attempt_id
        token = f"{spec.attempt_id}:{uuid.uuid4().hex}"
        child_env = attempt_env(env, spec.settings or {}, run_dir, token)  # before the disk

        run_root.mkdir(parents=True, exist_ok=True)
        if min_free_bytes > 0:
            free = disk_free(run_root)
            if free < min_free_bytes:
                raise LowDiskSpace(f"only {free / 2**20:.0f} MiB free under {run_root} (the "
                                   f"worker needs {min_free_bytes / 2**20:.0f} MiB to start a "
                                   f"run): free some disk space")
        if run_dir.is_symlink() or run_dir.is_file():
            run_dir.unlink()
        elif run_dir.exists():
            # Same attempt started again in this run_root (e.g. re-assigned): start clean, so
            # an old result.json can never be read as this run's.
            shutil.rmtree(run_dir)
        run_dir.mkdir()
        for name in SCRATCH_DIRS:
            (run_dir / name).mkdir()
        kernels = Path(env[kernel_cache.ENV]) if env.get(kernel_cache.ENV) else None
        if kernels is not None:  # warm MLX's CPU kernel cache (copies, in the run's TMPDIR)
            kernel_cache.seed(kernels, run_dir / "tmp")
        (run_dir / "train.py").write_text(spec.train_py, encoding="utf-8")
        log_file = open(run_dir / "train.log", "wb")
        fsize = int(file_size_limit) if file_size_limit and file_size_limit > 0 else 0
        # The lifeline (see the module doc): our end is not inheritable, so only this trainer
        # holds the read end and only this process the write end.
        life_r, life_w = os.pipe()
        pdeath = "1" if threading.current_thread() is threading.main_thread() else "0"
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", BOOTSTRAP, str(fsize), str(life_r), pdeath, "train.py"],
                cwd=run_dir, env=child_env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, pass_fds=(life_r,),
            )
        except BaseException:
            log_file.close()
            os.close(life_w)
            raise
        finally:
            os.close(life_r)
        _LIVE_DIRS.add(run_dir)
        attempt = cls(spec, run_dir, proc, log_file, log_limit=log_limit, keep_runs=keep_runs,
                      kill_grace=kill_grace, token=token, file_size_limit=fsize,
                      min_free_bytes=min_free_bytes, kernels=kernels)
        attempt._lifeline = life_w
        return attempt

    @property
    def attempt_id(self) -> str:
        return self.spec.attempt_id

    def poll(self) -> Outcome | None:
        """None while running; the Outcome once the process (and its group) is gone.
        Cheap: a waitid, a clock read and a few flag checks per call."""
        if self._outcome is not None:
            return self._outcome
        now = time.monotonic()
        if self._exit_at is None:
            if not self._leader_exited():
                self._enforce_limits(now)
                return None
            # Leader is a zombie (pid still reserved): kill whatever it left in its group,
            # then reap.
            with self._kill_lock:
                if self._proc.returncode is None:
                    self._signal_group(signal.SIGKILL)
                    self._proc.wait()
                else:
                    # Fallback without waitid: already reaped by _leader_exited(); kill the
                    # stragglers right away (the pid-reuse window is microseconds wide).
                    try:
                        os.killpg(self.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                    self._sweep(signal.SIGKILL, tree=False)
            self._exit_at = now
            self._cut_lifeline()
            self._reader.join(timeout=0.05)
        # Stragglers were just killed, so the pipe closes promptly; but never wait long on
        # a process that escaped the group and holds the pipe.
        if self._reader.is_alive() and now - self._exit_at < DRAIN_GRACE:
            return None
        # The group was SIGKILLed, but its members (the lifeline sentinel at least) are
        # orphans until init reaps them: the attempt is over when its group is empty.
        if self._group_left() and now - self._exit_at < DRAIN_GRACE:
            return None
        self._outcome = self._classify()
        # Keep the kernels of a trainer that exited by itself (a kill can truncate a library).
        if self._kernels is not None and self._kill_reason is None \
                and (self._proc.returncode or 0) >= 0:
            try:
                kernel_cache.harvest(self.run_dir / "tmp", self._kernels)
            except OSError:
                pass  # a cold cache costs time, never the outcome
        self._clean_scratch()
        _LIVE_DIRS.discard(self.run_dir)
        prune_runs(self.run_dir.parent, self._keep_runs)
        return self._outcome

    def progress(self) -> dict | None:
        """The latest complete line of progress.jsonl (None before the first). Reads only
        what was appended since the last call; a partial last line waits for its newline."""
        path = self.run_dir / "progress.jsonl"
        try:
            st = os.lstat(path)
        except OSError:
            return self._prog_last
        if not stat.S_ISREG(st.st_mode):  # a FIFO or symlink would hang or mislead the read
            return self._prog_last
        size = st.st_size
        if size < self._prog_offset:          # replaced or truncated: start over
            self._prog_offset, self._prog_buf = 0, b""
        if size == self._prog_offset:
            return self._prog_last
        start, skip_partial = self._prog_offset, False
        if size - start > PROGRESS_READ_MAX:  # fell far behind: only the end matters
            start, skip_partial = size - PROGRESS_READ_MAX, True
        try:
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
            with os.fdopen(os.open(path, flags), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    return self._prog_last
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            return self._prog_last
        self._prog_offset = start + len(data)
        if skip_partial:
            data = data.split(b"\n", 1)[1] if b"\n" in data else b""
        else:
            data = self._prog_buf + data
        lines = data.split(b"\n")
        self._prog_buf = lines.pop()
        if len(self._prog_buf) > PROGRESS_READ_MAX:
            self._prog_buf = b""
        for line in reversed(lines):
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(obj, dict) and depth(obj) <= MAX_DEPTH:
                self._prog_last = plain(obj)
                break
        return self._prog_last

    def cancel(self, reason: str) -> None:
        """SIGTERM the whole group now; SIGKILL follows after the grace even if nobody polls.
        Returns at once; keep calling poll() to collect Outcome(status="cancelled")."""
        if self._outcome is not None:
            return
        self._cancel_reason = reason or "cancelled"
        if self._kill_reason == "cancel":
            return
        already_killing = self._kill_reason is not None
        self._kill_reason = "cancel"
        if self._exit_at is None and not already_killing:
            self._begin_kill(time.monotonic())

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> Outcome | None:
        """Poll until finished (or ``timeout`` seconds pass: None). For shutdown and tests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outcome = self.poll()
            if outcome is not None or (deadline is not None and time.monotonic() >= deadline):
                return outcome
            time.sleep(interval)

    # ---- internals ----------------------------------------------------------------------

    def _pump(self, pipe, log_file) -> None:
        """Reader thread: pipe -> train.log (up to the cap) and the in-memory tail."""
        fd = pipe.fileno()
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except InterruptedError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                room = self._log_limit - self._log_bytes
                if room > 0:
                    log_file.write(chunk[:room])
                    log_file.flush()
                with self._lock:
                    self._log_bytes += len(chunk)
                    if self._log_bytes > self._log_limit:
                        self._over_limit = True
                    self._tail = (self._tail + chunk)[-TAIL_BYTES:]
        finally:
            log_file.close()
            pipe.close()

    def _group_left(self) -> bool:
        """Anything (even an unreaped zombie) left in the trainer's group? Signal 0 only, so
        asking after the leader was reaped harms nobody."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True   # macOS answers EPERM for a group of zombies
        return True

    def _cut_lifeline(self) -> None:
        """The trainer's group is gone: close our end of its lifeline."""
        fd, self._lifeline = self._lifeline, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _leader_exited(self) -> bool:
        if _HAVE_WAITID:
            try:
                # WNOWAIT: look without reaping, so the pid (= group id) stays reserved
                # until we have killed the rest of the group.
                return os.waitid(os.P_PID, self.pid,
                                 os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
            except ChildProcessError:
                pass
        # No waitid (macOS before Python 3.13): poll() reaps; the group is killed right
        # after, leaving only a microseconds-wide window for pid reuse.
        return self._proc.poll() is not None

    def _enforce_limits(self, now: float) -> None:
        if self._kill_reason is None:
            if self._over_limit:
                self._kill_reason = "log"
                self._signal_group(signal.SIGKILL)  # a runaway printer gets no grace
                self._sigkilled = True
            elif now - self._t0 > self.spec.timeout:
                self._kill_reason = "timeout"
                self._begin_kill(now)
            elif self._min_free > 0 and now >= self._disk_next:
                self._disk_next = now + DISK_CHECK_INTERVAL
                try:
                    free = disk_free(self.run_dir)
                except OSError:
                    return
                if free < self._min_free:
                    self._kill_reason = "disk"
                    self._disk_note = (f"disk space low: {free / 2**20:.0f} MiB free under the "
                                       f"run dir (limit {self._min_free / 2**20:.0f} MiB); "
                                       "killed, scratch files deleted")
                    self._signal_group(signal.SIGKILL)  # every second of writing makes it worse
                    self._sigkilled = True

    def _begin_kill(self, now: float) -> None:
        """SIGTERM the group now; a watchdog thread sends SIGKILL after the grace. A thread,
        not poll(), so a caller that cancels and then stops polling (worker exiting) still
        leaves no trainer behind; non-daemon, so interpreter exit waits for it."""
        self._signal_group(signal.SIGTERM)
        self._sigkill_at = now + self._kill_grace
        threading.Thread(target=self._watchdog, name=f"attempt-kill-{self.attempt_id}",
                         daemon=False).start()

    def _watchdog(self) -> None:
        while time.monotonic() < self._sigkill_at:
            if self._proc.returncode is not None:
                return  # reaped by poll(), which already killed the rest of the group
            time.sleep(0.02)
        self._signal_group(signal.SIGKILL)
        self._sigkilled = True

    def _signal_group(self, sig: int) -> None:
        # The lock orders this against the reap in poll(): once reaped, the group id may
        # belong to someone else, so it is never signalled again.
        with self._kill_lock:
            if self._proc.returncode is not None:
                self._sweep(sig, tree=False)  # token holders can't be someone else's
                return
            # Snapshot the tree first: once the group signal lands, the trainer may die and its
            # escaped children are re-parented at once, out of reach of the parent-link walk.
            table = _process_table()
            before = _descendants(self.pid, table) if self.pid in table else set()
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass  # group already gone (macOS answers EPERM for a group of zombies)
            self._sweep(sig, tree=True, known=before)

    def _sweep(self, sig: int, tree: bool, known: set[int] = frozenset()) -> None:
        """Signal the trainer's processes that left its group (setsid): its descendants by
        parent links (``tree``: only while the leader is unreaped, so its pid is still ours)
        and, on Linux, every process started with this attempt's token. For SIGKILL, repeat
        until a round finds nobody new, so a forking loop cannot outrun it."""
        have_proc = os.path.isdir("/proc/self")
        if not tree and not (self._token and have_proc):
            return
        me = os.getpid()
        done: set[int] = set()
        for round_ in range(SWEEP_ROUNDS if sig == signal.SIGKILL else 1):
            table = _process_table()
            targets = _descendants(self.pid, table) if tree and self.pid in table else set()
            if round_ == 0:
                targets |= set(known)  # taken before the leader was signalled
            if self._token and have_proc:
                targets |= _token_holders(self._token, table)
            targets -= {me, self.pid}
            if sig == signal.SIGKILL:
                targets -= done  # already SIGKILLed: now an exiting zombie, not a survivor
            if not targets:
                return
            for pid in targets:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            done |= targets

    def _clean_scratch(self) -> None:
        """TMPDIR is disposable once the run is over; after a disk kill, so is every file
        the trainer made (only train.py, the log, result and progress are kept)."""
        shutil.rmtree(self.run_dir / "tmp", ignore_errors=True)
        if self._kill_reason != "disk":
            return
        try:
            entries = list(self.run_dir.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name in RUN_FILES and entry.is_file() and not entry.is_symlink():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                try:
                    entry.unlink()
                except OSError:
                    pass

    def _tail_text(self) -> str:
        with self._lock:
            raw = self._tail
        text = raw.decode("utf-8", errors="replace")
        lines = text.splitlines()[-TAIL_LINES:]
        return "\n".join(lines)[-TAIL_BYTES:]

    def _read_result(self) -> tuple[dict, str | None]:
        """(result, problem): ({}, None) if no file; problem is set if it is unusable."""
        path = self.run_dir / "result.json"
        try:
            os.lstat(path)
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            return {}, f"cannot stat result.json: {exc}"
        try:
            data = _read_regular(path, RESULT_MAX_BYTES)
        except OSError as exc:
            return {}, f"result.json unusable: {exc}"
        if len(data) > RESULT_MAX_BYTES:
            return {}, f"result.json grew past {RESULT_MAX_BYTES} bytes"
        try:
            obj = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # RecursionError: "[[[[..." bombs
            return {}, f"result.json unreadable: {type(exc).__name__}: {str(exc)[:200]}"
        if not isinstance(obj, dict):
            return {}, f"result.json holds a {type(obj).__name__}, not an object"
        if depth(obj) > MAX_DEPTH:
            return {}, f"result.json is nested deeper than {MAX_DEPTH} levels"
        obj = plain(obj)
        if obj.get("status") not in RESULT_STATUSES:
            return obj, f"result.json status {obj.get('status')!r} is not one of {RESULT_STATUSES}"
        return obj, None

    def _classify(self) -> Outcome:
        rc = self._proc.returncode
        tail = self._tail_text()
        result, problem = self._read_result()

        def out(status, note="", val_bpb=None):
            return Outcome(status, val_bpb, result, tail, rc,
                           (self._exit_at or time.monotonic()) - self._t0, note)

        if self._kill_reason == "cancel":
            return out("cancelled", f"cancelled: {self._cancel_reason}")
        if self._kill_reason == "log" or self._over_limit:
            return out("crash", f"log limit exceeded ({self._log_limit} bytes)")
        if self._kill_reason == "disk":
            return out("crash", self._disk_note)
        if result and problem is None:
            status = result["status"]
            note = last_line(result.get("error"))  # a traceback ends with the error
            if status != "ok" and "file too large" in str(result.get("error") or "").lower():
                note = (f"file size limit exceeded: a file grew past {self._file_size_limit} "
                        f"bytes; {note}")
            if self._kill_reason == "timeout":
                note = f"result written before the {self.spec.timeout:g}s timeout kill; {note}".rstrip("; ")
            if status == "ok":
                v = result.get("val_bpb")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    return out("crash", f"ok without finite val_bpb ({v!r})")
                return out("ok", note, float(v))
            return out(status, note)
        if self._kill_reason == "timeout":
            return out("timeout", f"no result within {self.spec.timeout:g}s")
        if rc == -signal.SIGXFSZ or (not result and "file too large" in tail.lower()):
            return out("crash", f"file size limit exceeded: a file grew past "
                                f"{self._file_size_limit} bytes (SIGXFSZ)")
        if problem:
            return out("crash", f"bad result file: {problem}")
        if rc in STATUS_FOR_EXIT:
            status = STATUS_FOR_EXIT[rc]
            what = "out of memory" if status == "oom" else status
            return out(status, f"exit code {rc} ({what}) without a result file")
        if rc is not None and rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            if -rc == signal.SIGKILL and mentions_oom(tail):
                return out("oom", f"killed by {name}; the log mentions running out of memory")
            return out("crash", f"killed by {name} without a result file")
        if rc == 0:
            return out("crash", "exited 0 without writing a result file")
        return out("crash", f"exit code {rc} without a result file")
