"""One-command install: LaunchAgent plist (parsed with plistlib, key by key), systemd user unit
(checked with systemd-analyze where available), loading commands through an injected runner,
and the two CLIs end to end."""
from __future__ import annotations

import os
import plistlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

from shared import service
from shared.service import (Service, ServiceError, argv_from_params, install, plan_install,
                            render_unit, systemd_quote, uninstall)

VENV_BIN = Path(sys.executable).parent
WORKER_EXE = str(VENV_BIN / "autoresearch-worker")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
# A Z85 key whose characters systemd would otherwise read as specifiers and variables.
ODD_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7$"


def new_key() -> str:
    return zmq.curve_keypair()[0].decode("ascii")


class Recorder:
    """Command runner standing in for launchctl / systemctl: records argv, answers from a
    table of (prefix -> (rc, output)), else (0, "")."""

    def __init__(self, answers=None):
        self.calls, self.answers = [], answers or {}

    def __call__(self, argv):
        self.calls.append([str(a) for a in argv])
        for prefix, answer in self.answers.items():
            if " ".join(map(str, argv)).startswith(prefix):
                return answer
        return 0, ""


def worker_service(name="box1", key=ODD_KEY, env=None):
    return Service("worker", [WORKER_EXE, "join", "tcp://lab-mac.local:5555", "--name", name,
                              "--server-key", key],
                   name=name, description=f"autoresearch worker {name}",
                   env=env if env is not None else {"AUTORESEARCH_KEYS": "/k dir/keys"}, nice=5)


# ---- macOS ---------------------------------------------------------------------------------

def test_launch_agent_plist_key_by_key(tmp_path):
    svc = worker_service()
    run = Recorder({"launchctl bootout": (3, "Boot-out failed: 3: No such process")})
    plan = install(svc, system="Darwin", home=tmp_path, run=run, uid=501)
    path = tmp_path / "Library/LaunchAgents/org.autoresearch.worker.box1.plist"
    assert plan.path == path and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600   # launchd refuses writable-by-others
    plist = plistlib.loads(path.read_bytes())
    log = str(tmp_path / "Library/Logs/autoresearch/autoresearch-worker-box1.log")
    assert plist.pop("Label") == "org.autoresearch.worker.box1"
    assert plist.pop("ProgramArguments") == [WORKER_EXE, "join", "tcp://lab-mac.local:5555",
                                             "--name", "box1", "--server-key", ODD_KEY]
    assert plist.pop("EnvironmentVariables") == {"AUTORESEARCH_KEYS": "/k dir/keys",
                                                 "PYTHONUNBUFFERED": "1"}
    assert plist.pop("WorkingDirectory") == str(tmp_path)
    assert plist.pop("RunAtLoad") is True and plist.pop("KeepAlive") is True
    assert plist.pop("ThrottleInterval") == 30
    assert plist.pop("ProcessType") == "Interactive"
    assert plist.pop("ExitTimeOut") == 30
    assert plist.pop("StandardOutPath") == log and plist.pop("StandardErrorPath") == log
    assert plist.pop("Nice") == 5
    assert plist == {}, f"unexpected keys {sorted(plist)}"
    assert Path(log).parent.is_dir()   # launchd does not make it
    assert run.calls == [
        ["launchctl", "bootout", "gui/501/org.autoresearch.worker.box1"],
        ["launchctl", "enable", "gui/501/org.autoresearch.worker.box1"],
        ["launchctl", "bootstrap", "gui/501", str(path)],
    ]


def test_launch_agent_bootstrap_failure_is_one_clear_line(tmp_path):
    run = Recorder({"launchctl bootstrap": (125, "Bootstrap failed: 125: Domain does not "
                                                 "support specified action")})
    with pytest.raises(ServiceError) as err:
        install(worker_service(), system="Darwin", home=tmp_path, run=run, uid=501)
    msg = str(err.value)
    assert "Bootstrap failed: 125" in msg and "logged in at the Mac's screen" in msg
    assert "\n" not in msg


def test_launch_agent_uninstall(tmp_path):
    svc = worker_service()
    install(svc, system="Darwin", home=tmp_path, run=Recorder(), uid=501)
    run = Recorder()
    plan, existed = uninstall(svc, system="Darwin", home=tmp_path, run=run, uid=501)
    assert existed and not plan.path.exists()
    assert run.calls == [["launchctl", "bootout", "gui/501/org.autoresearch.worker.box1"]]
    # again: nothing there, bootout fails harmlessly, still no error
    run = Recorder({"launchctl bootout": (3, "Boot-out failed: 3: No such process")})
    _, existed = uninstall(svc, system="Darwin", home=tmp_path, run=run, uid=501)
    assert not existed


# ---- Linux ---------------------------------------------------------------------------------

