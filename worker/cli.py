"""``autoresearch-worker``: lend this machine to a coordinator.

    autoresearch-worker join tcp://HOST:5555 --server-key KEY [--invite TOKEN] [--name NAME]
                             [--cache-dir DIR] [--threads N] [--insecure]
    autoresearch-worker install tcp://HOST:5555 [join options]   # background service, at login
    autoresearch-worker uninstall [--name NAME]
    autoresearch-worker key                     # this machine's worker public key
    autoresearch-worker profile [--threads N] [--json]

Keys: this machine's worker keypair is ``<key dir>/worker.key[_secret]`` (``$AUTORESEARCH_KEYS``
or ``~/.config/autoresearch/keys``), made on first use. The coordinator's key comes from
``--server-key`` (then remembered for that endpoint), else $AUTORESEARCH_SERVER_KEY, else the
remembered pin (see shared.pins). Exit codes: 0 left cleanly, 2 version mismatch, 3 not trusted
/ revoked (the message says what the admin runs), 4 the coordinator does not hold the pinned key
(nothing was run), 130 interrupted.

Ctrl-C once: finish the current attempt, report it, leave. Twice: cancel it and leave now.
"""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import click

from shared.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, RECONNECT_INITIAL, RECONNECT_MAX

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "worker"


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Run train.py variants for an autoresearch coordinator."""


def join_options(f):
    """The options of ``join``, shared with ``install`` (which passes the same ones on)."""
    options = [
        click.option("--name", default=None,
                     help="Name shown by the coordinator (default: host name)."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, envvar="AUTORESEARCH_CACHE",
                     help="Data cache and run directories (default: $AUTORESEARCH_CACHE or "
                          "~/.cache/autoresearch)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="BLAS threads for the trainer (CPU backend). Split the cores when "
                          "several workers share one machine."),
        click.option("--heartbeat-interval", type=click.FloatRange(min=0.01),
                     default=HEARTBEAT_INTERVAL, show_default=True,
                     envvar="AUTORESEARCH_HEARTBEAT_INTERVAL", metavar="S",
                     help="Heartbeat seconds until the coordinator's welcome sets its own."),
        click.option("--liveness", type=click.IntRange(min=1), default=HEARTBEAT_LIVENESS,
                     show_default=True, envvar="AUTORESEARCH_LIVENESS",
                     help="Missed heartbeats before the coordinator is presumed dead."),
        click.option("--reconnect-max", type=click.FloatRange(min=0.01), default=RECONNECT_MAX,
                     show_default=True, envvar="AUTORESEARCH_RECONNECT_MAX", metavar="S",
                     help="Longest wait between reconnect attempts."),
        click.option("--server-key", default=None, metavar="KEY",
                     help="The coordinator's public key (printed by `autoresearch-coord "
                          "start`); remembered for ENDPOINT. Default: $AUTORESEARCH_SERVER_KEY, "
                          "else the remembered one."),
        click.option("--invite", default=None, metavar="TOKEN",
                     help="One-time token from `autoresearch-coord invite`: enrols this "
                          "machine's key if the coordinator does not trust it yet."),
        click.option("--insecure", is_flag=True,
                     help="No keys, plain TCP: only for a coordinator started with --insecure."),
        click.option("--allow-battery", is_flag=True,
                     help="Take new work on battery power too. By default a laptop takes new "
                          "work only on AC power: unplugged, it finishes the current run and "
                          "pauses until plugged in."),
        click.option("--when-idle", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="MINUTES",
                     help="Take new work only when the keyboard and mouse have been idle this "
                          "long (macOS); a run that has started always finishes."),
        click.option("--memory-gb", type=click.FloatRange(min=0, min_open=True), default=None,
                     envvar="AUTORESEARCH_MEMORY_GB", metavar="GB",
                     help="Report this much memory instead of what the machine says (its "
                          "hardware class follows). For tests and machines that misreport; "
                          "leave it unset otherwise."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _check_endpoint(endpoint: str) -> None:
    if "://" not in endpoint:
        raise click.BadParameter(f"{endpoint!r} is not a ZeroMQ endpoint like tcp://HOST:5555",
                                 param_hint="ENDPOINT")


def _check_when_idle(when_idle: float | None) -> None:
    from worker.idle import idle_supported

    if when_idle and not idle_supported():
        raise click.UsageError("--when-idle needs macOS's keyboard/mouse idle time; this "
                               "system cannot tell when it is idle")


def _server_key(endpoint: str, server_key: str | None, invite: str | None,
                insecure: bool, save: bool = True) -> bytes | None:
    """The pinned coordinator key for ENDPOINT (saved when --server-key gives one), or None
    with --insecure. Errors are one line."""
    from shared.keys import KeyFileError
    from shared.pins import PinError, require_server_key, save_pin

    if insecure:
        if server_key or invite:
            raise click.UsageError("--insecure takes no --server-key/--invite (no keys at all)")
        return None
    try:
        pinned = require_server_key(endpoint, server_key)
        if server_key and save:
            old = save_pin(endpoint, pinned)
            if old:
                click.echo(f"note: replaced the pinned key for {endpoint}", err=True)
        return pinned
    except (PinError, KeyFileError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("endpoint")
@join_options
def join(endpoint: str, name: str | None, cache_dir: Path | None, threads: int | None,
         heartbeat_interval: float, liveness: int, reconnect_max: float,
         server_key: str | None, invite: str | None, insecure: bool, allow_battery: bool,
         when_idle: float | None, memory_gb: float | None) -> None:
    """Join the coordinator at ENDPOINT (e.g. tcp://lab-mac.local:5555) and train until Ctrl-C.

    The coordinator must hold the key given by --server-key (else this worker refuses to run
    anything) and must trust this machine's worker key: if it does not, the worker prints its
    key and the one command the coordinator's admin runs, or enrols itself with --invite.
    The coordinator's dataset is fetched into --cache-dir on first join (no internet needed).

    On someone's laptop: new work only on AC power (--allow-battery lifts it) and, with
    --when-idle, only when nobody has touched the keyboard or mouse for that long. A run that
    has started always finishes and is reported; then the worker pauses, and the coordinator's
    status says why. During each run the Mac is kept awake (caffeinate, tied to the trainer's
    pid). The machine's thermal state, memory pressure and swap at the start and end of every
    run go with its result; a run the machine slowed is not counted and runs again.

    To run it in the background at every login instead, use `autoresearch-worker install`
    with the same arguments.
    """
    from shared.keys import KeyFileError, WORKER_KEY_NAME, default_key_dir, \
        load_or_create_keypair
    from worker.agent import Agent, AgentConfig, default_cache_dir
    from worker.profile import profile_machine

    _check_endpoint(endpoint)
    _check_when_idle(when_idle)
    pinned = _server_key(endpoint, server_key, invite, insecure)
    keypair = None
    if not insecure:
        try:
            keypair = load_or_create_keypair(default_key_dir(), WORKER_KEY_NAME)
        except (KeyFileError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    cfg = AgentConfig(endpoint=endpoint, name=name or default_name(),
                      cache_dir=(cache_dir or default_cache_dir()).expanduser(), threads=threads,
                      heartbeat_interval=heartbeat_interval, liveness=liveness,
                      reconnect_initial=min(RECONNECT_INITIAL, reconnect_max),
                      reconnect_max=reconnect_max, keypair=keypair, server_key=pinned,
                      invite=invite, allow_battery=allow_battery,
                      when_idle=when_idle * 60 if when_idle else None)
    profile = profile_machine(threads, memory_gb=memory_gb)
    agent = Agent(cfg, profile)
    agent.install_signal_handlers()
    sys.exit(agent.run())


def print_option(f):
    return click.option("--print", "--dry-run", "dry_run", is_flag=True,
                        help="Show the service file and the commands; write and load nothing.")(f)


@main.command()
@click.argument("endpoint")
@join_options
@print_option
def install(endpoint: str, dry_run: bool, **opts) -> None:
    """Run `join ENDPOINT ...` in the background at every login: write and load a LaunchAgent
    (macOS) or a systemd user unit (Linux) with this venv's executable, the endpoint, the
    pinned coordinator key and the worker name filled in. Takes the same options as join.

    Logs: macOS ~/Library/Logs/autoresearch/autoresearch-worker-NAME.log; Linux the journal
    (journalctl --user -u autoresearch-worker-NAME -f). Remove with `uninstall --name NAME`.
    Installing again with the same name replaces the service.
    """
    from shared.service import Service, ServiceError, argv_from_params, carried_env, run_for_cli, \
        cli_install, console_script
    from worker.agent import default_cache_dir

    _check_endpoint(endpoint)
    _check_when_idle(opts["when_idle"])
    name = opts["name"] or default_name()
    key = _server_key(endpoint, opts["server_key"], opts["invite"], opts["insecure"],
                      save=not dry_run)
    exe = console_script("autoresearch-worker", "worker.cli")
    cache = (opts["cache_dir"] or default_cache_dir()).expanduser().absolute()
    argv = [*exe, "join", endpoint, "--name", name, "--cache-dir", str(cache)]
    if key is not None:
        argv += ["--server-key", key.decode("ascii") if isinstance(key, bytes) else str(key)]
    argv += argv_from_params(join, opts, skip=("name", "cache_dir", "server_key"))
    try:
        svc = Service("worker", argv, name=name, description=f"autoresearch worker {name}",
                      env=carried_env(extra_path=str(Path(exe[0]).parent)), nice=5)
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    run_for_cli(cli_install, svc, dry_run)


@main.command()
@click.option("--name", default=None, help="The worker name it was installed with "
                                           "(default: host name).")
@print_option
def uninstall(name: str | None, dry_run: bool) -> None:
    """Stop and remove the background worker `install` set up (a Linux worker finishes its
    current run first; launchd cancels it, and the coordinator requeues it)."""
    from shared.service import Service, ServiceError, cli_uninstall, console_script, run_for_cli

    try:
        svc = Service("worker", console_script("autoresearch-worker", "worker.cli"),
                      name=name or default_name())
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    run_for_cli(cli_uninstall, svc, dry_run)


@main.command()
def key() -> None:
    """Print this machine's worker public key (made on first use) and its fingerprint.

    Give it to the coordinator's admin: autoresearch-coord trust KEY --name NAME --role worker
    """
    from shared.keys import WORKER_KEY_NAME, default_key_dir, fingerprint, load_or_create_keypair

    kp = load_or_create_keypair(default_key_dir(), WORKER_KEY_NAME)
    click.echo(kp.public_str)
    click.echo(f"fingerprint {fingerprint(kp.public)}", err=True)


@main.command()
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="BLAS threads the trainer would use (part of the hardware class on CPU).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the full profile as JSON, with the conditions now under \"now\".")
def profile(threads: int | None, as_json: bool) -> None:
    """Show this machine's profile, the hardware class its numbers are compared in, and what
    the worker sees now: power source, thermal state, memory pressure, idle time."""
    from worker.conditions import describe_conditions, read_conditions
    from worker.profile import profile_machine

    prof = profile_machine(threads)
    now = read_conditions()
    if as_json:
        click.echo(json.dumps({**prof, "now": now}, indent=2, sort_keys=True))
        return
    click.echo(f"hardware class: {prof['hw_class']}")
    for key in ("chip", "cpu_count", "os", "os_version", "backend", "mlx_version",
                "blas_threads"):
        click.echo(f"  {key}: {prof.get(key)}")
    click.echo(f"  memory: {_gib(prof.get('memory_bytes'))} installed, "
               f"{_gib(prof.get('usable_memory_bytes'))} usable by one run")
    click.echo("now:")
    for label, text in describe_conditions(now):
        click.echo(f"  {label}: {text}")


def _gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if isinstance(n, (int, float)) and n else "unknown"


if __name__ == "__main__":
    main()
