"""worker.runner with real subprocesses: stand-in train.py scripts that fake a run without MLX."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from worker.runner import (
    AttemptProcess, AttemptSpec, Outcome, default_run_root, prune_runs, prune_stale_run_roots,
)

from runner_standins import (  # noqa: E402  (shared with test_hostile_trainpy.py)
    PRELUDE, SETTINGS, alive, finish, read_pids, start, wait_until,
)


def new_id() -> str:
    return str(uuid.uuid4())


def read_pid(proc: AttemptProcess, name: str) -> int:
    return read_pids(proc, name)[0]


# ---- results -------------------------------------------------------------------------------

def test_ok_result_with_val_bpb(tmp_path):
    proc = start(tmp_path, """
        print("step 1 loss 9.0")
        print("warming up", file=sys.stderr)
        write_result("ok", val_bpb=1.2345, num_steps=3,
                     env={k: v for k, v in os.environ.items() if k.startswith("AUTORESEARCH_")})
    """)
    out = finish(proc)
    assert out.status == "ok" and out.val_bpb == pytest.approx(1.2345)
    assert out.exit_code == 0 and out.note == ""
    assert out.result["num_steps"] == 3
    assert "step 1 loss 9.0" in out.log_tail and "warming up" in out.log_tail
    env = out.result["env"]
    assert env["AUTORESEARCH_SEQ_LEN"] == "64" and env["AUTORESEARCH_SEED"] == "7"
    assert env["AUTORESEARCH_TIME_BUDGET"] == "2" and env["AUTORESEARCH_EVAL_BATCH"] == "4"
    assert env["AUTORESEARCH_EVAL_TOKENS"] == "1024"
    assert env["AUTORESEARCH_RESULT"] == str(proc.run_dir / "result.json")
    assert env["AUTORESEARCH_PROGRESS"] == str(proc.run_dir / "progress.jsonl")
    assert (proc.run_dir / "train.py").exists()
    assert "step 1 loss 9.0" in (proc.run_dir / "train.log").read_text()
    wire = out.to_wire()
    assert wire["status"] == "ok" and wire["val_bpb"] == pytest.approx(1.2345)
    assert set(wire) >= {"status", "val_bpb", "result", "log_tail", "exit_code", "wall_seconds"}
    assert proc.poll() is out  # finished outcome is stable


def test_harness_write_result_stand_in(tmp_path):
    harness = pytest.importorskip("trainer.harness")
    if not hasattr(harness, "write_result"):
        pytest.skip("trainer.harness.write_result not available")
    out = finish(start(tmp_path, """
        from trainer import harness
        harness.write_result("ok", val_bpb=2.5, num_steps=1)
    """))
    assert out.status == "ok" and out.val_bpb == 2.5
    assert out.result["settings"]["seq_len"] == 64


@pytest.mark.parametrize("exc, status", [("RuntimeError('boom in train.py')", "crash"),
                                         ("MemoryError('out of memory')", "oom")])
def test_harness_run_main_failures(tmp_path, exc, status):
    harness = pytest.importorskip("trainer.harness")
    if not hasattr(harness, "run_main"):
        pytest.skip("trainer.harness.run_main not available")
    out = finish(start(tmp_path, f"""
        from trainer import harness
        def main():
            raise {exc}
        harness.run_main(main)
    """))
    assert out.status == status and out.val_bpb is None
    assert out.exit_code == {"crash": 1, "oom": 4}[status]
    assert "Traceback" in out.log_tail and out.note  # the error's last line


def test_progress_read_incrementally_with_partial_line(tmp_path):
    proc = start(tmp_path, """
        progress(step=1, progress=0.1, loss=9.0, tok_per_sec=100.0, elapsed=0.1)
        with open(os.environ["AUTORESEARCH_PROGRESS"], "a") as f:
            f.write('{"step": 2, "progress": 0.')   # half a line, flushed
        open("half", "w").close()
        wait_for("go")
        with open(os.environ["AUTORESEARCH_PROGRESS"], "a") as f:
            f.write('2, "loss": 8.5}\\n')
        open("done2", "w").close()
        wait_for("go3")
        progress(step=3, progress=0.3, loss=float("nan"), tok_per_sec=100.0, elapsed=0.3)
        write_result("ok", val_bpb=3.0)
    """)
    assert proc.progress() is None or proc.progress()["step"] == 1
    wait_until(lambda: (proc.run_dir / "half").exists(), "half line")
    first = wait_until(proc.progress, "first progress line")
    assert first["step"] == 1 and first["loss"] == 9.0
    assert proc.progress()["step"] == 1  # the partial line is not returned
    (proc.run_dir / "go").touch()
    wait_until(lambda: (proc.run_dir / "done2").exists(), "second line")
    second = proc.progress()
    assert second == {"step": 2, "progress": 0.2, "loss": 8.5}
    (proc.run_dir / "go3").touch()
    assert finish(proc).status == "ok"
    third = proc.progress()
    assert third["step"] == 3 and third["loss"] is None  # NaN made wire-safe


def test_nan_via_exit_3_without_result(tmp_path):
    out = finish(start(tmp_path, "print('loss is nan'); sys.exit(3)"))
    assert out.status == "nan" and out.val_bpb is None and out.exit_code == 3
    assert out.result == {}


def test_oom_via_exit_4_without_result(tmp_path):
    out = finish(start(tmp_path, "sys.exit(4)"))
    assert out.status == "oom" and out.val_bpb is None


@pytest.mark.parametrize("status", ["nan", "oom", "crash"])
def test_result_file_status_wins(tmp_path, status):
    out = finish(start(tmp_path, f"""
        write_result({status!r}, val_bpb=None, error="Traceback...\\nSomeError: went wrong")
        sys.exit(1)
    """))
    assert out.status == status and out.val_bpb is None
    assert out.note == "SomeError: went wrong"


def test_crash_keeps_traceback_tail(tmp_path):
    out = finish(start(tmp_path, """
        for i in range(200):
            print("noise line", i)
        def train():
            raise RuntimeError("boom at step 7")
        train()
    """))
    assert out.status == "crash" and out.val_bpb is None and out.exit_code == 1
    assert "Traceback (most recent call last)" in out.log_tail
    assert "RuntimeError: boom at step 7" in out.log_tail
    assert len(out.log_tail.splitlines()) <= 60 and len(out.log_tail) <= 8192
    assert "noise line 199" in out.log_tail and "noise line 0\n" not in out.log_tail


def test_printed_val_bpb_is_never_trusted(tmp_path):
    out = finish(start(tmp_path, """
        print("---")
        print("val_bpb:          0.100000")
    """))
    assert out.status == "crash" and out.val_bpb is None
    assert "without writing a result" in out.note
    assert "val_bpb" in out.log_tail


@pytest.mark.parametrize("value", ["float('nan')", "float('inf')", "None", "'1.0'", "True"])
def test_ok_without_finite_val_bpb_is_crash(tmp_path, value):
    out = finish(start(tmp_path, f"write_result('ok', val_bpb={value})"))
    assert out.status == "crash" and out.val_bpb is None
    assert "ok without finite val_bpb" in out.note
    json.dumps(out.to_wire(), allow_nan=False)  # wire map is strict-JSON clean


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"status": "great", "val_bpb": 1}'])
def test_bad_result_file_is_crash(tmp_path, content):
    out = finish(start(tmp_path, f"""
        open(os.environ["AUTORESEARCH_RESULT"], "w").write({content!r})
    """))
    assert out.status == "crash" and out.val_bpb is None
    assert out.note.startswith("bad result file")


def test_sigkill_with_oom_words_is_oom(tmp_path):
    out = finish(start(tmp_path, """
        print("[metal::malloc] Resource limit exceeded: out of memory", flush=True)
        os.kill(os.getpid(), 9)
    """))
    assert out.status == "oom" and out.exit_code == -signal.SIGKILL


def test_sigkill_without_oom_words_is_crash(tmp_path):
    out = finish(start(tmp_path, "os.kill(os.getpid(), 9)"))
    assert out.status == "crash" and "SIGKILL" in out.note


# ---- limits and kills ----------------------------------------------------------------------

def test_log_limit_kills_and_crashes(tmp_path):
    proc = start(tmp_path, """
        line = "x" * 1023 + "\\n"
        for _ in range(10 * 1024):     # 10 MB
            sys.stdout.write(line)
        sys.stdout.flush()
        write_result("ok", val_bpb=1.0)
        time.sleep(30)
    """, log_limit=1 << 20)
    out = finish(proc)
    assert out.status == "crash" and "log limit exceeded" in out.note
    assert out.val_bpb is None
    assert (proc.run_dir / "train.log").stat().st_size <= 1 << 20
    assert "xxxx" in out.log_tail


def test_timeout_kills_process_group(tmp_path):
    proc = start(tmp_path, """
        open("pid", "w").write(str(os.getpid()))
        time.sleep(60)
    """, timeout=0.5)
    pid = read_pid(proc, "pid")
    out = finish(proc)
    assert out.status == "timeout" and out.val_bpb is None
    assert out.exit_code == -signal.SIGTERM
    assert "no result within" in out.note
    assert not alive(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_timeout_escalates_to_sigkill_when_sigterm_ignored(tmp_path):
    proc = start(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("pid", "w").write(str(os.getpid()))
        time.sleep(60)
    """, timeout=0.3, kill_grace=0.2)
    read_pid(proc, "pid")
    out = finish(proc)
    assert out.status == "timeout" and out.exit_code == -signal.SIGKILL


