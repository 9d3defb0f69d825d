"""``autoresearch-coord install`` / ``uninstall``: the coordinator as a per-user service.

``install DIR [start options]`` writes and loads a LaunchAgent (macOS) or systemd user unit
(Linux) that runs ``autoresearch-coord start DIR ...`` from this venv at every login (see
``shared.service``). It takes ``start``'s options -- copied from the ``start`` command itself,
so the two never drift -- except ``--new-dataset``: baked into a service, every restart would
silently accept whatever dataset is current, which is what that flag exists to prevent.
The dataset is pinned as ``--data PATH`` at install time, for the same reason.
"""
from __future__ import annotations

import copy
from pathlib import Path

import click

NOT_FOR_SERVICES = ("directory", "new_dataset")
COORDINATOR_STOP_TIMEOUT = 60   # seconds: the coordinator stops at once on SIGINT


def _print_option(f):
    return click.option("--print", "--dry-run", "dry_run", is_flag=True,
                        help="Show the service file and the commands; write and load nothing.")(f)


def make_commands(start: click.Command) -> list[click.Command]:
    @click.command("install")
    @click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @_print_option
    def install(directory: Path, dry_run: bool, **opts) -> None:
        """Run `start DIRECTORY ...` in the background at every login: write and load a
        LaunchAgent (macOS) or a systemd user unit (Linux) with this venv's executable, the
        research repo, the bind address and the dataset filled in. Takes start's options.

        Logs: macOS ~/Library/Logs/autoresearch/autoresearch-coordinator.log; Linux the
        journal (journalctl --user -u autoresearch-coordinator -f). `uninstall` removes it.
        """
        from shared.service import Service, argv_from_params, carried_env, cli_install, \
            console_script, run_for_cli
        from trainer.dataset import DatasetError, resolve_dataset_dir

        repo = directory.expanduser().absolute()
        if not (repo / ".autoresearch").is_dir():
            raise click.ClickException(f"{repo} is not a research repo (no .autoresearch/): "
                                       "make one with `autoresearch-coord init DIR`")
        data = opts.get("data")
        if data is None:
            try:
                data = resolve_dataset_dir()
            except DatasetError as exc:
                raise click.ClickException(f"no dataset to serve: {exc}") from None
        opts["data"] = Path(data).expanduser().absolute()
        exe = console_script("autoresearch-coord", "coordinator.cli")
        argv = [*exe, "start", str(repo), *argv_from_params(install, opts)]
        if not opts.get("insecure"):
            # The key the workers will pin exists before the service first starts.
            from shared.keys import COORDINATOR_KEY_NAME, coordinator_key_dir, \
                load_or_create_keypair
            load_or_create_keypair(coordinator_key_dir(repo), COORDINATOR_KEY_NAME)
        svc = Service("coordinator", argv, description=f"autoresearch coordinator for {repo}",
                      env=carried_env(extra_path=str(Path(exe[0]).parent)),
                      stop_timeout=COORDINATOR_STOP_TIMEOUT)
        run_for_cli(cli_install, svc, dry_run)
        bind = str(opts.get("bind") or "")
        if "127.0.0.1" in bind or "localhost" in bind:
            click.echo(f"note: bound to {bind}: only this machine can join; install with "
                       "--bind tcp://0.0.0.0:5555 for the lab")

    for param in start.params:
        if param.name not in NOT_FOR_SERVICES and param.param_type_name == "option":
            install.params.insert(len(install.params) - 1, copy.deepcopy(param))

    @click.command("uninstall")
    @_print_option
    def uninstall(dry_run: bool) -> None:
        """Stop and remove the background coordinator `install` set up."""
        from shared.service import Service, cli_uninstall, console_script, run_for_cli

        run_for_cli(cli_uninstall, Service("coordinator",
                                    console_script("autoresearch-coord", "coordinator.cli")),
             dry_run)

    return [install, uninstall]
