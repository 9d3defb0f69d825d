"""Install a worker or the coordinator as a per-user background service, and remove it.

``autoresearch-worker install`` and ``autoresearch-coord install`` describe the command they
want run (a ``Service``: the venv's executable and the exact arguments, key pin included) and
this module writes and loads it:

macOS   a LaunchAgent ``~/Library/LaunchAgents/<label>.plist`` loaded into the logged-in
        user's GUI domain (``launchctl bootstrap gui/UID``). A LaunchAgent, not a daemon:
        Metal is only available inside a user's session. Logs (stdout and stderr) go to
        ``~/Library/Logs/autoresearch/<name>.log`` (Console.app shows that folder).
Linux   a systemd user unit ``~/.config/systemd/user/<name>.service``, enabled and started
        with ``systemctl --user``; logs go to the journal
        (``journalctl --user -u <name> -f``). Without lingering (``loginctl enable-linger``)
        user units stop at logout; ``install`` says so when it is off.

Names: the coordinator is ``org.autoresearch.coordinator`` / ``autoresearch-coordinator``; a
worker is ``org.autoresearch.worker.<name>`` / ``autoresearch-worker-<name>`` so several
workers on one machine (split cores) are separate services.

Stopping: systemd sends SIGINT (``KillSignal``), which the worker treats as one Ctrl-C: it
finishes the current run, reports it and leaves (``TimeoutStopSec`` bounds the wait). launchd
can only send SIGTERM: the worker cancels its run (the candidate is requeued without a strike).

Every command goes through an injectable ``CommandRunner`` (argv -> (exit code, output)), so
tests never touch the real launchctl / systemctl; a missing tool raises ``ServiceError`` with
the one line a person needs. Files are written atomically (temp + rename), mode 0600 (they may
hold a one-time invite token; launchd refuses plists others can write anyway).
"""
from __future__ import annotations

import getpass
import os
import platform
import plistlib
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

CommandRunner = Callable[[list], "tuple[int, str]"]

LABEL_PREFIX = "org.autoresearch"
UNIT_PREFIX = "autoresearch"
LOG_DIR_MACOS = "Library/Logs/autoresearch"
AGENT_DIR_MACOS = "Library/LaunchAgents"
UNIT_DIR_LINUX = ".config/systemd/user"
LINGER_DIR = "/var/lib/systemd/linger"
# Environment carried from the installing shell into the service, so it finds the same keys,
# pins, cache and tools as the person who ran `install`.
CARRIED_ENV = ("AUTORESEARCH_KEYS", "AUTORESEARCH_CACHE", "AUTORESEARCH_DATA", "PATH")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class ServiceError(RuntimeError):
    """Installing or removing failed; the message says what to do."""


@dataclass
class Service:
    role: str                      # "worker" | "coordinator"
    argv: list                     # absolute executable first
    name: str = ""                 # worker name ("" for the coordinator)
    description: str = ""
    env: dict = field(default_factory=dict)
    stop_timeout: int = 900        # seconds systemd waits after SIGINT before SIGKILL
    nice: int = 0

    def __post_init__(self) -> None:
        if self.role not in ("worker", "coordinator"):
            raise ValueError(f"role must be worker or coordinator, got {self.role!r}")
        if self.role == "worker" and not _NAME_RE.fullmatch(self.name or ""):
            raise ServiceError(f"worker name {self.name!r} cannot name a service: use letters, "
                               "digits, '.', '_' and '-' (at most 64), e.g. --name lab-mac-3")
        if not self.argv or not os.path.isabs(str(self.argv[0])):
            raise ValueError("argv must start with an absolute executable path")

    @property
    def base(self) -> str:
        """``autoresearch-coordinator`` / ``autoresearch-worker-<name>``."""
        return f"{UNIT_PREFIX}-{self.role}" + (f"-{self.name}" if self.role == "worker" else "")

    @property
    def label(self) -> str:
        return f"{LABEL_PREFIX}.{self.role}" + (f".{self.name}" if self.role == "worker" else "")

    @property
    def unit(self) -> str:
        return f"{self.base}.service"


