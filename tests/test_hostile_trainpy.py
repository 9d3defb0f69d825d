"""A hostile or broken train.py, run for real by worker.runner: what is contained, and the
documented limits (see the runner's module docstring, "Containment").

Stand-in scripts fake a run without MLX. Printed-metric forgery, gigabytes of output and
sleeping forever are covered in test_runner.py (test_printed_val_bpb_is_never_trusted,
test_log_limit_kills_and_crashes, test_timeout_*).
"""
from __future__ import annotations

import json
import os
import signal
import textwrap
import uuid
from pathlib import Path

import msgpack
import pytest

import worker.runner as runner
from worker.runner import (
    FILE_SIZE_LIMIT, AttemptProcess, AttemptSpec, LowDiskSpace, Outcome, default_run_root,
)

from runner_standins import (  # noqa: E402  (shared with test_runner.py)
    PRELUDE, SETTINGS, alive, finish, read_pids, start, wait_until,
)

LINUX = os.path.isdir("/proc/self")


def end(proc: AttemptProcess, how: str) -> Outcome:
    if how == "cancel":
        proc.cancel("test")
    return finish(proc)


# ---- processes that leave the group ---------------------------------------------------------

ESCAPE = textwrap.dedent("""
    if os.fork() == 0:
        os.setsid()                    # leaves the attempt's process group and session
        note_pid("escaped")
        time.sleep(1000)
        os._exit(0)
    wait_for("escaped")
""")

DAEMON = textwrap.dedent("""
    if os.fork() == 0:                 # classic double fork: the middle process exits at once
        os.setsid()
        if os.fork() == 0:
            note_pid("daemon")
            time.sleep(1000)
            os._exit(0)
        os._exit(0)
    wait_for("daemon")
""")

TAILS = {"cancel": "time.sleep(60)", "timeout": "time.sleep(60)",
         "exit": "write_result('ok', val_bpb=2.0)"}
STATUS = {"cancel": "cancelled", "timeout": "timeout", "exit": "ok"}


@pytest.mark.parametrize("how", ["cancel", "timeout",
                                 pytest.param("exit", marks=pytest.mark.skipif(
                                     not LINUX, reason="macOS: orphan after setsid escapes"))])
def test_setsid_child_is_killed(tmp_path, how):
    proc = start(tmp_path, ESCAPE + TAILS[how], timeout=1.0 if how == "timeout" else 30.0)
    (escaped,) = read_pids(proc, "escaped")
    out = end(proc, how)
    assert out.status == STATUS[how]
    wait_until(lambda: not alive(escaped), "escaped child's death")


@pytest.mark.parametrize("how", [
    pytest.param("cancel", marks=pytest.mark.skipif(not LINUX, reason="needs a subreaper")),
    pytest.param("exit", marks=pytest.mark.skipif(not LINUX, reason="needs /proc"))])
def test_double_forked_daemon_is_killed(tmp_path, how):
    proc = start(tmp_path, DAEMON + TAILS[how])
    (daemon,) = read_pids(proc, "daemon")
    assert end(proc, how).status == STATUS[how]
    wait_until(lambda: not alive(daemon), "daemon's death")


def test_escaped_child_with_a_clean_env_is_killed_while_the_trainer_lives(tmp_path):
    # No token in its environment: found through its parent link to the trainer.
    proc = start(tmp_path, """
        if os.fork() == 0:
            os.setsid()
            os.execve(sys.executable, [sys.executable, "-c",
                      "import os, time; open('clean.tmp', 'w').write(str(os.getpid()));"
                      "os.replace('clean.tmp', 'clean'); time.sleep(1000)"], {})
        wait_for("clean")
        time.sleep(60)
    """, timeout=6.0)  # room for the exec'd interpreter to start on a loaded machine
    (clean,) = read_pids(proc, "clean")
    assert finish(proc).status == "timeout"
    wait_until(lambda: not alive(clean), "clean-env child's death")


