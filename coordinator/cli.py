"""``autoresearch-coord``: make a research repo, run the coordinator, talk to it.

    autoresearch-coord init DIR [--tag T] [--preset seed|tiny] [--budget S] ...
    autoresearch-coord start DIR [--bind tcp://127.0.0.1:5555] [--insecure]
    autoresearch-coord submit FILE|- -m "what changed" [--connect EP] [--json]
    autoresearch-coord status [--json]
    autoresearch-coord log [-n N] [--json]
    autoresearch-coord export [PATH]

Client commands find the coordinator through ``--connect``, else $AUTORESEARCH_COORD, else
tcp://127.0.0.1:5555.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import click

from coordinator.client import ENDPOINT_ENV, Client, ClientError, default_endpoint
from shared.protocol import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS, REQUEST_TIMEOUT

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def connect_option(f):
    return click.option(
        "--connect", "endpoint", default=None, metavar="ENDPOINT",
        help=f"Coordinator to talk to (default: ${ENDPOINT_ENV} or tcp://127.0.0.1:5555).")(f)


def timeout_option(f):
    return click.option("--timeout", type=click.FloatRange(min=0.1), default=REQUEST_TIMEOUT,
                        show_default=True, help="Seconds to wait for the coordinator.")(f)


def _client(endpoint: str | None, timeout: float) -> Client:
    return Client(endpoint or default_endpoint(), timeout=timeout)


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

@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tag", default=None, help="Research run name: the branch is autoresearch/<tag>.")
@click.option("--preset", type=click.Choice(["seed", "tiny"]), default="seed", show_default=True,
              help="Model size and run settings: seed = the real run, tiny = a 2-core CPU.")
@click.option("--budget", type=click.IntRange(min=1), default=None, metavar="S",
              help="Training seconds per attempt (overrides the preset).")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, metavar="T",
              help="Sequence length (overrides the preset).")
@click.option("--eval-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Validation tokens evaluated (overrides the preset).")
@click.option("--margin", type=click.FloatRange(min=0.0), default=None,
              help="val_bpb improvement a candidate needs over the head to be kept.")
@click.option("--train-py", "train_py", type=click.File("r", encoding="utf-8"), default=None,
              metavar="FILE", help="Start from this train.py instead of the preset's baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print what was made as JSON.")
def init(directory: Path, tag: str | None, preset: str, budget: int | None,
         seq_len: int | None, eval_tokens: int | None, margin: float | None,
         train_py, as_json: bool) -> None:
    """Create a research repo in DIRECTORY (git, baseline train.py, ledger)."""
    from coordinator.repo import init_repo

    overrides = {k: v for k, v in (("time_budget", budget), ("seq_len", seq_len),
                                   ("eval_tokens", eval_tokens), ("margin", margin))
                 if v is not None}
    try:
        made = init_repo(directory, tag=tag, preset=preset,
                         train_py=train_py.read() if train_py else None, **overrides)
    except (ValueError, FileExistsError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    info = dataclasses.asdict(made) if dataclasses.is_dataclass(made) else dict(made or {})
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"research repo {info.get('repo_dir', directory)}")
    click.echo(f"  branch      {info.get('branch')} at {str(info.get('baseline_commit'))[:10]} "
               f"(baseline train.py, preset {info.get('preset')})")
    for key, value in (info.get("settings") or {}).items():
        click.echo(f"  {key:<12}{value}")
    click.echo("  ledger      .autoresearch/ (ignored by git)")
    click.echo(f"next: autoresearch-coord start {directory}")


# ---- start --------------------------------------------------------------------------------

@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bind", default="tcp://127.0.0.1:5555", show_default=True,
              help="ZeroMQ endpoint to listen on (tcp://0.0.0.0:5555 for the whole network; "
                   "port 0 or * picks a free one).")
@click.option("--insecure", is_flag=True,
              help="Allow binding a non-loopback address without encryption or authentication.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.01), metavar="S",
              default=HEARTBEAT_INTERVAL, show_default=True,
              help="Seconds between heartbeats (workers adopt it).")
@click.option("--liveness", type=click.IntRange(min=1), default=HEARTBEAT_LIVENESS,
              show_default=True, help="Missed heartbeats before a worker is declared lost.")
def start(directory: Path, bind: str, insecure: bool, heartbeat_interval: float,
          liveness: int) -> None:
    """Run the coordinator for the research repo in DIRECTORY until Ctrl-C."""
    from coordinator.core import Coordinator
    from coordinator.server import is_loopback_endpoint, join_endpoint, serve, stamp

    if not is_loopback_endpoint(bind) and not insecure:
        raise click.ClickException(
            f"{bind} is reachable from other machines and this release has no encryption: "
            "pass --insecure to accept that (only on a network you trust)")
    try:
        core = Coordinator(directory)
    except Exception as exc:
        if type(exc).__name__ in ("CoordinatorBusy", "FileNotFoundError", "ValueError",
                                  "RuntimeError"):
            raise click.ClickException(str(exc)) from None
        raise

    def banner(endpoint: str) -> None:
        p = lambda s="": click.echo(s)  # noqa: E731
        p(f"{stamp()} coordinator for {directory.resolve()} listening on {endpoint}")
        if not is_loopback_endpoint(bind):
            p("WARNING: no encryption or authentication: anyone who can reach this port can "
              "submit code that every worker runs. Use only on a network you trust.")
        p(f"  workers join with:  autoresearch-worker join {join_endpoint(endpoint)}")
        p(f"  submit with:        autoresearch-coord submit train.py -m 'what changed' "
          f"--connect {join_endpoint(endpoint)}")
        p(f"  watch with:         autoresearch-coord status --connect {join_endpoint(endpoint)}")
        sys.stdout.flush()

    try:
        serve(core, bind, heartbeat_interval=heartbeat_interval, liveness=liveness,
              banner=banner)
    finally:
        core.close()


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
def submit(file, description: str, base: str | None, endpoint: str | None, timeout: float,
           as_json: bool) -> None:
    """Submit a train.py variant (FILE, or - for stdin) for training."""
    text = file.read()
    name = getattr(file, "name", "-")
    try:  # refuse locally what the coordinator would refuse anyway, with the same message
        compile(text, name if name != "<stdin>" else "train.py", "exec")
    except SyntaxError as exc:
        raise click.ClickException(f"{name} does not compile: {exc}") from None
    with _client(endpoint, timeout) as c:
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
        line = f"already submitted as #{cid}: {state}"
        if data.get("val_bpb") is not None:
            line += f", val_bpb {_num(data['val_bpb'])}"
        return line
    return f"submitted #{cid}: {state}" + (f" (commit {data['commit'][:10]})"
                                           if data.get("commit") else "")


@main.command()
@connect_option
@timeout_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw status as JSON.")
def status(endpoint: str | None, timeout: float, as_json: bool) -> None:
    """Workers, queue, running attempts and the head's val_bpb per hardware class."""
    with _client(endpoint, timeout) as c:
        data = _call(c.query, "status")
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    click.echo(format_status(data))