def test_result_written_before_timeout_still_counts(tmp_path):
    out = finish(start(tmp_path, """
        write_result("ok", val_bpb=1.5)
        time.sleep(60)   # teardown hangs
    """, timeout=0.5))
    assert out.status == "ok" and out.val_bpb == 1.5
    assert "timeout kill" in out.note


def test_cancel(tmp_path):
    proc = start(tmp_path, """
        progress(step=1, progress=0.5, loss=5.0, tok_per_sec=1.0, elapsed=1.0)
        time.sleep(60)
    """)
    wait_until(proc.progress, "progress")
    assert proc.poll() is None
    proc.cancel("coordinator said so")
    out = finish(proc)
    assert out.status == "cancelled" and out.val_bpb is None
    assert "coordinator said so" in out.note
    proc.cancel("again")  # harmless once finished
    assert proc.poll() is out


def test_cancel_after_drop_still_kills_sigterm_ignorer(tmp_path):
    # The worker may cancel and stop polling (it is exiting): SIGKILL must still follow.
    proc = start(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("pid", "w").write(str(os.getpid()))
        time.sleep(60)
    """, kill_grace=0.2)
    pid = read_pid(proc, "pid")
    proc.cancel("worker exiting")
    wait_until(lambda: not alive(pid), "SIGKILL from the watchdog")
    assert finish(proc).status == "cancelled"


GRANDCHILD = textwrap.dedent("""
    child = os.fork()
    if child == 0:
        open("grandchild.tmp", "w").write(str(os.getpid()))
        os.replace("grandchild.tmp", "grandchild")
        time.sleep(1000)
        os._exit(0)
    wait_for("grandchild")
""")


@pytest.mark.parametrize("how", ["cancel", "timeout", "exit"])
def test_forked_grandchild_is_killed(tmp_path, how):
    tail = {"cancel": "time.sleep(60)", "timeout": "time.sleep(60)",
            "exit": "write_result('ok', val_bpb=2.0)"}[how]
    proc = start(tmp_path, GRANDCHILD + tail, timeout=1.0 if how == "timeout" else 30.0)
    grandchild = read_pid(proc, "grandchild")
    if how == "cancel":
        proc.cancel("test")
    out = finish(proc)
    assert out.status == {"cancel": "cancelled", "timeout": "timeout", "exit": "ok"}[how]
    wait_until(lambda: not alive(grandchild), "grandchild death")


@pytest.mark.parametrize("how", ["timeout", "exit"])
def test_without_waitid_fallback_still_kills_group(tmp_path, monkeypatch, how):
    import worker.runner as runner
    monkeypatch.setattr(runner, "_HAVE_WAITID", False)
    tail = "time.sleep(60)" if how == "timeout" else "write_result('ok', val_bpb=2.0)"
    proc = start(tmp_path, GRANDCHILD + tail, timeout=1.0 if how == "timeout" else 30.0)
    grandchild = read_pid(proc, "grandchild")
    assert finish(proc).status == ("timeout" if how == "timeout" else "ok")
    wait_until(lambda: not alive(grandchild), "grandchild death")


# ---- ids, dirs, settings ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../../etc/x", "..", "DEADBEEF", "abc", "a" * 65,
                                 "deadbeef/../x", "deadbeef\x00", "", 12345678, None])
def test_invalid_attempt_id_refused(tmp_path, bad):
    spec = AttemptSpec(attempt_id=bad, train_py="print(1)", settings={}, timeout=5)
    with pytest.raises(ValueError, match="invalid attempt id"):
        AttemptProcess.start(spec, tmp_path / "runs", {})
    assert not (tmp_path / "runs").exists()


def test_bad_settings_and_timeout_refused(tmp_path):
    spec = AttemptSpec(attempt_id=new_id(), train_py="", settings={"seq_len": 0}, timeout=5)
    with pytest.raises(ValueError, match="AUTORESEARCH_SEQ_LEN"):
        AttemptProcess.start(spec, tmp_path / "runs", {})
    spec = AttemptSpec(attempt_id=new_id(), train_py="", settings={}, timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        AttemptProcess.start(spec, tmp_path / "runs", {})
    wire = Outcome.refused("worker could not start the trainer: bad").to_wire()
    assert wire["status"] == "crash" and wire["val_bpb"] is None


def test_restarted_attempt_gets_a_fresh_dir(tmp_path):
    aid = new_id()
    assert finish(start(tmp_path, "write_result('ok', val_bpb=1.0)", attempt_id=aid)).status == "ok"
    out = finish(start(tmp_path, "print('no result this time')", attempt_id=aid))
    assert out.status == "crash" and out.result == {}  # the old result.json is gone


def test_relative_run_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = AttemptSpec(new_id(), PRELUDE + "write_result('ok', val_bpb=1.25)", dict(SETTINGS), 30.0)
    proc = AttemptProcess.start(spec, Path("rel-runs"), {})
    assert finish(proc).val_bpb == 1.25
    assert proc.run_dir == tmp_path / "rel-runs" / spec.attempt_id


def test_finished_run_dirs_are_pruned(tmp_path):
    ids = []
    for i in range(4):
        ids.append(new_id())
        assert finish(start(tmp_path, "write_result('ok', val_bpb=1.0)", attempt_id=ids[-1],
                            keep_runs=2)).status == "ok"
        os.utime(tmp_path / "runs" / ids[-1], (1000 + i, 1000 + i))  # deterministic ages
    (tmp_path / "runs" / "notes.txt").write_text("not a run dir: kept")
    prune_runs(tmp_path / "runs", keep=2)
    left = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert left == sorted(ids[-2:] + ["notes.txt"])


def test_run_roots_are_per_worker_process(tmp_path):
    a = default_run_root(tmp_path, "lab-mac-1")
    b = default_run_root(tmp_path, "lab-mac-2")
    assert a != b and a.parent == b.parent == tmp_path / "runs"
    assert a.name == f"lab-mac-1-{os.getpid()}"
    weird = default_run_root(tmp_path, "../../evil name/")
    assert weird.parent == tmp_path / "runs" and "/" not in weird.name
    # Another process gets another root for the same name.
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from worker.runner import default_run_root;"
                               "print(default_run_root(sys.argv[1], 'lab-mac-1'))", str(tmp_path)],
        capture_output=True, text=True, check=True).stdout.strip()
    assert Path(other) != a


def test_two_workers_same_attempt_id_do_not_collide(tmp_path):
    aid = new_id()
    body = "write_result('ok', val_bpb=float(os.path.basename(os.path.dirname(os.getcwd())).split('-')[-1]))"
    procs = [AttemptProcess.start(
        AttemptSpec(aid, PRELUDE + body, dict(SETTINGS), 30.0), tmp_path / "runs" / f"w-{n}", {})
        for n in (1, 2)]
    assert [finish(p).val_bpb for p in procs] == [1.0, 2.0]


def test_stale_run_roots_of_dead_workers_are_pruned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "runs" / f"old-worker-{dead.pid}"
    mine = default_run_root(tmp_path, "me")
    stale.mkdir(parents=True)
    mine.mkdir(parents=True)
    assert prune_stale_run_roots(tmp_path) == [stale]
    assert mine.exists() and not stale.exists()
