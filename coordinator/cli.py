"""``autoresearch-coord``: make a research repo, run the coordinator, talk to it.

    autoresearch-coord init DIR [--tag T] [--preset seed|upstream-h100|tiny] [--budget S] ...
    autoresearch-coord start DIR [--bind tcp://127.0.0.1:5555] [--data PATH] [--new-dataset]
                                 [--insecure] [--dashboard [HOST:]PORT]
    autoresearch-coord key [DIR]                       coordinator public key + fingerprint
    autoresearch-coord trust KEY|FILE --name NAME --role worker|submitter|admin [--dir DIR]
    autoresearch-coord revoke KEY|FINGERPRINT|NAME [--dir DIR]
    autoresearch-coord keys [--dir DIR] [--json]       the trust list
    autoresearch-coord invite [--dir DIR] [--role worker] [--name N] [--ttl S]
    autoresearch-coord submit FILE|- -m "what changed" [--connect EP] [--server-key KEY] [--json]
    autoresearch-coord status [--json] [--watch [--every S]] [--dir DIR]
    autoresearch-coord log [-n N] [--json] [--dir DIR]
    autoresearch-coord retry ID --reason "why"          queue a failed candidate again (admin)
    autoresearch-coord export [PATH] [--dir DIR]
    autoresearch-coord agents --count N --command 'CMD {brief} ...' [--timeout S] [--slack K]
                              [--out DIR]              keep N proposer agents busy
    autoresearch-coord sweep --param NAME=SPEC ... [--count N] [--mode grid|random] [--seed S]
    autoresearch-coord report DIR [-o OUTDIR] [--no-plot] [--json]
    autoresearch-coord install DIR [start options] [--print]   background service at login
    autoresearch-coord uninstall [--print]

Client commands find the coordinator through ``--connect``, else $AUTORESEARCH_COORD, else
tcp://127.0.0.1:5555, and its key through ``--server-key``, else $AUTORESEARCH_SERVER_KEY, else
the pin for that endpoint (``start`` pins its own endpoints for the user who runs it), with this
user's client keypair (``<key dir>/client``); ``--insecure`` talks plain TCP to a coordinator
started with ``--insecure``.

Security model: ``init`` makes the coordinator's keypair (``DIR/.autoresearch/keys``, secret
0600; ``start`` makes one for older repos). ``start`` trusts the local user's client key as
``admin`` -- the person who starts the coordinator on this machine administers it -- so local
``submit/status`` just work. Everyone else is on the trust list via ``trust`` (an admin pastes a
key) or ``invite`` (a one-time token a new machine enrols itself with). The trust commands work
on the ledger of DIR directly (``--dir``, else $AUTORESEARCH_DIR, else the current directory),
also while the coordinator runs: a ``revoke`` takes effect on that key's next message.

Commands import the modules they use inside their own function: eager imports of every
command's modules (ZeroMQ, numpy through the dataset code) triple the start-up of ``--help``
and of the trust commands (0.1 s -> 0.35 s measured here).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from coordinator.repo import DECISION_DEFAULTS
from shared.client import ENDPOINT_ENV, Client, ClientError, default_endpoint
from shared.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, RECONNECT_MAX, REQUEST_TIMEOUT

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DIR_ENV = "AUTORESEARCH_DIR"
DANGER = ("WARNING: no encryption or authentication: anyone who can reach this port can "
          "submit code that every worker runs. Use only on a network you trust.")


def connect_option(f):
    f = click.option("--insecure", is_flag=True,
                     help="No keys, plain TCP (for a coordinator started with --insecure).")(f)
    f = click.option("--server-key", default=None, metavar="KEY",
                     help="The coordinator's public key (default: $AUTORESEARCH_SERVER_KEY, "
                          "else the key pinned for the endpoint).")(f)
    return click.option(
        "--connect", "endpoint", default=None, metavar="ENDPOINT",
        help=f"Coordinator to talk to (default: ${ENDPOINT_ENV} or tcp://127.0.0.1:5555).")(f)


def dir_option(f):
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
        default=None, envvar=DIR_ENV,
        help=f"Research repo whose trust list to use (default: ${DIR_ENV}, else the current "
             "directory).")(f)


def _repo_dir(directory: Path | None) -> Path:
    d = (directory or Path.cwd()).expanduser()
    if not (d / ".autoresearch").is_dir():
        raise click.ClickException(f"{d} is not a research repo (no .autoresearch/): pass "
                                   f"--dir DIR or set ${DIR_ENV}")
    return d


def _trust_store(directory: Path | None):
    from coordinator.trust import TrustStore

    from coordinator.ledger import LedgerRefused

    try:
        return TrustStore.open(_repo_dir(directory))
    except (FileNotFoundError, LedgerRefused) as exc:
        raise click.ClickException(str(exc)) from None


def _coordinator_keypair(directory: Path):
    from shared.keys import COORDINATOR_KEY_NAME, coordinator_key_dir, load_or_create_keypair

    return load_or_create_keypair(coordinator_key_dir(directory), COORDINATOR_KEY_NAME)


def timeout_option(f):
    return click.option("--timeout", type=click.FloatRange(min=0.1), default=REQUEST_TIMEOUT,
                        show_default=True, help="Seconds to wait for the coordinator.")(f)


def _client(endpoint: str | None, timeout: float, server_key: str | None = None,
            insecure: bool = False) -> Client:
    from shared.keys import KeyFileError
    from shared.pins import PinError, require_server_key

    ep = endpoint or default_endpoint()
    if insecure:
        if server_key:
            raise click.UsageError("--insecure takes no --server-key")
        return Client(ep, timeout=timeout, insecure=True)
    try:
        key = require_server_key(ep, server_key)
        return Client(ep, timeout=timeout, server_key=key)
    except (PinError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None


def _call(fn, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Coordinate a fleet of workers researching one train.py.

    One machine runs `start`; every other runs `autoresearch-worker join`; anyone submits.
    """