def test_forking_loop_outside_the_group_is_swept(tmp_path):
    # An escaped process that keeps forking (bounded, so a failure can't take the box down).
    proc = start(tmp_path, """
        if os.fork() == 0:
            os.setsid()
            for i in range(40):
                if os.fork() == 0:
                    with open("pids", "a") as f:
                        f.write(f"{os.getpid()}\\n")
                    time.sleep(1000)
                    os._exit(0)
                time.sleep(0.02)
            time.sleep(1000)
            os._exit(0)
        wait_for("pids")
        time.sleep(60)
    """, timeout=0.8)
    assert finish(proc).status == "timeout"
    pids = [int(p) for p in (proc.run_dir / "pids").read_text().split()]
    assert pids
    for pid in pids:
        wait_until(lambda: not alive(pid), f"forked {pid}'s death")


@pytest.mark.skipif(not LINUX, reason="Linux-specific documented limit")
def test_known_limit_orphan_with_a_clean_env_escapes(tmp_path):
    """Documents what is NOT contained: a double-forked daemon that drops the environment
    survives a trainer that exits normally. The test kills it itself."""
    proc = start(tmp_path, """
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execve(sys.executable, [sys.executable, "-c",
                          "import os, time; open('ghost.tmp', 'w').write(str(os.getpid()));"
                          "os.replace('ghost.tmp', 'ghost'); time.sleep(30)"], {})
            os._exit(0)
        wait_for("ghost")
        write_result("ok", val_bpb=2.0)
    """)
    (ghost,) = read_pids(proc, "ghost")
    assert finish(proc).status == "ok"
    try:
        assert alive(ghost), "contained after all: update the runner docstring and this test"
    finally:
        try:
            os.kill(ghost, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- disk ------------------------------------------------------------------------------------

def test_big_file_is_stopped_by_the_file_size_limit(tmp_path):
    proc = start(tmp_path, """
        with open("big.bin", "wb") as f:
            for _ in range(4):
                f.write(b"x" * (1 << 20))     # 4 MiB against a 1 MiB limit
        write_result("ok", val_bpb=1.0)
    """, file_size_limit=1 << 20)
    out = finish(proc)
    assert out.status == "crash" and out.val_bpb is None
    assert "file size limit exceeded" in out.note and "SIGXFSZ" in out.note
    assert out.exit_code == -signal.SIGXFSZ
    assert (proc.run_dir / "big.bin").stat().st_size <= 1 << 20
    # The worker is fine: the next attempt runs normally.
    assert finish(start(tmp_path, "write_result('ok', val_bpb=1.5)")).val_bpb == 1.5


def test_file_size_limit_binds_children_and_cannot_be_raised(tmp_path):
    proc = start(tmp_path, """
        import resource, signal, subprocess
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            raised = True
        except (ValueError, OSError):
            raised = False
        child = subprocess.run([sys.executable, "-c",
                                "open('child.bin', 'wb').write(b'x' * (2 << 20))"],
                               capture_output=True, text=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # ignored: the write fails instead
        try:
            open("mine.bin", "wb").write(b"x" * (2 << 20))
            error = None
        except OSError as exc:
            error = f"OSError: {exc}"
        write_result("crash", error=error, raised=raised, child_rc=child.returncode,
                     fsize=resource.getrlimit(resource.RLIMIT_FSIZE),
                     core=resource.getrlimit(resource.RLIMIT_CORE))
    """, file_size_limit=1 << 20)
    out = finish(proc)
    r = out.result
    assert r["raised"] is False and r["fsize"] == [1 << 20, 1 << 20] and r["core"] == [0, 0]
    assert r["child_rc"] != 0           # the child's Python ignores SIGXFSZ: OSError, exit 1
    assert (proc.run_dir / "child.bin").stat().st_size <= 1 << 20
    assert out.status == "crash" and "file size limit exceeded" in out.note
    assert "File too large" in r["error"]


def test_default_limits(tmp_path):
    proc = start(tmp_path, """
        import resource
        write_result("ok", val_bpb=1.0, fsize=resource.getrlimit(resource.RLIMIT_FSIZE)[0],
                     argv=sys.argv, main=__name__, file=__file__, path0=sys.path[0])
    """)
    out = finish(proc)
    assert out.status == "ok"
    assert out.result["fsize"] == FILE_SIZE_LIMIT == 2 * 2**30
    # train.py still runs as itself: __main__, its own argv[0], its dir first on sys.path.
    assert out.result["main"] == "__main__" and out.result["argv"] == ["train.py"]
    assert out.result["path0"] == str(proc.run_dir)
    assert Path(proc.run_dir, out.result["file"]).resolve() == proc.run_dir / "train.py"


def test_start_is_refused_on_a_nearly_full_disk(tmp_path):
    spec = AttemptSpec(uuid.uuid4().hex, "print(1)", dict(SETTINGS), 30.0)
    with pytest.raises(LowDiskSpace, match=r"MiB free under .*free some disk space"):
        AttemptProcess.start(spec, tmp_path / "runs", {}, min_free_bytes=1 << 62)
    assert not (tmp_path / "runs" / spec.attempt_id).exists()
    assert isinstance(LowDiskSpace("x"), OSError)  # the agent's `except Exception` reports it


def test_filling_the_disk_with_many_files_is_killed_and_cleaned(tmp_path, monkeypatch):
    # Pretend the disk is full once the trainer has written its files (a real full disk is
    # not something a test may make); the trainer and the kill are real.
    real = runner.disk_free
    monkeypatch.setattr(runner, "disk_free",
                        lambda p: 0 if (Path(p) / "junk" / "done").exists() else real(p))
    monkeypatch.setattr(runner, "DISK_CHECK_INTERVAL", 0.02)
    proc = start(tmp_path, """
        os.mkdir("junk")
        for i in range(20):
            open(f"junk/{i}.bin", "wb").write(b"x" * 1000)
        open(os.path.expanduser("~/cache.bin"), "wb").write(b"x" * 1000)
        open("junk/done", "w").close()
        time.sleep(60)
    """)
    out = finish(proc)
    assert out.status == "crash" and "disk space low" in out.note
    left = sorted(p.name for p in proc.run_dir.iterdir())
    assert left == ["train.log", "train.py"]  # scratch files deleted, evidence kept


# ---- writes outside the run dir --------------------------------------------------------------

def test_careless_writes_land_in_the_run_dir(tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    spec = AttemptSpec(uuid.uuid4().hex, PRELUDE + textwrap.dedent("""
        import tempfile
        home = os.path.expanduser("~/.cache/thing")
        os.makedirs(os.path.dirname(home), exist_ok=True)
        open(home, "w").write("careless")
        fd, tmp = tempfile.mkstemp()
        os.write(fd, b"tmp")
        open("relative.txt", "w").write("rel")
        write_result("ok", val_bpb=1.0, home=home, tmp=tmp, cwd=os.getcwd(),
                     cache=os.environ["AUTORESEARCH_CACHE"],
                     xdg=os.environ.get("XDG_CACHE_HOME"))
    """), dict(SETTINGS), 30.0)
    proc = AttemptProcess.start(spec, tmp_path / "runs", env)
    out = finish(proc)
    assert out.status == "ok", out.log_tail
    r = out.result
    run_dir = proc.run_dir
    assert r["cwd"] == str(run_dir)
    assert Path(r["home"]).is_relative_to(run_dir / "home")
    assert Path(r["tmp"]).is_relative_to(run_dir / "tmp")
    assert r["cache"] == str(cache) and r["xdg"] is None
    assert (run_dir / "home" / ".cache" / "thing").read_text() == "careless"
    assert not (run_dir / "tmp").exists()   # TMPDIR is emptied after the run
    assert not (tmp_path / "xdg").exists()


def test_cache_default_is_pinned_to_the_real_home(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_CACHE"}
    env["HOME"] = str(tmp_path / "realhome")
    run_dir = tmp_path / "runs" / "x"
    child = runner.attempt_env(env, SETTINGS, run_dir)
    assert child["AUTORESEARCH_CACHE"] == str(tmp_path / "realhome" / ".cache" / "autoresearch")
    assert child["HOME"] == str(run_dir / "home") and child["TMPDIR"] == str(run_dir / "tmp")
    env["AUTORESEARCH_CACHE"] = "~/c"
    assert runner.attempt_env(env, SETTINGS, run_dir)["AUTORESEARCH_CACHE"] == \
        str(tmp_path / "realhome" / "c")


# ---- files that would hang or break the worker ---------------------------------------------

@pytest.mark.parametrize("trick", ["fifo", "symlink", "deep", "bomb", "bigint", "surrogate"])
def test_hostile_result_file_never_hangs_or_breaks_the_worker(tmp_path, trick):
    make = {
        "fifo": "os.mkfifo(os.environ['AUTORESEARCH_RESULT'])",
        "symlink": "os.symlink('/etc/hostname', os.environ['AUTORESEARCH_RESULT'])",
        "deep": "open(os.environ['AUTORESEARCH_RESULT'], 'w').write("
                "'{\"status\": \"ok\", \"val_bpb\": 1.0, \"x\": ' + '[' * 200 + ']' * 200 + '}')",
        "bomb": "open(os.environ['AUTORESEARCH_RESULT'], 'w').write('[' * 200000)",
        "bigint": "open(os.environ['AUTORESEARCH_RESULT'], 'w').write("
                  "'{\"status\": \"ok\", \"val_bpb\": 1.0, \"n\": 1' + '0' * 400 + '}')",
        "surrogate": "open(os.environ['AUTORESEARCH_RESULT'], 'w').write("
                     "'{\"status\": \"ok\", \"val_bpb\": 1.0, \"s\": \"\\\\ud800\"}')",
    }[trick]
    proc = start(tmp_path, make + "\n")
    out = finish(proc)
    wire = out.to_wire()
    msgpack.packb(wire, use_bin_type=True)      # the result message can always be sent
    json.dumps(wire)
    if trick in ("bigint", "surrogate"):
        assert out.status == "ok" and out.val_bpb == 1.0
        if trick == "bigint":
            assert wire["result"]["n"] is None      # beyond 64 bits: msgpack can't carry it
        else:
            assert "\ud800" not in wire["result"]["s"]
    else:
        assert out.status == "crash" and "bad result file" in out.note


@pytest.mark.parametrize("trick", ["fifo", "bomb", "bigint"])
def test_hostile_progress_file_never_hangs_or_breaks_the_worker(tmp_path, trick):
    line = {"bomb": "'[' * 100000", "bigint": "'{\"step\": 1' + '0' * 400 + '}'"}.get(trick)
    make = ("os.mkfifo(os.environ['AUTORESEARCH_PROGRESS'])" if trick == "fifo" else
            f"open(os.environ['AUTORESEARCH_PROGRESS'], 'w').write({line} + '\\n')")
    proc = start(tmp_path, make + "\nopen('made', 'w').close()\ntime.sleep(60)\n")
    wait_until(lambda: (proc.run_dir / "made").exists(), "progress file")
    prog = proc.progress()
    if prog is not None:
        msgpack.packb(prog, use_bin_type=True)
        assert prog["step"] is None
    proc.cancel("test")
    assert finish(proc).status == "cancelled"


# ---- the metric ------------------------------------------------------------------------------

def test_known_limit_in_process_forgery_of_the_result(tmp_path):
    """Documents what is NOT contained: the harness runs inside train.py's process, so
    train.py can write a result of its choosing. Caught only by re-measurement elsewhere."""
    out = finish(start(tmp_path, "write_result('ok', val_bpb=0.001)\n"))
    assert out.status == "ok" and out.val_bpb == 0.001


# ---- names and ids used in paths -------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../etc", "..", ".", "", "a/b", "a\\b", "\u202eevil",
                                  "w\x00x", "名前", "x" * 500, "-", "~root", "$HOME"])
def test_worker_names_never_leave_the_runs_dir(tmp_path, name):
    root = default_run_root(tmp_path, name)
    assert root.parent == tmp_path / "runs"
    assert root.name.isascii() and "/" not in root.name and "\\" not in root.name
    assert not root.name.startswith(".") and len(root.name) <= 64 + 1 + 10
    assert root.name.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize("bad", ["../" + "a" * 10, "..%2f" + "a" * 8, "a" * 8 + "\n",
                                 "ａｂｃｄｅｆ01", "deadbeef\u202e", "0" * 8 + "/"])
def test_attempt_ids_with_path_tricks_are_refused(tmp_path, bad):
    spec = AttemptSpec(bad, "print(1)", {}, 5.0)
    with pytest.raises(ValueError, match="invalid attempt id"):
        AttemptProcess.start(spec, tmp_path / "runs", {})
    assert not (tmp_path / "runs").exists()
