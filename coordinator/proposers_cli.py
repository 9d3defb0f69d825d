"""``autoresearch-coord agents`` and ``autoresearch-coord sweep``: the proposers as clients.

Both are clients with the submitter role (an admin key works too) and run on any machine that
reaches the coordinator: what they need comes over the wire (``query head`` for the head's
train.py, commit and program.md; ``query brief`` for decisions, what is in flight, failures,
noise and the workers connected), and what they make is an ordinary ``submit``. ``WireSource``
is that adapter; the loops are ``coordinator.proposers``.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click

from coordinator import pacing
from coordinator.proposers import (
    DEFAULT_DECISIONS, DEFAULT_TIMEOUT, SNAPSHOT_SECONDS, AgentRunner, Refused,
    SourceUnavailable, SweepRunner, install_signals, parse_command, with_head,
)
from shared.client import ClientError, NoCoordinator
from shared.protocol import REQUEST_TIMEOUT

DEFAULT_OUT = "autoresearch-proposals"


class Fatal(RuntimeError):
    """The coordinator refused a query: a key, role or version problem, not a passing one."""


class WireSource:
    """``snapshot()`` and ``submit()`` over a ``shared.client.Client``. The head's text is
    fetched only when the head commit changes (the brief snapshot names it)."""

    def __init__(self, client: Any, decisions: int = DEFAULT_DECISIONS):
        self.client = client
        self.decisions = decisions
        self.head: dict | None = None

    def _ask(self, what: str, **args: Any) -> Any:
        try:
            return self.client.query(what, **args)
        except NoCoordinator as exc:
            raise SourceUnavailable(str(exc)) from None
        except ClientError as exc:
            raise Fatal(str(exc)) from None

    def snapshot(self, watch: list[int] = ()) -> dict:
        snap = dict(self._ask("brief", decisions=self.decisions, watch=list(watch)))
        commit = (snap.get("head") or {}).get("commit")
        if self.head is None or self.head.get("commit") != commit:
            self.head = self._ask("head")
        return with_head(snap, self.head)

    def submit(self, train_py: str, description: str, base: str | None,
               origin: dict | None = None) -> dict:
        try:
            return self.client.submit(train_py, description, base, origin)
        except NoCoordinator as exc:
            raise SourceUnavailable(str(exc)) from None
        except ClientError as exc:
            raise Refused(str(exc)) from None


def default_out_dir() -> Path:
    """``.autoresearch/proposals`` inside a research repo, else ./autoresearch-proposals."""
    cwd = Path.cwd()
    if (cwd / ".autoresearch").is_dir():
        return cwd / ".autoresearch" / "proposals"
    return cwd / DEFAULT_OUT


def _say_to(stream):
    def say(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", file=stream, flush=True)
    return say


AGENTS_HELP = """Keep COUNT agents proposing train.py variants, each on the current head.