# ---- init ---------------------------------------------------------------------------------

def _setting(flag: str, kind, metavar: str | None, text: str, key: str | None = None):
    """An ``init`` option for one run setting: unset (None) leaves the preset's value or the
    decision rule's default, which the help shows from its one definition (DECISION_DEFAULTS)."""
    key = key or flag.lstrip("-").replace("-", "_")
    if key in DECISION_DEFAULTS:
        text += f" [{DECISION_DEFAULTS[key]}]"
    return click.option(flag, key, type=kind, default=None, metavar=metavar, help=text)

@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tag", default=None, help="Research run name: the branch is autoresearch/<tag>.")
@click.option("--preset", type=click.Choice(["seed", "upstream-h100", "tiny"]), default="seed",
              show_default=True,
              help="Model size and run settings: seed = the seed article's Mac run, "
                   "upstream-h100 = the same with upstream's 13x larger eval, tiny = a 2-core CPU.")
@_setting("--budget", click.IntRange(min=1), "S",
          "Training seconds per attempt (overrides the preset).", key="time_budget")
@_setting("--seq-len", click.IntRange(min=1), "T", "Sequence length (overrides the preset).")
@_setting("--eval-tokens", click.IntRange(min=1), "N",
          "Validation tokens evaluated (overrides the preset).")
@_setting("--margin", click.FloatRange(min=0.0), None,
          "val_bpb improvement a candidate needs over the head to be kept.")
@_setting("--policy", click.Choice(["sequential", "greedy"]), None,
          "How candidates are decided: sequential (screen, paired repeats, a test) or greedy "
          "(one run against the head's mean).")
@_setting("--head-runs", click.IntRange(min=1), "N",
          "Runs of the head on a class before anything is decided there.")
@_setting("--max-repeats", click.IntRange(min=1), "N", "Runs of one candidate on a class, at most.")
@_setting("--confidence", click.FloatRange(min=0.5, max=1.0, max_open=True), None,
          "One-sided confidence a keep needs.")
@_setting("--screen", float, "SIGMA",
          "σ a candidate's first run must beat the head's mean by to be repeated.")
@_setting("--remeasure-every", click.IntRange(min=0), "N",
          "Re-run the head on a class after every N decisions there (0: never).")
@_setting("--remeasure-seconds", click.FloatRange(min=0.0), "S",
          "Re-run the head on a class when its newest run is older than S seconds (0: never).")
@_setting("--noise-prior", click.FloatRange(min=0.0, min_open=True), "SIGMA",
          "σ of one run (bpb) used until a class has enough repeats to measure it.")
@click.option("--train-py", "train_py", type=click.File("r", encoding="utf-8"), default=None,
              metavar="FILE", help="Start from this train.py instead of the preset's baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print what was made as JSON.")
def init(directory: Path, tag: str | None, preset: str, time_budget: int | None,
         seq_len: int | None, eval_tokens: int | None, margin: float | None,
         policy: str | None, head_runs: int | None, max_repeats: int | None,
         confidence: float | None, screen: float | None, remeasure_every: int | None,
         remeasure_seconds: float | None, noise_prior: float | None,
         train_py, as_json: bool) -> None:
    """Create a research repo in DIRECTORY (git, baseline train.py, ledger).

    Every setting is fixed for the life of the run, stored with it and printed in program.md.
    """
    from coordinator.repo import init_repo

    overrides = {k: v for k, v in (("time_budget", time_budget), ("seq_len", seq_len),
                                   ("eval_tokens", eval_tokens), ("margin", margin),
                                   ("policy", policy), ("head_runs", head_runs),
                                   ("max_repeats", max_repeats), ("confidence", confidence),
                                   ("screen", screen), ("remeasure_every", remeasure_every),
                                   ("remeasure_seconds", remeasure_seconds),
                                   ("noise_prior", noise_prior))
                 if v is not None}
    try:
        made = init_repo(directory, tag=tag, preset=preset,
                         train_py=train_py.read() if train_py else None, **overrides)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    info = dataclasses.asdict(made) if dataclasses.is_dataclass(made) else dict(made or {})
    if as_json:
        info["server_key"] = _coordinator_keypair(directory).public_str
        click.echo(json.dumps(info, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"research repo {info.get('repo_dir', directory)}")
    click.echo(f"  {'branch':<18}{info.get('branch')} at {str(info.get('baseline_commit'))[:10]} "
               f"(baseline train.py, preset {info.get('preset')})")
    for key, value in (info.get("settings") or {}).items():
        click.echo(f"  {key:<18}{value}")
    click.echo(f"  {'ledger':<18}.autoresearch/ (ignored by git)")
    from shared.keys import fingerprint
    kp = _coordinator_keypair(directory)
    click.echo(f"  {'server key':<18}{kp.public_str} (fingerprint {fingerprint(kp.public)})")
    click.echo(f"next: autoresearch-coord start {directory}")


# ---- start --------------------------------------------------------------------------------

@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True,
              help="ZeroMQ endpoint to listen on (tcp://0.0.0.0:5555 for the whole network; "
                   "port 0 or * picks a free one).")