def carried_env(environ: dict | None = None, extra_path: str | None = None) -> dict:
    """The installing shell's values of CARRIED_ENV (PATH with ``extra_path`` first)."""
    env = os.environ if environ is None else environ
    out = {k: env[k] for k in CARRIED_ENV if env.get(k)}
    if extra_path:
        rest = [p for p in out.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin").split(os.pathsep)
                if p and p != extra_path]
        out["PATH"] = os.pathsep.join([extra_path, *rest])
    return out


def service_path(svc: Service, system: str, home: Path) -> Path:
    if system == "Darwin":
        return home / AGENT_DIR_MACOS / f"{svc.label}.plist"
    if system == "Linux":
        return home / UNIT_DIR_LINUX / svc.unit
    raise ServiceError(f"install supports macOS (launchd) and Linux (systemd), not {system}; "
                       "run the command in the foreground or under your own service manager")


def log_path(svc: Service, system: str, home: Path) -> Path | None:
    """Where the service's output goes: a file on macOS, the journal (None) on Linux."""
    return home / LOG_DIR_MACOS / f"{svc.base}.log" if system == "Darwin" else None


def where_logs_go(svc: Service, system: str, home: Path) -> str:
    log = log_path(svc, system, home)
    return f"tail -f {log}" if log else f"journalctl --user -u {svc.unit} -f"


# ---- rendering -----------------------------------------------------------------------------

def render_plist(svc: Service, home: Path) -> bytes:
    log = str(log_path(svc, "Darwin", home))
    plist = {
        "Label": svc.label,
        "ProgramArguments": [str(a) for a in svc.argv],
        "EnvironmentVariables": {**{k: str(v) for k, v in svc.env.items()},
                                 "PYTHONUNBUFFERED": "1"},
        "WorkingDirectory": str(home),
        "RunAtLoad": True,
        # Restart after any exit: the ledger and the worker's protocol make restarts safe.
        "KeepAlive": True,
        # ...but not in a tight loop when something is permanently wrong (untrusted key).
        "ThrottleInterval": 30,
        # Out of App Nap and background CPU throttling: a throttled run measures the throttle.
        "ProcessType": "Interactive",
        # SIGTERM to SIGKILL: the worker cancels its run and reports within seconds.
        "ExitTimeOut": 30,
        "StandardOutPath": log,
        "StandardErrorPath": log,
    }
    if svc.nice:
        plist["Nice"] = int(svc.nice)
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=False)


def systemd_quote(arg: str, *, dollar: bool = True) -> str:
    """One ExecStart word (``dollar``: variables expand there, so ``$`` -> ``$$``) or one
    Environment= assignment (``dollar=False``: no expansion there): specifiers ``%`` -> ``%%``,
    backslashes and quotes escaped, quoted unless plainly safe."""
    text = str(arg).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    if dollar:
        text = text.replace("$", "$$")
    if text and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return f'"{text}"'


def render_unit(svc: Service) -> str:
    env_lines = "".join(f"Environment={systemd_quote(f'{k}={v}', dollar=False)}\n"
                        for k, v in {**svc.env, "PYTHONUNBUFFERED": "1"}.items())
    exec_start = " ".join(systemd_quote(a) for a in svc.argv)
    nice = f"Nice={svc.nice}\n" if svc.nice else ""
    return (
        f"# Written by `{Path(str(svc.argv[0])).name} install`; remove with "
        f"`{Path(str(svc.argv[0])).name} uninstall`.\n"
        "[Unit]\n"
        f"Description={svc.description or 'autoresearch ' + svc.role}\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n"
        "\n[Service]\n"
        "Type=simple\n"
        f"{env_lines}"
        f"ExecStart={exec_start}\n"
        "# Restart after any exit (the ledger and the worker's protocol make it safe), slowly.\n"
        "Restart=always\n"
        "RestartSec=30\n"
        + ("# SIGINT = one Ctrl-C: the worker finishes the current run, reports it, then "
           "leaves.\n" if svc.role == "worker" else
           "# SIGINT = Ctrl-C: the coordinator stops; its ledger survives any stop.\n") +
        "KillSignal=SIGINT\n"
        f"TimeoutStopSec={int(svc.stop_timeout)}\n"
        f"{nice}"
        "\n[Install]\n"
        "WantedBy=default.target\n"
    )


