"""``autoresearch-worker``: lend this machine to a coordinator.

    autoresearch-worker join tcp://HOST:5555 --server-key KEY [--invite TOKEN] [--name NAME]
                             [--cache-dir DIR] [--threads N] [--insecure]
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


@main.command()
@click.argument("endpoint")
@click.option("--name", default=None, help="Name shown by the coordinator (default: host name).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="AUTORESEARCH_CACHE",
              help="Data cache and run directories (default: $AUTORESEARCH_CACHE or "
                   "~/.cache/autoresearch).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="BLAS threads for the trainer (CPU backend). Split the cores when several "
                   "workers share one machine.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01), default=HEARTBEAT_INTERVAL,
              show_default=True, envvar="AUTORESEARCH_HEARTBEAT_INTERVAL", metavar="S",
              help="Heartbeat seconds until the coordinator's welcome sets its own.")
@click.option("--liveness", type=click.IntRange(min=1), default=HEARTBEAT_LIVENESS,
              show_default=True, envvar="AUTORESEARCH_LIVENESS",
              help="Missed heartbeats before the coordinator is presumed dead.")
@click.option("--reconnect-max", type=click.FloatRange(min=0.01), default=RECONNECT_MAX,
              show_default=True, envvar="AUTORESEARCH_RECONNECT_MAX", metavar="S",
              help="Longest wait between reconnect attempts.")
@click.option("--server-key", default=None, metavar="KEY",
              help="The coordinator's public key (printed by `autoresearch-coord start`); "
                   "remembered for ENDPOINT. Default: $AUTORESEARCH_SERVER_KEY, else the "
                   "remembered one.")
@click.option("--invite", default=None, metavar="TOKEN",
              help="One-time token from `autoresearch-coord invite`: enrols this machine's key "
                   "if the coordinator does not trust it yet.")
@click.option("--insecure", is_flag=True,
              help="No keys, plain TCP: only for a coordinator started with --insecure.")
def join(endpoint: str, name: str | None, cache_dir: Path | None, threads: int | None,
         heartbeat_interval: float, liveness: int, reconnect_max: float,
         server_key: str | None, invite: str | None, insecure: bool) -> None:
    """Join the coordinator at ENDPOINT (e.g. tcp://lab-mac.local:5555) and train until Ctrl-C.

    The coordinator must hold the key given by --server-key (else this worker refuses to run
    anything) and must trust this machine's worker key: if it does not, the worker prints its
    key and the one command the coordinator's admin runs, or enrols itself with --invite.
    The coordinator's dataset is fetched into --cache-dir on first join (no internet needed).
    """
    from shared.keys import KeyFileError, WORKER_KEY_NAME, default_key_dir, \
        load_or_create_keypair
    from shared.pins import PinError, require_server_key, save_pin
    from worker.agent import Agent, AgentConfig, default_cache_dir
    from worker.profile import profile_machine

    if "://" not in endpoint:
        raise click.BadParameter(f"{endpoint!r} is not a ZeroMQ endpoint like tcp://HOST:5555",
                                 param_hint="ENDPOINT")
    keypair = pinned = None
    if insecure:
        if server_key or invite:
            raise click.UsageError("--insecure takes no --server-key/--invite (no keys at all)")
    else:
        try:
            pinned = require_server_key(endpoint, server_key)
            keypair = load_or_create_keypair(default_key_dir(), WORKER_KEY_NAME)
            if server_key:
                old = save_pin(endpoint, pinned)
                if old:
                    click.echo(f"note: replaced the pinned key for {endpoint}", err=True)
        except (PinError, KeyFileError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
    cfg = AgentConfig(endpoint=endpoint, name=name or default_name(),
                      cache_dir=(cache_dir or default_cache_dir()).expanduser(), threads=threads,
                      heartbeat_interval=heartbeat_interval, liveness=liveness,
                      reconnect_initial=min(RECONNECT_INITIAL, reconnect_max),
                      reconnect_max=reconnect_max, keypair=keypair, server_key=pinned,
                      invite=invite)
    profile = profile_machine(threads)
    agent = Agent(cfg, profile)
    agent.install_signal_handlers()
    sys.exit(agent.run())


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
@click.option("--json", "as_json", is_flag=True, help="Print the full profile as JSON.")
def profile(threads: int | None, as_json: bool) -> None:
    """Show this machine's profile and the hardware class its numbers are compared in."""
    from worker.profile import profile_machine

    prof = profile_machine(threads)
    if as_json:
        click.echo(json.dumps(prof, indent=2, sort_keys=True))
        return
    click.echo(f"hardware class: {prof['hw_class']}")
    for key in ("chip", "cpu_count", "memory_bytes", "os", "os_version", "backend",
                "mlx_version", "blas_threads"):
        click.echo(f"  {key}: {prof.get(key)}")


if __name__ == "__main__":
    main()