\b
Every cycle of one proposer (p1..pN):
  1. a fresh directory OUT/<time>-pK-<rand>/ with work/train.py (the head's, fetched from the
     coordinator: no clone needed) and work/brief.md: program.md, the head and its val_bpb,
     the last decisions (mean ± sem, reasons), what is queued/running/awaiting repeats, recent
     failures with log tails, the noise per class, and what this proposer's last proposal got
     back (unchanged / duplicate / does not compile / submitted as #k);
  2. COMMAND runs with cwd work/, in its own process group, output to transcript.txt;
  3. at --timeout its whole group is killed (SIGTERM, SIGKILL 5 s later): nothing submitted;
  4. when it exits 0, work/train.py and the first line of work/description.txt are submitted
     with base = the head it started from (unchanged or non-compiling files are not);
     OUT/by-candidate/<id> links to the proposal of candidate <id>.

\b
The agent contract (also at the top of every brief):
  in:  {brief}        the brief (markdown), also $AUTORESEARCH_BRIEF
       {workdir}      the work directory (the agent's cwd), also $AUTORESEARCH_WORKDIR
       {train_py}     the head's train.py to edit in place, also $AUTORESEARCH_TRAIN_PY
       {description}  where to write one line saying what changed, also
                      $AUTORESEARCH_DESCRIPTION
  out: the edited train.py, the description file, exit status 0.

\b
COMMAND is split like a shell would (shlex) but run without one; placeholders are replaced
inside each argument, so paths are never interpreted. For pipes or $(...) write sh -c '...'
and use the environment there ("$AUTORESEARCH_BRIEF"): a path pasted into a shell script
would be parsed by that shell.
Examples:
  --command 'claude -p "Read {brief} and do what it says." --permission-mode acceptEdits'
  --command 'codex exec --full-auto "Read {brief} and do what it says."'
  --command 'python my_agent.py {train_py} {description}'

\b
Backpressure: agents start only while candidates in flight (queued + running + measured and
waiting) plus proposals being written stay within the connected workers + --slack.
A failed, hung or empty agent is restarted with backoff (5 s, doubling, at most 5 min).
Ctrl-C once: start no new agents, let running ones finish and be submitted; twice: kill them.
Everything submitted is the coordinator's: killing this command loses nothing it accepted.
"""


def _run(runner, say) -> None:
    """Run until done or Ctrl-C (signals installed here); a refusal is the CLI's one-line error."""
    install_signals(runner)
    try:
        runner.run()
    except Fatal as exc:
        runner.shutdown()
        raise click.ClickException(f"the coordinator refused: {exc}") from None


def _finish(as_json: bool, rows: list, say, summary: str) -> None:
    """--json: every row on stdout; otherwise the one summary line."""
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
    else:
        say(summary)


SWEEP_HELP = """Submit variants of the head's train.py over named constants.

\b
--param NAME=SPEC, once per constant (NAME: a `NAME = value` line of train.py):
  NAME=2,3,4          these values (grid axis; random mode picks among them)
  NAME=lin:A:B[:N]    uniform in [A, B]; grid mode: N evenly spaced values
  NAME=log:A:B[:N]    log-uniform in [A, B] (0 < A); grid mode: N log-spaced values
Values keep their written type: 3 is an int, 3.0 / 1e-3 floats, true/false booleans, quoted
text ('SSSL') a string; int bounds draw ints. Drawn floats keep 4 significant digits.

\b
--mode grid: the cartesian product (the last --param varies fastest), at most --count points;
--mode random: --count distinct points drawn with --seed. Default: grid when every --param is
a list or has N, else random. A point equal to the head is skipped.

\b
Each point is applied, when it is submitted, to the head current then (base = that head),
with the same constant rewriter the presets use, described as `sweep: NAME=value, ...`.
Submissions follow the same backpressure as `agents` (in flight <= workers + --slack); then
the command follows their decisions until all are decided (--no-wait: exit once submitted).
Example:
  autoresearch-coord sweep --param MATRIX_LR=log:0.01:0.1 --param DEPTH=2,3,4 --count 20
"""


def poll_option(f):
    return click.option("--poll", type=click.FloatRange(min=0.1), default=SNAPSHOT_SECONDS,
                        show_default=True, metavar="S",
                        help="Seconds between asking the coordinator what is in flight.")(f)


def make_commands(connect_option: Callable, open_client: Callable) -> list[click.Command]:
    """The ``agents`` and ``sweep`` commands, given the CLI's ``--connect/--server-key/
    --insecure`` options and its client factory (``coordinator.cli`` passes its own, so every
    client command finds and pins the coordinator the same way)."""
    @click.command("agents", help=AGENTS_HELP)
    @click.option("--count", "-n", type=click.IntRange(min=1), default=1, show_default=True,
                  help="Agents running side by side.")
    @click.option("--command", "command", required=True, metavar="'CMD ...'",
                  help="The agent command line, with {brief} {workdir} {train_py} {description}.")
    @click.option("--timeout", type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT,
                  show_default=True, metavar="S", help="Seconds one agent run may take.")
    @click.option("--slack", type=click.IntRange(min=0), default=pacing.DEFAULT_SLACK,
                  show_default=True, metavar="K",
                  help="Candidates in flight allowed beyond the connected workers.")
    @click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                  default=None, metavar="DIR",
                  help=f"Where proposals and transcripts go (default: .autoresearch/proposals in a "
                       f"research repo, else ./{DEFAULT_OUT}).")
    @click.option("--decisions", type=click.IntRange(min=1), default=DEFAULT_DECISIONS,
                  show_default=True, metavar="K", help="Recent decisions shown in each brief.")
    @poll_option
    @click.option("--limit", type=click.IntRange(min=1), default=None, metavar="N",
                  help="Stop after starting N agent runs (default: run until Ctrl-C).")
    @connect_option
    @click.option("--json", "as_json", is_flag=True,
                  help="Progress on stderr; at the end, every proposal as JSON on stdout.")
    def agents_command(count: int, command: str, timeout: float, slack: int, out_dir: Path | None,
                       decisions: int, poll: float, limit: int | None,
                       endpoint: str | None, server_key: str | None, insecure: bool,
                       as_json: bool) -> None:
        try:
            argv = parse_command(command)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        if shutil.which(argv[0]) is None:
            raise click.UsageError(f"--command: {argv[0]!r} is not a program on PATH")
        out = (out_dir or default_out_dir()).expanduser().resolve()
        say = _say_to(sys.stderr if as_json else sys.stdout)
        with open_client(endpoint, REQUEST_TIMEOUT, server_key, insecure) as c:
            source = WireSource(c, decisions)
            runner = AgentRunner(source, argv, count=count, out_dir=out, timeout=timeout,
                                 slack=slack, say=say, max_proposals=limit,
                                 snapshot_every=poll)
            _run(runner, say)
        sent = sum(1 for r in runner.records if r["state"] == "submitted")
        _finish(as_json, runner.records, say,
                f"stopped: {len(runner.records)} proposal(s), {sent} submitted; transcripts in {out}")

    @click.command("sweep", help=SWEEP_HELP)
    @click.option("--param", "params", multiple=True, required=True, metavar="NAME=SPEC",
                  help="A constant and its values (repeat for each constant).")
    @click.option("--count", "-n", type=click.IntRange(min=1), default=None, metavar="N",
                  help="Points to submit (grid: at most N, default all; random: required).")
    @click.option("--mode", type=click.Choice(["grid", "random"]), default=None,
                  help="grid or random (default: grid when every --param can be listed).")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of random mode.")
    @click.option("--slack", type=click.IntRange(min=0), default=pacing.DEFAULT_SLACK,
                  show_default=True, metavar="K",
                  help="Candidates in flight allowed beyond the connected workers.")
    @poll_option
    @click.option("--no-wait", "no_wait", is_flag=True,
                  help="Exit once every point is submitted instead of following the decisions.")
    @click.option("--dry-run", is_flag=True,
                  help="Print the points (applied to the current head) without submitting.")
    @connect_option
    @click.option("--json", "as_json", is_flag=True,
                  help="Progress on stderr; at the end, each point and its candidate as JSON.")
    def sweep_command(params: tuple[str, ...], count: int | None, mode: str | None, seed: int,
                      slack: int, poll: float, no_wait: bool, dry_run: bool, endpoint: str | None,
                      server_key: str | None, insecure: bool, as_json: bool) -> None:
        from coordinator import sweep

        try:
            axes = sweep.parse_params(list(params))
            sweep.resolve_mode(axes, mode)
        except sweep.SweepError as exc:
            raise click.UsageError(str(exc)) from None
        say = _say_to(sys.stderr if as_json else sys.stdout)
        with open_client(endpoint, REQUEST_TIMEOUT, server_key, insecure) as c:
            source = WireSource(c, decisions=50)
            try:
                snap = source.snapshot()
            except (SourceUnavailable, Fatal) as exc:
                raise click.ClickException(str(exc)) from None
            head = snap["head"]["train_py"]
            try:
                sweep.check_names(head, axes)
                planned = sweep.points(axes, mode=mode, count=count, seed=seed,
                                       head=sweep.head_point(head, axes))
            except sweep.SweepError as exc:
                raise click.UsageError(str(exc)) from None
            if not planned:
                raise click.ClickException("the sweep has no point that differs from the head")
            if dry_run:
                rows = [{"point": p, "description": sweep.describe(p)} for p in planned]
                if as_json:
                    click.echo(json.dumps(rows, indent=2, sort_keys=True))
                else:
                    for r in rows:
                        click.echo(r["description"])
                    click.echo(f"{len(rows)} point(s) on head {snap['head']['commit'][:10]}; "
                               "nothing submitted (--dry-run)")
                return
            runner = SweepRunner(source, axes, planned, slack=slack, say=say, wait=not no_wait,
                                 snapshot_every=poll)
            _run(runner, say)
        sent = [r for r in runner.results if r.get("candidate_id") is not None]
        _finish(as_json, runner.results, say,
                f"sweep done: {len(sent)} of {len(planned)} point(s) submitted"
                + (f" ({', '.join('#' + str(r['candidate_id']) for r in sent)})" if sent else ""))

    return [agents_command, sweep_command]


__all__ = ["make_commands", "WireSource", "Fatal", "default_out_dir"]