@click.option("--data", "data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, metavar="PATH",
              help="Prepared dataset to serve to workers (default: $AUTORESEARCH_DATA, else the "
                   "CURRENT dataset of $AUTORESEARCH_CACHE).")
@click.option("--new-dataset", is_flag=True,
              help="Accept a dataset other than the one this run started with (results "
                   "measured on different data are not comparable).")
@click.option("--insecure", is_flag=True,
              help="No CURVE: plain TCP, no keys, everyone trusted. The only way to bind a "
                   "non-loopback address without encryption.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01), metavar="S",
              default=HEARTBEAT_INTERVAL, show_default=True,
              help="Seconds between heartbeats (workers adopt it).")
@click.option("--liveness", type=click.IntRange(min=1), default=HEARTBEAT_LIVENESS,
              show_default=True, help="Missed heartbeats before a worker is declared lost.")
@click.option("--restart-grace", type=click.FloatRange(min=0.0), default=RECONNECT_MAX,
              show_default=True, metavar="S",
              help="After a restart, extra seconds (beyond the liveness window) for workers that "
                   "held leases to reconnect before their candidates are requeued.")
@click.option("--dashboard", "dashboard_at", default=None, metavar="[HOST:]PORT",
              help="Also serve the live dashboard (read-only web page) on PORT of 127.0.0.1; "
                   "naming a HOST (e.g. 0.0.0.0:8080) is the only way to let other machines "
                   "read it.")
def start(directory: Path, bind: str, data: Path | None, new_dataset: bool, insecure: bool,
          heartbeat_interval: float, liveness: int, restart_grace: float,
          dashboard_at: str | None) -> None:
    """Run the coordinator for the research repo in DIRECTORY until Ctrl-C.

    CURVE is on unless --insecure: the coordinator's key (made by init, or now) is printed
    with the exact join command; this user's client key is trusted as admin and pinned, so
    local submit/status need no flags. The prepared dataset is served to workers, which fetch
    it on join; the first start records its hash and later starts refuse another dataset
    unless --new-dataset.
    """
    from coordinator.core import Coordinator
    from coordinator.dashboard import DashboardError, parse_address
    from coordinator.server import is_loopback_endpoint, join_endpoint, serve, stamp
    from shared.datasync import DatasetServer, DataSyncError
    from trainer.dataset import DatasetError, resolve_dataset_dir

    try:
        dash_addr = parse_address(dashboard_at) if dashboard_at is not None else None
    except DashboardError as exc:
        raise click.BadParameter(str(exc), param_hint="--dashboard") from None
    try:
        dataset = DatasetServer(data if data is not None else resolve_dataset_dir())
    except (DatasetError, DataSyncError) as exc:
        raise click.ClickException(f"no dataset to serve: {exc} (run `autoresearch-prepare "
                                   "--sample` first, or pass --data PATH)") from None
    keypair = None
    if not insecure:
        try:
            keypair = _coordinator_keypair(directory)
        except Exception as exc:
            raise click.ClickException(f"coordinator key: {exc}") from None
    try:
        core = Coordinator(directory)
    except Exception as exc:
        # LedgerError (a RuntimeError) covers a refused ledger: one line, file and remedy.
        if type(exc).__name__ in ("CoordinatorBusy", "FileNotFoundError", "ValueError") \
                or isinstance(exc, RuntimeError):
            raise click.ClickException(str(exc)) from None
        raise
    try:
        manifest = dataset.manifest()
        _check_dataset(core, manifest, new_dataset)
        admin = _trust_local_admin(core) if keypair is not None else None
        dash = _start_dashboard(directory, dash_addr) if dash_addr is not None else None
    except click.ClickException:
        core.close()
        raise

    def banner(endpoint: str) -> None:
        from shared.keys import fingerprint

        p = lambda s="": click.echo(s)  # noqa: E731
        ep = join_endpoint(endpoint)
        p(f"{stamp()} coordinator for {directory.resolve()} listening on {endpoint}")
        # What reconcile() repaired in git at this start (the ledger is the truth): said here,
        # in the coordinator's own log, not only in `status`.
        for fix in core.fixed:
            p(f"{stamp()} reconciled git with the ledger: {fix}")
        for problem in core.problems:
            p(f"{stamp()} problem: {problem}")
        p(f"  dataset {manifest['name']} ({manifest['dataset_hash'][:12]}) from {dataset.dir}")
        if dash is not None:
            p(f"  dashboard {dash.url} (read-only; no keys shown)" + (
                "" if dash.loopback else " -- readable by anyone who can reach this address"))
        if keypair is None:
            if not is_loopback_endpoint(bind):
                p(DANGER)
            p(f"  workers join with:  autoresearch-worker join {ep} --insecure")
            p(f"  submit with:        autoresearch-coord submit train.py -m 'what changed' "
              f"--connect {ep} --insecure")
            p(f"  watch with:         autoresearch-coord status --connect {ep} --insecure")
        else:
            _pin_local(endpoint, ep, keypair.public)
            with core.ledger.tx():
                core.ledger.set_meta("endpoint", ep)
            key = shlex.quote(keypair.public_str)   # Z85 holds shell characters: ( ) $ & ...
            p(f"  server key {keypair.public_str} (fingerprint {fingerprint(keypair.public)})")
            p(f"  workers join with:  autoresearch-worker join {ep} --server-key {key}")
            p(f"  a new worker is told its key; trust it with: autoresearch-coord trust KEY "
              f"--name NAME --role worker --dir {directory}")
            p(f"  or let a machine enrol itself: autoresearch-coord invite --dir {directory}")
            p(f"  submit with:        autoresearch-coord submit train.py -m 'what changed' "
              f"--connect {ep} --server-key {key}")
            p(f"  watch with:         autoresearch-coord status --connect {ep}")
            if admin:
                p(f"  (this user's client key {admin} is trusted as admin and pinned)")
        sys.stdout.flush()

    from shared.awake import KeepAwake
    # A coordinator Mac that idle-sleeps stalls the whole fleet (macOS only; else a no-op).
    awake = KeepAwake.start(os.getpid())
    try:
        serve(core, bind, heartbeat_interval=heartbeat_interval, liveness=liveness,
              banner=banner, keypair=keypair, dataset=dataset, restart_grace=restart_grace,
              snapshot=dash.holder if dash is not None else None)
    except zmq_error() as exc:
        raise click.ClickException(f"cannot listen on {bind}: {exc}") from None
    finally:
        awake.stop()
        if dash is not None:
            dash.stop()
        core.close()


