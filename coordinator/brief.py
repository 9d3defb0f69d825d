"""The brief a proposer agent reads: markdown rendered from plain data. Pure, no wire, no I/O.

``render_brief(snapshot, context)`` turns what the coordinator says about the run (the
*snapshot*, built by ``coordinator.snapshot.proposer_snapshot`` and sent over the wire) and what
this one proposal needs to know (the *context*: paths, the proposer's name, what its previous
proposal got back) into the brief. Sections, in the order an agent needs them:

    the contract       which file to edit, where to write the one-line description, the time
    previous result    unchanged / duplicate / does not compile / agent failed / submitted as #k
                       (and what became of #k, when the snapshot knows)
    the head           commit, candidate, val_bpb per hardware class (mean +- sem, runs)
    in flight          queued, running, awaiting repeats or the head: do not propose these again
    recent decisions   the last K, with their numbers and reasons
    failures           recent failed candidates with the tail of their log
    noise              per-class spread between runs of the same train.py
    program.md         the run's instructions, verbatim

Snapshot fields (all optional; missing ones render as "(none)"): ``tag``, ``head`` {commit,
candidate_id, description, values: [{hw_class, mean, sem, runs}]}, ``decisions`` [{candidate_id,
verdict, description, hw_class, mean|val_bpb, sem, runs, head_mean|head_bpb, head_sem, reason,
value_text, head_text (``mean ± sem (n)`` as the decision stored them: preferred)}], ``queued``
/ ``running`` / ``awaiting`` [{candidate_id, description, hw_class, worker, mean, sem, runs,
waiting_for}], ``failures`` [{candidate_id, description, hw_class, status, reason, log_tail}],
``noise`` [{hw_class, text (the noise model's description) | sigma, runs}], ``workers`` (int),
``program_md``. Numbers are shown the one way runs are shown everywhere (``rule.fmt_runs``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from coordinator.rule import fmt_runs

# The files of one proposal's work directory (coordinator.proposers makes it).
TRAIN_PY_NAME = "train.py"
BRIEF_NAME = "brief.md"
DESCRIPTION_NAME = "description.txt"
# Where the agent finds them besides the command's placeholders.
AGENT_ENV = {"{brief}": "AUTORESEARCH_BRIEF", "{workdir}": "AUTORESEARCH_WORKDIR",
             "{train_py}": "AUTORESEARCH_TRAIN_PY", "{description}": "AUTORESEARCH_DESCRIPTION"}

TAIL_LINES = 15          # log lines shown per failure
MAX_LIST = 40            # entries shown per in-flight list (the rest are counted)

# What a proposal got back (Feedback.kind), in the words the brief uses for it.
FEEDBACK_KINDS = {
    "submitted": "submitted",
    "duplicate": "a duplicate: the same train.py was submitted before",
    "unchanged": "unchanged: train.py was identical to the head, nothing was submitted",
    "does_not_compile": "refused: train.py does not compile, nothing was submitted",
    "refused": "refused by the coordinator, nothing was submitted",
    "no_train_py": "lost: train.py was missing from the work directory, nothing was submitted",
    "agent_failed": "the agent exited with an error, nothing was submitted",
    "timeout": "the agent ran out of time and was killed, nothing was submitted",
}


@dataclass(frozen=True)
class Feedback:
    """What one proposal got back; the next brief of the same proposer shows it."""
    kind: str                       # a FEEDBACK_KINDS key
    detail: str = ""                # the compile error, the refusal, the exit code, ...
    candidate_id: int | None = None
    description: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BriefContext:
    """The paths and facts of one proposal (not the coordinator's)."""
    proposer: str                   # e.g. "p2"
    proposers: int                  # how many run side by side
    workdir: str
    train_py: str                   # path of the file to edit
    description_file: str           # path the one-line description goes to
    timeout: float                  # seconds the agent has
    previous: Feedback | None = None


def _get(d: Any, *names: str) -> Any:
    if not isinstance(d, dict):
        return None
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return None


def _isnum(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_value(mean: Any, sem: Any = None, runs: Any = None) -> str:
    """``1.4123 ± 0.0040 (3)`` (mean ± sem (runs), ``coordinator.rule.fmt_runs``), or
    ``1.4123 (1)`` without a sem, ``-`` without a number."""
    if not _isnum(mean):
        return "-"
    n = runs if isinstance(runs, int) and not isinstance(runs, bool) and runs > 0 else None
    if _isnum(sem) and n:
        return fmt_runs(mean, sem, n)
    text = f"{mean:.4f}" + (f" ± {sem:.4f}" if _isnum(sem) else "")
    return text + (f" ({n})" if n else "")


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text or "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _ref(d: dict) -> str:
    cid = _get(d, "candidate_id", "id")
    desc = _one_line(_get(d, "description"))
    return f"#{cid}" + (f" {desc!r}" if desc else "")


def _candidate_value(d: dict) -> str:
    if isinstance(d.get("value_text"), str):     # as the decision stored it
        return d["value_text"]
    return fmt_value(_get(d, "mean", "val_bpb"), _get(d, "sem"), _get(d, "runs"))


def _head_value(d: dict) -> str:
    if isinstance(d.get("head_text"), str):
        return d["head_text"]
    return fmt_value(_get(d, "head_mean", "head_bpb"), _get(d, "head_sem"), _get(d, "head_runs"))


def _fate(cid: Any, snapshot: dict) -> str | None:
    """Where candidate ``cid`` stands now, from the snapshot's lists."""
    for d in snapshot.get("decisions") or []:
        if _get(d, "candidate_id") == cid:
            verdict = str(_get(d, "verdict") or "decided").upper()
            return f"{verdict}: {_candidate_value(d)} vs head {_head_value(d)} -- " \
                   f"{_one_line(_get(d, 'reason'))}"
    for key, word in (("running", "running now"), ("awaiting", "measured, awaiting more runs"),
                      ("queued", "queued")):
        if any(_get(d, "candidate_id") == cid for d in snapshot.get(key) or []):
            return word
    return None


def _previous(ctx: BriefContext, snapshot: dict) -> list[str]:
    fb = ctx.previous
    if fb is None:
        return ["This is your first proposal in this session."]
    what = FEEDBACK_KINDS.get(fb.kind, fb.kind)
    if fb.kind in ("submitted", "duplicate") and fb.candidate_id is not None:
        what = (f"submitted as #{fb.candidate_id}" if fb.kind == "submitted"
                else f"a duplicate of #{fb.candidate_id} (the same train.py was submitted "
                     "before: it was not trained again)")
    lines = [f"Your previous proposal" + (f" ({fb.description!r})" if fb.description else "")
             + f" was {what}."]
    if fb.detail:
        lines += ["", "```", fb.detail.rstrip(), "```"]
    if fb.candidate_id is not None:
        fate = _fate(fb.candidate_id, snapshot)
        if fate:
            lines += ["", f"#{fb.candidate_id} now: {fate}"]
    return lines


def _contract(ctx: BriefContext, snapshot: dict) -> list[str]:
    head = snapshot.get("head") or {}
    commit = str(_get(head, "commit") or "?")[:10]
    return [
        f"You are proposer {ctx.proposer} of {ctx.proposers} working side by side on this run.",
        "",
        f"1. Edit `{ctx.train_py}` in place: it is the current head (commit {commit}). Make ONE "
        "change you expect to lower val_bpb; keep the file complete and runnable.",
        f"2. Write one line saying what you changed and why to `{ctx.description_file}`.",
        f"3. Exit with status 0. You have {ctx.timeout:g} seconds; after that you are stopped "
        "and nothing is submitted.",
        "",
        "Do not train or submit yourself: the runner submits your train.py when you exit and a "
        "fleet of workers measures it. Edit nothing but train.py. Do not repeat an idea that "
        "is in flight or was decided below unless you change it in a way that matters.",
    ]


def _head(snapshot: dict) -> list[str]:
    head = snapshot.get("head") or {}
    lines = [f"Commit {_get(head, 'commit') or '?'} (candidate #{_get(head, 'candidate_id')}"
             + (f": {_one_line(_get(head, 'description'))}" if _get(head, "description") else "")
             + ")."]
    values = [v for v in (_get(head, "values") or []) if isinstance(v, dict)]
    if values:
        lines.append("")
        lines += [f"- {_get(v, 'hw_class')}: val_bpb {_candidate_value(v)}" for v in values]
    else:
        lines.append("Not measured yet on any hardware class.")
    return lines


def _listing(items: list, fmt) -> list[str]:
    items = [i for i in items or [] if isinstance(i, dict)]
    if not items:
        return ["(none)"]
    out = [fmt(i) for i in items[:MAX_LIST]]
    if len(items) > MAX_LIST:
        out.append(f"- ... and {len(items) - MAX_LIST} more")
    return out


def _in_flight(snapshot: dict) -> list[str]:
    def queued(d):
        return f"- {_ref(d)}"

    def running(d):
        where = " ".join(str(x) for x in (_get(d, "worker"), f"[{_get(d, 'hw_class')}]"
                                          if _get(d, "hw_class") else None) if x)
        return f"- {_ref(d)}" + (f" on {where}" if where else "")

    def awaiting(d):
        why = _get(d, "waiting_for")
        return (f"- {_ref(d)}: {_candidate_value(d)}"
                + (f" [{_get(d, 'hw_class')}]" if _get(d, "hw_class") else "")
                + (f" -- {_one_line(why)}" if why else ""))

    return (["Queued:"] + _listing(snapshot.get("queued"), queued)
            + ["", "Running:"] + _listing(snapshot.get("running"), running)
            + ["", "Measured, awaiting repeats or the head's number:"]
            + _listing(snapshot.get("awaiting"), awaiting))


def _decisions(snapshot: dict) -> list[str]:
    def line(d):
        verdict = str(_get(d, "verdict") or "?").upper()
        cls = f" [{_get(d, 'hw_class')}]" if _get(d, "hw_class") else ""
        if str(_get(d, "verdict")).lower() == "failed":
            nums = ""
        else:
            nums = f": {_candidate_value(d)} vs head {_head_value(d)}"
        reason = _one_line(_get(d, "reason"))
        return f"- {verdict} {_ref(d)}{nums}{cls}" + (f" -- {reason}" if reason else "")

    rows = [d for d in snapshot.get("decisions") or [] if _get(d, "candidate_id") != 0]
    return _listing(rows, line)


def _failures(snapshot: dict) -> list[str]:
    items = [f for f in snapshot.get("failures") or [] if isinstance(f, dict)]
    if not items:
        return ["(none)"]
    out: list[str] = []
    for f in items:
        status = _get(f, "status") or "failed"
        cls = f" on {_get(f, 'hw_class')}" if _get(f, "hw_class") else ""
        out.append(f"### {_ref(f)}: {status}{cls}")
        if _get(f, "reason"):
            out.append(_one_line(_get(f, "reason")))
        tail = [ln.rstrip() for ln in str(_get(f, "log_tail") or "").splitlines() if ln.strip()]
        if tail:
            out += ["", "```", *tail[-TAIL_LINES:], "```"]
        out.append("")
    return out[:-1]


def _noise(snapshot: dict) -> list[str]:
    items = [n for n in snapshot.get("noise") or [] if isinstance(n, dict)]
    if not items:
        return ["No class has repeated runs yet: assume a spread of a few hundredths of a bpb "
                "between runs of the same train.py."]
    out = []
    for n in items:
        if isinstance(n.get("text"), str):          # the noise model's own description
            out.append(f"- {_get(n, 'hw_class')}: {n['text']}")
            continue
        sigma, runs = _get(n, "sigma"), _get(n, "runs")
        s = f"σ ≈ {sigma:.4f}" if _isnum(sigma) else "σ unknown"
        out.append(f"- {_get(n, 'hw_class')}: {s}" + (f" ({runs} runs)" if runs else ""))
    return out


def agent_contract_md() -> str:
    """The contract of an agent run by ``autoresearch-coord agents``, for program.md."""
    env = ", ".join(f"${v}" for v in AGENT_ENV.values())
    return f"""## Proposing as one of `autoresearch-coord agents`

`autoresearch-coord agents --count N --command '...'` runs N agents side by side; each run of
an agent is one proposal.

- In: a fresh work directory (the agent's current directory) holding `{TRAIN_PY_NAME}`, the
  head's, to edit in place, and `{BRIEF_NAME}`: the head and its val_bpb per hardware class, the
  last decisions with mean ± sem and their reasons, what is queued, running and awaiting
  repeats right now (other agents are on those: pick something else), recent failures with
  their log tails, the noise per class, what this agent's previous proposal got back, and this
  file. The paths are also in the environment:
  {env}.
- Out: the edited `{TRAIN_PY_NAME}`, one line in `{DESCRIPTION_NAME}` saying what changed and
  why, and exit status 0. The runner submits it based on the head the agent started from.
- Rules: one idea per proposal; edit only `{TRAIN_PY_NAME}`; do not train, submit or commit;
  finish within the runner's timeout (then the agent is killed and nothing is submitted). An
  unchanged or non-compiling file is not submitted, and the next brief says so."""


def render_brief(snapshot: dict, ctx: BriefContext) -> str:
    """The brief as markdown (see the module docstring for the sections)."""
    snapshot = snapshot if isinstance(snapshot, dict) else {}
    tag = snapshot.get("tag")
    workers = snapshot.get("workers")
    title = f"# Proposal brief: {ctx.proposer}" + (f", run `{tag}`" if tag else "")
    parts: list[list[str]] = [
        [title],
        ["## Your task", "", *_contract(ctx, snapshot)],
        ["## What your previous proposal got back", "", *_previous(ctx, snapshot)],
        ["## The head (what you start from)", "", *_head(snapshot)],
        ["## In flight now (others are on these: do not propose them again)"
         + (f" -- {workers} worker{'s' if workers != 1 else ''} connected"
            if isinstance(workers, int) else ""), "", *_in_flight(snapshot)],
        ["## Recent decisions (newest first)", "", *_decisions(snapshot)],
        ["## Recent failures", "", *_failures(snapshot)],
        ["## Noise per hardware class", "", *_noise(snapshot)],
    ]
    program = str(snapshot.get("program_md") or "").strip()
    if program:
        parts.append(["## program.md (the run's instructions)", "", program])
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


__all__ = ["Feedback", "BriefContext", "FEEDBACK_KINDS", "render_brief", "fmt_value",
           "agent_contract_md", "AGENT_ENV", "TRAIN_PY_NAME", "BRIEF_NAME", "DESCRIPTION_NAME"]