@main.command()
@connect_option
@timeout_option
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many recent attempts/decisions to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw log as JSON.")
def log(endpoint: str | None, timeout: float, limit: int, as_json: bool) -> None:
    """Recent attempts and decisions, newest first."""
    with _client(endpoint, timeout) as c:
        data = _call(c.query, "log", limit=limit)
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    click.echo(format_log(data))


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default="results.tsv")
@connect_option
@timeout_option
def export(path: Path, endpoint: str | None, timeout: float) -> None:
    """Write the results table (one row per attempt) to PATH (default results.tsv; - = stdout)."""
    with _client(endpoint, timeout) as c:
        tsv = _call(c.query, "export")
    if str(path) == "-":
        click.echo(tsv, nl=False)
        return
    path.write_text(tsv, encoding="utf-8")
    rows = max(0, len(tsv.strip().splitlines()) - 1)
    click.echo(f"wrote {path} ({rows} rows)")


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
    branch = _pick(data, "branch")
    head = _pick(data, "head", "head_commit")
    if branch or head:
        out.append(f"branch {branch or '-'} at {str(head or '-')[:10]}")
    heads = _rows(_pick(data, "heads", "head_bpb"))
    out.append("\nhead val_bpb per hardware class:")
    out.append(_table([[_pick(h, "hw_class", "key"), _num(_pick(h, "val_bpb", "value")),
                        str(_pick(h, "commit") or "")[:10]] for h in heads],
                      ["class", "val_bpb", "commit"]) if heads else "  (none measured yet)")
    workers = _rows(data.get("workers"))
    out.append("\nworkers:")
    out.append(_table([[_pick(w, "name", "key"), _pick(w, "state", "status"),
                        _pick(w, "hw_class"), _pick(w, "attempt_id")] for w in workers],
                      ["name", "state", "class", "attempt"]) if workers else "  (none)")
    running = _rows(data.get("running"))
    out.append("\nrunning:")
    out.append(_table([[_pick(r, "attempt_id", "key"), f"#{_pick(r, 'candidate_id')}",
                        _pick(r, "worker", "worker_name", "worker_id"),
                        _progress(r.get("progress"))] for r in running],
                      ["attempt", "cand", "worker", "progress"]) if running else "  (nothing)")
    queue = _rows(data.get("queue"))
    out.append(f"\nqueue ({len(queue)}):")
    out.append(_table([[f"#{_pick(q, 'candidate_id', 'id')}", _pick(q, "description")]
                       for q in queue], ["cand", "description"]) if queue else "  (empty)")
    counts = data.get("counts")
    if isinstance(counts, dict) and counts:
        out.append("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(out)


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
    return _table([[_pick(r, "time", "at", "created_at", "finished_at"),
                    f"#{_pick(r, 'candidate_id')}",
                    _pick(r, "verdict") or " ".join(
                        str(x) for x in (r.get("state"), r.get("status")) if x),
                    _num(_pick(r, "val_bpb")), _pick(r, "hw_class"),
                    _pick(r, "description", "reason")] for r in rows],
                  ["time", "cand", "what", "val_bpb", "class", "description"])


if __name__ == "__main__":
    main()


def _register_demo() -> None:
    # demo lives in its own module: it orchestrates processes and is not needed by the others.
    from coordinator.demo import demo_command
    main.add_command(demo_command)


_register_demo()