def test_systemd_unit_written_and_enabled(tmp_path):
    svc = worker_service()
    run = Recorder()
    plan = install(svc, system="Linux", home=tmp_path, run=run, user="nobody-here")
    path = tmp_path / ".config/systemd/user/autoresearch-worker-box1.service"
    assert plan.path == path
    text = path.read_text()
    assert "KillSignal=SIGINT\n" in text and "Restart=always\n" in text
    assert "TimeoutStopSec=900\n" in text and "Nice=5\n" in text
    assert 'Environment="AUTORESEARCH_KEYS=/k dir/keys"\n' in text
    assert run.calls == [["systemctl", "--user", "daemon-reload"],
                         ["systemctl", "--user", "enable", "--now",
                          "autoresearch-worker-box1.service"]]
    assert any("loginctl enable-linger nobody-here" in n for n in plan.notes)
    assert any("journalctl --user -u autoresearch-worker-box1.service" in n for n in plan.notes)
    # installing again replaces it without waiting for the running worker's run
    run = Recorder()
    install(svc, system="Linux", home=tmp_path, run=run, user="nobody-here")
    assert run.calls[-1] == ["systemctl", "--user", "restart", "--no-block",
                             "autoresearch-worker-box1.service"]


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    svc = worker_service(env={"AUTORESEARCH_KEYS": "/k dir/100%/$HOME"})
    path = tmp_path / svc.unit
    path.write_text(render_unit(svc))
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the same unit with the key written raw: systemd reads "%k" as a specifier and fails,
    # which is what the quoting prevents
    raw = render_unit(svc).replace(systemd_quote(ODD_KEY), ODD_KEY)
    path.write_text(raw)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "specifier" in (proc.stdout + proc.stderr)


def test_systemd_quoting():
    assert systemd_quote("plain/path-1.0") == "plain/path-1.0"
    assert systemd_quote("a b") == '"a b"'
    assert systemd_quote("100%") == "100%%"
    assert systemd_quote("$HOME") == '"$$HOME"'
    assert systemd_quote("$HOME", dollar=False) == '"$HOME"'
    assert systemd_quote('say "hi"\\') == '"say \\"hi\\"\\\\"'
    assert systemd_quote(";") == '";"'


def test_missing_systemctl_is_a_clear_error(tmp_path, monkeypatch):
    # the real runner, on a PATH without systemctl
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ServiceError, match="systemctl not found: this Linux does not run systemd"):
        install(worker_service(), system="Linux", home=tmp_path)


def test_unreachable_user_manager_keeps_the_unit(tmp_path):
    svc = worker_service()
    install(svc, system="Linux", home=tmp_path, run=Recorder(), user="x")
    run = Recorder({"systemctl --user disable": (1, "Failed to connect to bus: No medium found")})
    with pytest.raises(ServiceError, match="Nothing was removed"):
        uninstall(svc, system="Linux", home=tmp_path, run=run)
    assert (tmp_path / ".config/systemd/user" / svc.unit).exists()
    run = Recorder({"systemctl --user disable": (1, "Failed to disable unit: Unit file "
                                                    "autoresearch-worker-box1.service does "
                                                    "not exist.")})
    plan, existed = uninstall(svc, system="Linux", home=tmp_path, run=run)
    assert existed and not plan.path.exists()
    assert run.calls[-1] == ["systemctl", "--user", "daemon-reload"]


def test_bad_worker_name_and_unsupported_system(tmp_path):
    with pytest.raises(ServiceError, match="cannot name a service"):
        worker_service(name="../evil")
    with pytest.raises(ServiceError, match="macOS .* and Linux"):
        plan_install(worker_service(), system="Windows", home=tmp_path)


def test_argv_from_params_only_non_defaults():
    import click

    @click.command()
    @click.option("--threads", type=int, default=None)
    @click.option("--liveness", type=int, default=5)
    @click.option("--insecure", is_flag=True)
    @click.option("--tag", multiple=True)
    def cmd(**kw):
        pass

    assert argv_from_params(cmd, {"threads": None, "liveness": 5, "insecure": False,
                                  "tag": ()}) == []
    assert argv_from_params(cmd, {"threads": 2, "liveness": 7, "insecure": True,
                                  "tag": ("a", "b")}) == \
        ["--threads", "2", "--liveness", "7", "--insecure", "--tag", "a", "--tag", "b"]


# ---- the CLIs ------------------------------------------------------------------------------

@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    rec = Recorder()
    monkeypatch.setattr(service, "RUNNER", rec)
    return h, rec


