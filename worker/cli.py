"""``autoresearch-worker``: lend this machine to a coordinator.

    autoresearch-worker join tcp://HOST:5555 [--name NAME] [--cache-dir DIR] [--threads N]
    autoresearch-worker profile [--threads N] [--json]

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
def join(endpoint: str, name: str | None, cache_dir: Path | None, threads: int | None,
         heartbeat_interval: float, liveness: int, reconnect_max: float) -> None:
    """Join the coordinator at ENDPOINT (e.g. tcp://lab-mac.local:5555) and train until Ctrl-C."""
    from worker.agent import Agent, AgentConfig, default_cache_dir
    from worker.profile import profile_machine

    if "://" not in endpoint:
        raise click.BadParameter(f"{endpoint!r} is not a ZeroMQ endpoint like tcp://HOST:5555",
                                 param_hint="ENDPOINT")
    cfg = AgentConfig(endpoint=endpoint, name=name or default_name(),
                      cache_dir=(cache_dir or default_cache_dir()).expanduser(), threads=threads,
                      heartbeat_interval=heartbeat_interval, liveness=liveness,
                      reconnect_initial=min(RECONNECT_INITIAL, reconnect_max),
                      reconnect_max=reconnect_max)
    profile = profile_machine(threads)
    agent = Agent(cfg, profile)
    agent.install_signal_handlers()
    sys.exit(agent.run())


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