def _start_dashboard(directory: Path, addr: tuple[str, int, bool]):
    """The live dashboard for ``start``: loopback unless the address named a host."""
    from coordinator.dashboard import Dashboard, DashboardError, SnapshotHolder

    host, port, named = addr
    try:
        return Dashboard(SnapshotHolder(), directory, host, port, public=named).start()
    except DashboardError as exc:
        raise click.ClickException(str(exc)) from None


def zmq_error():
    import zmq
    return zmq.ZMQError


def _check_dataset(core, manifest: dict, new_dataset: bool) -> None:
    """The first start records the dataset's hash; later starts must serve the same one."""
    stored = core.ledger.get_meta("dataset")
    now = {"name": manifest["name"], "dataset_hash": manifest["dataset_hash"]}
    if stored and stored.get("dataset_hash") != now["dataset_hash"] and not new_dataset:
        raise click.ClickException(
            f"this run was measured on dataset {stored.get('name')} "
            f"({str(stored.get('dataset_hash'))[:12]}) but {now['name']} "
            f"({now['dataset_hash'][:12]}) was given: val_bpb on different data is not "
            "comparable. Pass the original with --data, or --new-dataset to switch anyway")
    if stored != now:
        with core.ledger.tx():
            core.ledger.set_meta("dataset", now)


def _trust_local_admin(core) -> str | None:
    """Trust this user's client key as admin (the person who starts the coordinator on this
    machine administers it). Returns its fingerprint; leaves a revoked key revoked."""
    import socket

    from coordinator.trust import TrustError, TrustStore
    from shared.keys import CLIENT_KEY_NAME, default_key_dir, load_or_create_keypair

    kp = load_or_create_keypair(default_key_dir(), CLIENT_KEY_NAME)
    with TrustStore.open(core.repo_dir) as store:
        entry = store.lookup(kp.public)
        if entry is not None and (not entry.active or entry.role == "admin"):
            return entry.fingerprint if entry.active else None
        base = f"{socket.gethostname().split('.')[0] or 'local'}-admin"
        for name in (base, f"{base}-{kp.public_str[:4]}"):
            try:
                return store.trust(kp.public, name, "admin").fingerprint
            except TrustError:
                continue
    return None


def _pin_local(bound: str, join_ep: str, public: bytes) -> None:
    """Pin our key for every spelling of our endpoint this user may type."""
    from shared.pins import save_pin

    scheme, _, rest = bound.partition("://")
    eps = {bound, join_ep}
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if host in ("0.0.0.0", "*", "127.0.0.1", "localhost", "[::]", "::"):
            eps |= {f"tcp://127.0.0.1:{port}", f"tcp://localhost:{port}"}
    for ep in eps:
        try:
            save_pin(ep, public)
        except OSError:
            pass


# ---- keys and trust -----------------------------------------------------------------------

@main.command("key")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default=None,
                required=False)
def key_command(directory: Path | None) -> None:
    """Print the coordinator's public key and fingerprint (DIRECTORY: the research repo,
    default $AUTORESEARCH_DIR or the current directory)."""
    from shared.keys import fingerprint

    d = _repo_dir(directory or (Path(os.environ[DIR_ENV]) if os.environ.get(DIR_ENV) else None))
    kp = _coordinator_keypair(d)
    click.echo(kp.public_str)
    click.echo(f"fingerprint {fingerprint(kp.public)}", err=True)


# A Z85 key may begin with "-" (even "-h"): let such a token through as the KEY argument.
KEY_ARG_CONTEXT = {"ignore_unknown_options": True, "help_option_names": ["--help"]}


@main.command(context_settings=KEY_ARG_CONTEXT)
@click.argument("key")
@click.option("--name", required=True, help="Who this is (e.g. the machine's short hostname).")
@click.option("--role", type=click.Choice(["worker", "submitter", "admin"]), default="worker",
              show_default=True,
              help="worker: take work; submitter: submit and read results; admin: also manage "
                   "keys.")