def test_worker_install_cli_fills_in_venv_endpoint_key_and_name(home, tmp_path):
    from worker.cli import main

    h, rec = home
    key = new_key()
    r = CliRunner().invoke(main, ["install", "tcp://lab-mac.local:5555", "--server-key", key,
                                  "--name", "box1", "--threads", "2",
                                  "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    unit = h / ".config/systemd/user/autoresearch-worker-box1.service"
    text = unit.read_text()
    exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_line.startswith(f"ExecStart={WORKER_EXE} join tcp://lab-mac.local:5555 "
                                f"--name box1 --cache-dir {tmp_path / 'cache'} --server-key ")
    assert systemd_quote(key) in exec_line and exec_line.endswith(" --threads 2")
    assert f"Environment=AUTORESEARCH_KEYS={os.environ['AUTORESEARCH_KEYS']}" in text
    assert rec.calls[-1] == ["systemctl", "--user", "enable", "--now",
                             "autoresearch-worker-box1.service"]
    assert "journalctl --user -u autoresearch-worker-box1.service -f" in r.output
    if SYSTEMD_ANALYZE:   # the unit the CLI wrote, with a real key, is one systemd accepts
        proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    # the key given is now pinned for the endpoint, as `join --server-key` would
    from shared.pins import load_pins
    assert load_pins()["tcp://lab-mac.local:5555"] == key
    # the installed command line is a real one: the executable runs its join --help
    proc = subprocess.run([WORKER_EXE, "join", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--server-key" in proc.stdout

    r = CliRunner().invoke(main, ["uninstall", "--name", "box1"])
    assert r.exit_code == 0, r.output
    assert not unit.exists() and f"removed {unit}" in r.output


def test_worker_install_cli_on_a_mac(home, monkeypatch):
    from worker.cli import main

    h, rec = home
    monkeypatch.setattr(service.platform, "system", lambda: "Darwin")
    key = new_key()
    r = CliRunner().invoke(main, ["install", "tcp://lab:5555", "--server-key", key,
                                  "--name", "mbp", "--when-idle", "10", "--allow-battery"])
    assert r.exit_code == 0, r.output
    plist = plistlib.loads((h / "Library/LaunchAgents/org.autoresearch.worker.mbp.plist")
                           .read_bytes())
    args = plist["ProgramArguments"]
    assert args[:5] == [WORKER_EXE, "join", "tcp://lab:5555", "--name", "mbp"]
    assert args[args.index("--server-key") + 1] == key
    assert args[-3:] == ["--allow-battery", "--when-idle", "10.0"]   # passed on as given
    assert plist["StandardOutPath"] == str(h / "Library/Logs/autoresearch/"
                                               "autoresearch-worker-mbp.log")
    assert [c[:2] for c in rec.calls] == [["launchctl", "bootout"], ["launchctl", "enable"],
                                          ["launchctl", "bootstrap"]]


def test_worker_install_print_writes_and_runs_nothing(home):
    from worker.cli import main

    h, rec = home
    key = new_key()
    r = CliRunner().invoke(main, ["install", "tcp://lab:5555", "--server-key", key, "--name",
                                  "b2", "--print"])
    assert r.exit_code == 0, r.output
    assert "[Service]" in r.output and "$ systemctl --user enable --now" in r.output
    assert rec.calls == [] and not (h / ".config").exists()
    from shared.pins import load_pins
    assert load_pins() == {}     # a dry run pins nothing either


def test_worker_install_without_a_key_fails_like_join(home):
    from worker.cli import main

    r = CliRunner().invoke(main, ["install", "tcp://lab:5555", "--name", "b3"])
    assert r.exit_code == 1 and "no key pinned for tcp://lab:5555" in r.output
    assert home[1].calls == []
    r = CliRunner().invoke(main, ["install", "lab:5555", "--insecure"])
    assert r.exit_code == 2 and "not a ZeroMQ endpoint" in r.output
    # this Linux cannot tell idle time: a service that would only fail is not installed
    r = CliRunner().invoke(main, ["install", "tcp://lab:5555", "--insecure", "--when-idle", "5"])
    assert r.exit_code == 2 and "--when-idle needs macOS" in r.output


def test_coordinator_install_cli(home, tmp_path, prepared_sample):
    from coordinator.cli import main

    h, rec = home
    repo = tmp_path / "lab"
    r = CliRunner().invoke(main, ["init", str(repo), "--preset", "tiny"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["install", str(repo), "--bind", "tcp://0.0.0.0:5555",
                                  "--data", str(prepared_sample)])
    assert r.exit_code == 0, r.output
    text = (h / ".config/systemd/user/autoresearch-coordinator.service").read_text()
    assert (f"ExecStart={VENV_BIN / 'autoresearch-coord'} start {repo} "
            f"--bind tcp://0.0.0.0:5555 --data {prepared_sample}\n") in text
    assert "TimeoutStopSec=60\n" in text
    r = CliRunner().invoke(main, ["install", str(repo), "--new-dataset"])
    assert r.exit_code == 2 and "No such option" in r.output
    r = CliRunner().invoke(main, ["install", str(tmp_path)])
    assert r.exit_code == 1 and "is not a research repo" in r.output
    r = CliRunner().invoke(main, ["uninstall"])
    assert r.exit_code == 0 and "removed" in r.output
    assert not (h / ".config/systemd/user/autoresearch-coordinator.service").exists()