def render(svc: Service, system: str, home: Path) -> bytes:
    if system == "Darwin":
        return render_plist(svc, home)
    service_path(svc, system, home)   # raises for unsupported systems
    return render_unit(svc).encode("utf-8")


# ---- commands ------------------------------------------------------------------------------

def run_command(argv: list) -> tuple[int, str]:
    """The real runner: exit code and combined output. A missing program raises
    FileNotFoundError (turned into ServiceError by the callers)."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _run(run: CommandRunner, argv: list, *, check: bool = True, hint: str = "") -> tuple[int, str]:
    try:
        rc, out = run(argv)
    except FileNotFoundError:
        tool = argv[0]
        if tool == "systemctl":
            raise ServiceError("systemctl not found: this Linux does not run systemd. Start the "
                               "command under your init system instead (`install --print` shows "
                               "the command line)") from None
        raise ServiceError(f"{tool} not found; `install --print` shows what would be "
                           "loaded") from None
    if check and rc != 0:
        raise ServiceError(f"`{' '.join(map(str, argv))}` failed (exit {rc}): "
                           f"{(out or '').strip().splitlines()[-1] if out else 'no output'}"
                           + (f" -- {hint}" if hint else ""))
    return rc, out


def launchd_domain(uid: int | None = None) -> str:
    return f"gui/{os.getuid() if uid is None else uid}"


def install_commands(svc: Service, system: str, path: Path, replacing: bool,
                     uid: int | None = None) -> list[tuple[list, bool]]:
    """(argv, must_succeed) in order."""
    if system == "Darwin":
        dom = launchd_domain(uid)
        return [(["launchctl", "bootout", f"{dom}/{svc.label}"], False),   # if loaded
                (["launchctl", "enable", f"{dom}/{svc.label}"], True),      # if disabled
                (["launchctl", "bootstrap", dom, str(path)], True)]
    cmds = [(["systemctl", "--user", "daemon-reload"], True)]
    if replacing:
        # A running worker finishes its run first (SIGINT); do not wait for that here.
        cmds += [(["systemctl", "--user", "enable", svc.unit], True),
                 (["systemctl", "--user", "restart", "--no-block", svc.unit], True)]
    else:
        cmds += [(["systemctl", "--user", "enable", "--now", svc.unit], True)]
    return cmds


def uninstall_commands(svc: Service, system: str, uid: int | None = None) -> list[tuple[list, bool]]:
    if system == "Darwin":
        return [(["launchctl", "bootout", f"{launchd_domain(uid)}/{svc.label}"], False)]
    return [(["systemctl", "--user", "disable", "--now", "--no-block", svc.unit], False),
            (["systemctl", "--user", "daemon-reload"], False)]


@dataclass
class Plan:
    """What install / uninstall does, for ``--print`` and for doing it."""
    path: Path
    content: bytes | None                  # None for uninstall
    commands: list                         # [(argv, must_succeed)]
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        lines = []
        if self.content is not None:
            lines += [f"# {self.path}", self.content.decode("utf-8").rstrip("\n"), ""]
        else:
            lines += [f"# remove {self.path}"]
        lines += [f"$ {' '.join(map(str, argv))}" for argv, _ in self.commands]
        return "\n".join(lines + self.notes)


def _hint(system: str) -> str:
    if system == "Darwin":
        return ("a LaunchAgent needs the user logged in at the Mac's screen (gui domain); "
                "over ssh alone there is none")
    return ("systemctl --user needs a user session (log in, or `loginctl enable-linger "
            "$USER` as root)")


def plan_install(svc: Service, *, system: str | None = None, home: Path | None = None,
                 uid: int | None = None, user: str | None = None) -> Plan:
    system = system or platform.system()
    home = Path(home or Path.home())
    path = service_path(svc, system, home)
    notes = [f"# logs: {where_logs_go(svc, system, home)}"]
    if system == "Linux":
        user = user or getpass.getuser()
        if not Path(LINGER_DIR, user).exists():
            notes.append(f"# note: lingering is off for {user}: this service stops when you log "
                         f"out (as root: loginctl enable-linger {user})")
    return Plan(path, render(svc, system, home),
                install_commands(svc, system, path, path.exists(), uid), notes)


def plan_uninstall(svc: Service, *, system: str | None = None, home: Path | None = None,
                   uid: int | None = None) -> Plan:
    system = system or platform.system()
    home = Path(home or Path.home())
    return Plan(service_path(svc, system, home), None, uninstall_commands(svc, system, uid))


def install(svc: Service, *, system: str | None = None, home: Path | None = None,
            run: CommandRunner = run_command, uid: int | None = None,
            user: str | None = None) -> Plan:
    """Write the file and load it. Returns the plan that was carried out."""
    system = system or platform.system()
    home = Path(home or Path.home())
    plan = plan_install(svc, system=system, home=home, uid=uid, user=user)
    log = log_path(svc, system, home)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)   # launchd does not create it
    _write_atomic(plan.path, plan.content)
    for argv, must in plan.commands:
        _run(run, argv, check=must, hint=_hint(system))
    return plan


def uninstall(svc: Service, *, system: str | None = None, home: Path | None = None,
              run: CommandRunner = run_command, uid: int | None = None) -> tuple[Plan, bool]:
    """Unload and remove; (plan, whether a file was there). Unloading a service that is not
    loaded is not an error; a missing tool is (the file stays, nothing is half done)."""
    system = system or platform.system()
    plan = plan_uninstall(svc, system=system, home=home, uid=uid)
    existed = plan.path.exists()
    # Unloading something that is not loaded fails harmlessly; only a manager we cannot
    # reach at all stops us before the file is removed (the service may still be running).
    rc, out = _run(run, plan.commands[0][0], check=False)
    if rc != 0 and "Failed to connect to bus" in (out or ""):
        raise ServiceError(f"cannot reach the systemd user manager ({out.strip()}); "
                           f"{_hint(system)}. Nothing was removed")
    plan.path.unlink(missing_ok=True)
    for argv, _ in plan.commands[1:]:
        _run(run, argv, check=False)
    return plan, existed


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # 0600 before any byte is written: the file may hold an invite token.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


# ---- what the two CLIs call ----------------------------------------------------------------

RUNNER: CommandRunner = run_command   # tests replace it; nothing else should


def cli_install(svc: Service, dry_run: bool) -> list[str]:
    """Install (or with ``dry_run`` only describe) ``svc``; lines for the person."""
    if dry_run:
        return [plan_install(svc).describe()]
    plan = install(svc, run=RUNNER)
    return ([f"installed {svc.label if plan.path.suffix == '.plist' else svc.unit}: {plan.path}"]
            + [f"  ran: {' '.join(map(str, argv))}" for argv, _ in plan.commands]
            + [note.lstrip("# ") for note in plan.notes])


def cli_uninstall(svc: Service, dry_run: bool) -> list[str]:
    if dry_run:
        return [plan_uninstall(svc).describe()]
    plan, existed = uninstall(svc, run=RUNNER)
    return [f"removed {plan.path}" if existed else
            f"{plan.path} was not installed (unloaded it anyway, in case it was loaded)"]


def console_script(name: str, module: str) -> list[str]:
    """This venv's ``name`` executable (beside the running interpreter, not resolved through
    its symlink, which would leave the venv), else ``python -m module``."""
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), name)
    if os.access(script, os.X_OK):
        return [script]
    return [python, "-m", module]


# ---- building the command line from a click command ---------------------------------------

def argv_from_params(command, values: dict, skip: tuple = ()) -> list[str]:
    """Options of click ``command`` whose value in ``values`` differs from its default, as
    command-line words (flags as their name alone). Arguments are the caller's business."""
    words: list[str] = []
    for param in command.params:
        if getattr(param, "param_type_name", "") != "option" or param.name in skip:
            continue
        if param.name not in values:
            continue
        value = values[param.name]
        default = param.default() if callable(param.default) else param.default
        if value is None or value == default:
            continue
        flag = max(param.opts, key=len)   # the long spelling
        if param.is_flag:
            if value:
                words.append(flag)
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            words += [flag, str(v)]
    return words


def run_for_cli(action: Callable, svc: "Service", dry_run: bool) -> None:
    """Echo what ``cli_install``/``cli_uninstall`` did, line by line; a ServiceError becomes the
    CLI's one-line error (both CLIs' install commands end here)."""
    try:
        for line in action(svc, dry_run):
            click.echo(line)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None