@dir_option
def trust(key: str, name: str, role: str, directory: Path | None) -> None:
    """Trust a public KEY (Z85 text, or a .key file) as NAME with ROLE."""
    from coordinator.trust import TrustError
    from shared.keys import KeyFileError, public_key_from_arg

    try:
        public = public_key_from_arg(key)
    except (ValueError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    with _trust_store(directory) as store:
        try:
            entry = store.trust(public, name, role)
        except TrustError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(f"trusted {entry.name} as {entry.role} ({entry.fingerprint})")


@main.command(context_settings=KEY_ARG_CONTEXT)
@click.argument("ident", metavar="KEY|FINGERPRINT|NAME")
@dir_option
def revoke(ident: str, directory: Path | None) -> None:
    """Revoke a trusted key at once: its next message is refused and a worker using it is cut
    off (its attempt requeued)."""
    with _trust_store(directory) as store:
        if not store.revoke(ident):
            raise click.ClickException(f"no active trusted key matches {ident!r} "
                                       "(see `autoresearch-coord keys`)")
    click.echo(f"revoked {ident}")


@main.command()
@dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked keys.")
def keys(directory: Path | None, as_json: bool, include_revoked: bool) -> None:
    """List the trusted keys (name, role, fingerprint) and open invites."""
    with _trust_store(directory) as store:
        entries = store.list(include_revoked=include_revoked)
        invites = store.list_invites()
    if as_json:
        click.echo(json.dumps({"keys": [e.to_dict() for e in entries],
                               "invites": [dataclasses.asdict(i) for i in invites]},
                              indent=2, sort_keys=True))
        return
    click.echo(_table([[e.name, e.role, e.fingerprint, "revoked" if e.revoked else "active",
                        e.source] for e in entries],
                      ["name", "role", "fingerprint", "state", "source"])
               if entries else "(no trusted keys)")
    if invites:
        click.echo(f"\nopen invites: {len(invites)} "
                   + ", ".join(f"{i.invite_id} ({i.role})" for i in invites))


@main.command()
@dir_option
@click.option("--role", type=click.Choice(["worker", "submitter", "admin"]), default="worker",
              show_default=True, help="Role the enrolled key gets.")
@click.option("--name", default=None, help="Name the enrolled key gets (default: its hostname).")
@click.option("--ttl", type=click.FloatRange(min=1), default=86400.0, show_default=True,
              metavar="S", help="Seconds the token stays valid.")
@click.option("--connect", "endpoint", default=None, metavar="ENDPOINT",
              help="Endpoint to print in the join command (default: the one `start` printed).")
def invite(directory: Path | None, role: str, name: str | None, ttl: float,
           endpoint: str | None) -> None:
    """Print a one-time token (and the full command) that lets one new machine enrol itself."""
    from coordinator.trust import TrustError

    d = _repo_dir(directory)
    with _trust_store(d) as store:
        try:
            token = store.create_invite(role, name, ttl)
        except TrustError as exc:
            raise click.ClickException(str(exc)) from None
        row = store.conn.execute("SELECT value FROM meta WHERE key = 'endpoint'").fetchone()
    ep = endpoint or (json.loads(row[0]) if row else default_endpoint())
    key = shlex.quote(_coordinator_keypair(d).public_str)
    click.echo(f"invite (one machine, once, valid {ttl:g}s): {token}")
    if role == "worker":
        click.echo(f"on the new machine run:\n  autoresearch-worker join {ep} --server-key {key} "
                   f"--invite {token}")
    else:
        click.echo(f"on the new machine run:\n  autoresearch-coord enrol {token} --connect {ep} "
                   f"--server-key {key}")


@main.command()
@click.argument("token")
@connect_option
@timeout_option
@click.option("--name", default=None, help="Name to enrol as (default: this host's name).")
def enrol(token: str, endpoint: str | None, server_key: str | None, insecure: bool,
          timeout: float, name: str | None) -> None:
    """Enrol this user's client key with an invite TOKEN (from `autoresearch-coord invite`)."""
    import socket

    from shared.pins import save_pin

    with _client(endpoint, timeout, server_key, insecure) as c:
        data = _call(c.enrol, token, name or socket.gethostname().split(".")[0] or "client")
        if c.server_key is not None:
            save_pin(c.endpoint, c.server_key)
    click.echo(f"enrolled as {data.get('name')} (role {data.get('role')}, "
               f"{data.get('fingerprint')})")


# ---- client commands ----------------------------------------------------------------------

@main.command()
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("-m", "--message", "description", required=True,
              help="What this variant changes (one line; goes into the ledger and git).")
@click.option("--base", default=None, metavar="COMMIT",
              help="Head commit the variant was derived from (default: the current head).")
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the coordinator's answer as JSON.")
def submit(file, description: str, base: str | None, endpoint: str | None,
           server_key: str | None, insecure: bool, timeout: float, as_json: bool) -> None:
    """Submit a train.py variant (FILE, or - for stdin) for training."""
    text = file.read()
    name = getattr(file, "name", "-")
    try:  # refuse locally what the coordinator would refuse anyway, with the same message
        compile(text, name if name != "<stdin>" else "train.py", "exec")
    except SyntaxError as exc:
        raise click.ClickException(f"{name} does not compile: {exc}") from None
    with _client(endpoint, timeout, server_key, insecure) as c:
        data = _call(c.submit, text, description, base)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    click.echo(format_submission(data))


def format_submission(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    cid = data.get("candidate_id")
    state = data.get("state") or data.get("status") or "queued"
    if data.get("duplicate"):
        # same program (comments/formatting aside) as an earlier candidate, or as the head
        line = f"already submitted as #{cid} (same program as #{cid}): {state}"
        if data.get("val_bpb") is not None:
            line += f", val_bpb {_num(data['val_bpb'])}"
        if data.get("reason"):
            line += f" ({data['reason']})"
        return line
    return f"submitted #{cid}: {state}" + (f" (commit {data['commit'][:10]})"
                                           if data.get("commit") else "")


def offline_option(f):
    # Explicit only (no $AUTORESEARCH_DIR): without --dir these commands keep asking the running
    # coordinator, whose answer has what the ledger lacks (who is connected, live progress).
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Read the research repo DIR's ledger directly (read-only, no lock) instead of "
             "asking the coordinator: works while it runs and after it stopped.")(f)


class _Source:
    """Where status/log/export come from: the running coordinator, or a ledger read-only."""

    def __init__(self, directory: Path | None, endpoint: str | None, timeout: float,
                 server_key: str | None, insecure: bool):
        if directory is not None and (endpoint or server_key or insecure):
            raise click.UsageError("--dir reads the ledger itself: it takes no --connect, "
                                   "--server-key or --insecure")
        if directory is not None and not (directory / ".autoresearch").is_dir():
            raise click.ClickException(f"{directory} is not a research repo (no .autoresearch/)")
        self.repo = directory
        self.client = None if self.repo is not None else _client(endpoint, timeout, server_key,
                                                                  insecure)

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.client is not None:
            self.client.close()

    def get(self, what: str, **args: Any) -> Any:
        if self.client is not None:
            return _call(self.client.query, what, **args)
        from coordinator import history, reports
        from coordinator.ledger import LedgerError

        try:
            with history.read_run(self.repo) as L:
                if what == "status":
                    return dict(reports.status(L, self.repo), offline=True)
                if what == "log":
                    return reports.log(L, args.get("limit", 50))
                return reports.export_tsv(L)
        except (FileNotFoundError, LedgerError) as exc:
            raise click.ClickException(str(exc)) from None


@main.command()
@connect_option
@timeout_option
@offline_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
@click.option("--watch", is_flag=True,
              help="Redraw the view every --every seconds until Ctrl-C (keeps trying while the "
                   "coordinator does not answer).")
@click.option("--every", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              metavar="S", help="Seconds between redraws with --watch.")
def status(endpoint: str | None, server_key: str | None, insecure: bool, timeout: float,
           directory: Path | None, as_json: bool, watch: bool, every: float) -> None:
    """Workers, queue, running attempts, the head's val_bpb per hardware class, trusted keys."""
    if watch and as_json:
        raise click.UsageError("--watch redraws for a person; --json is for scripts: pick one")
    with _Source(directory, endpoint, timeout, server_key, insecure) as src:
        if watch:
            _watch(lambda: format_status(src.get("status")), every)
            return
        data = src.get("status")
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    click.echo(format_status(data))


def _watch(view, every: float) -> None:
    """Redraw ``view()`` every ``every`` seconds until Ctrl-C (then exit 0, no traceback). A
    failing view (coordinator restarting) is shown as one line, and the next draw tries again."""
    import time

    try:
        while True:
            try:
                text = view()
            except click.ClickException as exc:
                text = f"(no answer: {exc.format_message()})"
            click.clear()       # no-op when stdout is not a terminal: then frames just follow
            click.echo(f"---- {time.strftime('%H:%M:%S')} · every {every:g}s · Ctrl-C to stop")
            click.echo(text)
            time.sleep(every)
    except KeyboardInterrupt:
        click.echo("")


@main.command()
@connect_option
@timeout_option
@offline_option
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many recent attempts/decisions to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw log as JSON.")
def log(endpoint: str | None, server_key: str | None, insecure: bool, timeout: float,
        directory: Path | None, limit: int, as_json: bool) -> None:
    """Recent attempts and decisions, newest first."""
    with _Source(directory, endpoint, timeout, server_key, insecure) as src:
        data = src.get("log", limit=limit)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    click.echo(format_log(data))


@main.command()
@click.argument("candidate_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--reason", required=True,
              help="Why it deserves another run (one line; recorded in the ledger, shown by log).")
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the coordinator's answer as JSON.")
def retry(candidate_id: int, reason: str, endpoint: str | None, server_key: str | None,
          insecure: bool, timeout: float, as_json: bool) -> None:
    """Queue failed candidate ID again (admin): e.g. one failed by lost leases on a flaky
    machine. Its earlier attempts and decision stay in the ledger; losses start counting anew."""
    with _client(endpoint, timeout, server_key, insecure) as c:
        data = _call(c.query, "retry", candidate_id=candidate_id, reason=reason)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"#{data.get('candidate_id')} queued again (was {data.get('retried_from')}: "
               f"{data.get('previous_reason') or '-'})")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default="results.tsv")
@connect_option
@timeout_option
@offline_option
def export(path: Path, endpoint: str | None, server_key: str | None, insecure: bool,
           timeout: float, directory: Path | None) -> None:
    """Write the results table (one row per decided candidate, upstream's results.tsv format)
    to PATH (default results.tsv; - = stdout)."""
    with _Source(directory, endpoint, timeout, server_key, insecure) as src:
        tsv = src.get("export")
    if str(path) == "-":
        click.echo(tsv, nl=False)
        return
    path.write_text(tsv, encoding="utf-8")
    rows = max(0, len(tsv.strip().splitlines()) - 1)
    click.echo(f"wrote {path} ({rows} rows)")


# ---- the morning after --------------------------------------------------------------------

@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, metavar="OUTDIR",
              help="Where to write report.html and progress.png "
                   "(default: DIR/.autoresearch/report).")
@click.option("--no-plot", is_flag=True, help="Skip the progress plot (no matplotlib needed).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def report(directory: Path, out_dir: Path | None, no_plot: bool, as_json: bool) -> None:
    """Write the night's report for the research repo DIRECTORY: one self-contained HTML page
    (progress plot per hardware class, kept changes with their diffs, failures, workers, noise)
    plus the plot as a PNG. Reads the ledger read-only: works while the coordinator runs and
    after it stopped. Without matplotlib the page is written without the plot (and says so)."""
    from coordinator.ledger import LedgerError
    from coordinator.report import write_report

    progress = None if as_json else (lambda line: click.echo(line, err=True))
    try:
        made = write_report(_repo_dir(directory), out_dir, plot=not no_plot, log=progress)
    except (FileNotFoundError, LedgerError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(made.to_dict(), indent=2, sort_keys=True))
        return
    if made.plot_error and not no_plot:
        click.echo(f"warning: {made.plot_error}; the report has every table but no plot",
                   err=True)
    click.echo(f"wrote {made.html_path}" + (f" and {made.png_path.name}" if made.png_path else "")
               + f" ({made.decided} decisions, {len(made.kept)} kept)")
    click.echo(f"open {made.html_path.resolve().as_uri()}")


# ---- formatting ---------------------------------------------------------------------------

def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _rows(items: Any) -> list[dict]:
    if isinstance(items, dict):
        return [dict(v, key=k) if isinstance(v, dict) else {"key": k, "value": v}
                for k, v in items.items()]
    return [i for i in (items or []) if isinstance(i, dict)]


def _pick(d: dict, *names: str) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return None


def format_status(data: Any) -> str:
    if not isinstance(data, dict):
        return str(data)
    out: list[str] = []
    if data.get("offline"):
        out.append(f"(read from the ledger of {data.get('repo')}, read-only: live progress and "
                   "connections need the running coordinator; `running` = holds a lease)")
    branch = _pick(data, "branch")
    head = _pick(data, "head", "head_commit")
    if branch or head:
        out.append(f"branch {branch or '-'} at {str(head or '-')[:10]}")
    heads = _rows(_pick(data, "heads", "head_bpb"))
    out.append("\nhead val_bpb per hardware class (mean ± sem (runs); σ: one run's noise):")
    out.append(_table([[_pick(h, "hw_class", "key"),
                        _pick(h, "text") or _num(_pick(h, "val_bpb", "value")),
                        _pick(h, "state"), _sigma(h), str(_pick(h, "commit") or "")[:10]]
                       for h in heads],
                      ["class", "val_bpb", "state", "σ", "commit"])
               if heads else "  (none measured yet)")
    for h in heads:
        if h.get("drift"):
            out.append(f"  DRIFT on {_pick(h, 'hw_class', 'key')}: {h['drift']}")
    progress = _rows(data.get("in_progress"))
    if progress:
        out.append("\nin progress (runs so far / runs the rule asked for):")
        out.append(_table([[f"#{_pick(c, 'candidate_id')}", _pick(c, "state"),
                            _pick(c, "hw_class"), _num(_pick(c, "val_bpb")),
                            f"{c.get('runs')}/{c.get('runs_wanted') or '-'}",
                            _pick(c, "description")] for c in progress],
                          ["cand", "state", "class", "mean", "runs", "description"]))
    workers = _rows(data.get("workers"))
    out.append("\nworkers:")
    out.append(_table([[_pick(w, "name", "key"), _pick(w, "state", "status"),
                        _pick(w, "hw_class"), _gb(w.get("usable_memory")),
                        _pick(w, "attempt_id")] for w in workers],
                      ["name", "state", "class", "memory", "attempt"])
               if workers else "  (none)")
    running = _rows(data.get("running"))
    out.append("\nrunning:")
    out.append(_table([[_pick(r, "attempt_id", "key"), f"#{_pick(r, 'candidate_id')}",
                        _pick(r, "worker", "worker_name", "worker_id"),
                        _progress(r.get("progress"))] for r in running],
                      ["attempt", "cand", "worker", "progress"]) if running else "  (nothing)")
    queue = _rows(data.get("queue"))
    out.append(f"\nqueue ({len(queue)}):")
    out.append(_table([[f"#{_pick(q, 'candidate_id', 'id')}", _based_on(q),
                        _pick(q, "description")]
                       for q in queue], ["cand", "based on", "description"])
               if queue else "  (empty)")
    counts = data.get("counts")
    if isinstance(counts, dict) and counts:
        out.append("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    routed = _rows(data.get("routed"))
    if routed:
        out.append("\nrouted away for memory (out of memory on the class, requeued for more):")
        by_class: dict[str, list[str]] = {}
        for r in routed:
            by_class.setdefault(str(r.get("from_class")), []).append(
                f"#{r.get('candidate_id')} (needs more than "
                f"{(r.get('memory') or 0) / 2**30:.1f} GB, now {r.get('state')})")
        out.extend(f"  {hw}: {', '.join(items)}" for hw, items in sorted(by_class.items()))
    paused = [w for w in workers if w.get("paused")]
    if paused:
        out.append("\nworkers paused by their machine:")
        out.extend(f"  {_pick(w, 'name')}: {w['paused']}" for w in paused)
    idle = data.get("not_working")
    if isinstance(idle, dict) and idle:
        out.append("\nworkers getting no work:")
        out.extend(f"  {name}: mismatch: {why}" for name, why in sorted(idle.items()))
    ds = data.get("dataset")
    if isinstance(ds, dict):
        out.append(f"\ndataset {ds.get('name')} ({str(ds.get('dataset_hash'))[:12]})")
    if data.get("security") == "insecure":
        out.append("\nsecurity: INSECURE (no keys)")
    trusted = data.get("trusted")
    if isinstance(trusted, list):
        out.append("\ntrusted keys:")
        out.append(_table([[t.get("name"), t.get("role"), t.get("fingerprint")]
                           for t in trusted if isinstance(t, dict)],
                          ["name", "role", "fingerprint"]) if trusted else "  (none)")
    return "\n".join(out)


def _sigma(h: dict) -> str:
    """``0.0210 pooled (12 df)`` or ``0.0300 prior (pooled 0.0180, 2 df)``."""
    sigma = h.get("sigma")
    if not isinstance(sigma, (int, float)):
        return "-"
    if h.get("sigma_source") == "pooled":
        return f"{sigma:.4f} pooled ({h.get('pooled_df')} df)"
    pooled = h.get("pooled_sigma")
    return (f"{sigma:.4f} prior" + (f" (pooled {pooled:.4f}, {h.get('pooled_df')} df)"
                                    if isinstance(pooled, (int, float)) else ""))


def _based_on(q: dict) -> str:
    """``abc1234`` (the head it was written against), ``, rebased onto def5678`` once its change
    was replayed onto a later head, or ``(behind the head: rebased when it runs)``."""
    base = str(q.get("based_on") or "")[:7] or "-"
    if q.get("rebased_onto"):
        return f"{base}, rebased onto {str(q['rebased_onto'])[:7]}"
    return f"{base} (behind the head: rebased when it runs)" if q.get("behind_head") else base


def _gb(n: Any) -> str:
    return f"{n / 2**30:.1f} GB" if isinstance(n, (int, float)) and n else "-"


def _progress(p: Any) -> str:
    if not isinstance(p, dict):
        return "-"
    frac = p.get("progress")
    loss = p.get("loss")
    parts = []
    if isinstance(frac, (int, float)):
        parts.append(f"{100 * frac:.0f}%")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.3f}")
    return " ".join(parts) or "-"


def format_log(data: Any) -> str:
    if isinstance(data, dict):
        entries = _pick(data, "entries", "decisions", "attempts", "rows") or []
    else:
        entries = data or []
    rows = _rows(entries)
    if not rows:
        return "(no results yet)"
    table = _table([[_pick(r, "time", "at", "created_at", "finished_at"),
                     f"#{_pick(r, 'candidate_id')}",
                     _pick(r, "verdict") or " ".join(
                         str(x) for x in (r.get("state"), r.get("status"),
                                          "flagged" if r.get("flagged") else None) if x),
                     _pick(r, "runs") or _num(_pick(r, "val_bpb")), _pick(r, "hw_class"),
                     _what_happened(r)] for r in rows],
                   ["time", "cand", "what", "val_bpb", "class", "description"])
    # A stale candidate's conflicting hunks (git's markers), under the table.
    hunks = [f"\n#{r.get('candidate_id')} conflicts with #{r.get('conflicts_with')}:\n"
             + "\n".join(f"    {line}" for line in str(r["conflicts"]).splitlines())
             for r in rows if r.get("kind") == "decision" and r.get("conflicts")]
    return table + "".join(hunks)


def _what_happened(r: dict) -> Any:
    """An attempt's description and the worker's note (why its status); a stale decision's
    reason (what it conflicts with, where to resubmit)."""
    text = _pick(r, "description", "reason")
    note = r.get("note")
    if r.get("kind") != "decision" and isinstance(note, str) and note:
        return f"{text}: {note}" if text else note
    if r.get("verdict") == "stale" and r.get("reason"):
        return f"{text}: {r['reason']}" if text else r["reason"]
    origin = r.get("origin")
    if r.get("kind") == "decision" and isinstance(origin, dict) and origin.get("transcript"):
        who = " on ".join(str(origin[k]) for k in ("proposer", "host") if origin.get(k))
        return f"{text} ({who + ': ' if who else ''}{origin['transcript']})"
    return text


def _register_demo() -> None:
    # demo lives in its own module: it orchestrates processes and is not needed by the others.
    from coordinator.demo import demo_command
    main.add_command(demo_command)


_register_demo()


def _register_service() -> None:
    # install / uninstall live beside the service code; they copy start's options from start.
    from coordinator.service_cli import make_commands
    for command in make_commands(start):
        main.add_command(command)


_register_service()


def _register_proposers() -> None:
    # agents / sweep live beside their loops (coordinator.proposers); they reuse the connect
    # options and the client of this module, so they are added once it is complete.
    from coordinator.proposers_cli import make_commands
    for command in make_commands(connect_option, _client):
        main.add_command(command)


_register_proposers()


if __name__ == "__main__":
    main()
