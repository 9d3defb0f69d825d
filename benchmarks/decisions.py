"""Decision quality: how often does the real coordinator keep a change that does nothing, and
where does the branch end up? Greedy (one run against the head's mean) vs the sequential rule.
Reported only, never asserted.

The REAL ``coordinator.core.Coordinator`` (real git, real SQLite ledger; no sockets: this script
calls its methods as the server would) is fed by simulated workers on two hardware classes:

  * every candidate is the current head's train.py with one more *idea* switched on (one line
    ``IDEA_0042 = 1``; each idea has its own line, so git merges them cleanly). An idea has a
    true effect in units of the class's σ: half harmful (exponential, mean +1 σ: mostly
    slight), 10 % helpful (-0.5..-3 σ, uniform; ``--helpful`` changes the share), the rest
    neutral (exactly 0). The same stream of ideas, in the same order, for every policy;
  * a run's val_bpb = the class's base + the sum of its text's effects + a seed effect shared by
    every text run with that seed index (σ_seed) + fresh run noise (σ_run) + a slow drift of the
    class over the night. Total σ = sqrt(σ_seed² + σ_run²); the defaults are this machine's tiny
    preset (0.025 across seeds, 0.021 at one seed: README, *Deciding*);
  * runs take one time unit (±10 %) on ``--workers`` machines per class; agents keep
    ``--queue`` candidates waiting, each written on the head of the moment. With
    ``--supply R`` they write only R ideas per time unit (still pausing while the queue is
    full): below what the fleet consumes, workers wait for ideas, a night is a fixed time
    (``--runs`` / workers) rather than a number of runs, and spare machines are what repeats
    run on -- a fleet fed by one or two agents.

Every policy gets the same compute: ``--runs`` runs in total. Figures per policy (mean, and
sample sd, over ``--seeds`` repetitions of the whole night, each from a fresh repo;
``--rule KEY=VALUE`` sets the sequential rule's decision settings, to tune them):

  false_keep_rate  keeps of candidates whose true effect is >= 0, over decided such candidates
  power            keeps of helpful candidates, over decided helpful ones
  runs_per_candidate  counted runs of candidates (not of the head) per decided candidate
  head_true        the final head's TRUE improvement over the baseline, in σ (negative: better),
                   per class and on average; also in bpb
  decided, kept, head_runs, undecided at the end; runs_done (fewer than --runs only when
                   --supply leaves machines waiting for ideas)
  head_true_vs_greedy  the final true head minus greedy's, paired night by night (the same
                   ideas and noise draws): mean ± se -- the figure that says which policy
                   ends further down, where the spread over nights (~5σ) hides it
  helpful_outcomes where helpful ideas ended per night: kept, screened out, not shown better

    python benchmarks/decisions.py                       # 3 nights x 2 policies, 450 runs each
    python benchmarks/decisions.py --quick               # 1 night, 150 runs
    python benchmarks/decisions.py --policy greedy --runs 900 --seeds 5
    python benchmarks/decisions.py --helpful 0.03 --out benchmarks/results/decisions-rare.json
    python benchmarks/decisions.py --supply 2 --seeds 10   # agents write 2 ideas per run time
    python benchmarks/decisions.py --policy sequential --rule confidence=0.9 --rule screen=0.25
    python benchmarks/decisions.py --policy greedy --seeds 10 --out /tmp/greedy.json
    python benchmarks/decisions.py --policy sequential --seeds 10 --against /tmp/greedy.json \
        --rule head_runs=2                               # tune against stored greedy nights

Writes benchmarks/results/decisions.json (git-ignored) with the settings, the load average
before and after, and every figure.
"""
from __future__ import annotations

import heapq
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator import repo as R  # noqa: E402
from coordinator.core import Coordinator  # noqa: E402
from coordinator.stats import mean_sem, sum_sq_dev  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "decisions.json"
N_IDEAS = 1200          # slots in the simulated train.py (more than any night uses)
BASE_SEED = 42          # the run's seed setting (the sequence is 42, 43, ...)
RUN_SECONDS = 300.0     # wall-clock seconds one simulated run stands for
# The mix of ideas: most do nothing or a little harm; one in ten helps by 0.5-3 σ.
HARMFUL, HELPFUL = 0.50, 0.10


@dataclass(frozen=True)
class HwClass:
    name: str
    base: float         # true val_bpb of the baseline
    sigma_run: float    # fresh noise of every run
    sigma_seed: float   # shared by every run with the same seed index
    drift: float        # total drift of every true value over the night, in σ

    @property
    def sigma(self) -> float:
        return math.hypot(self.sigma_run, self.sigma_seed)


CLASSES = (HwClass("sim-m1/16GB/metal", 2.25, 0.021, 0.0136, -1.0),
           HwClass("sim-m4/64GB/metal", 1.95, 0.025, 0.0160, +0.5))


def baseline_text() -> str:
    lines = ['"""Simulated train.py: one line per idea; 1 switches it on."""']
    for i in range(N_IDEAS):
        lines += [f"IDEA_{i:04d} = 0", "#"]   # a separator line keeps neighbours' merges clean
    return "\n".join(lines) + "\n"


def ideas_of(text: str) -> set[int]:
    return {int(line[5:9]) for line in text.splitlines()
            if line.startswith("IDEA_") and line.endswith("= 1")}


def with_idea(text: str, idea: int) -> str:
    return text.replace(f"IDEA_{idea:04d} = 0\n", f"IDEA_{idea:04d} = 1\n", 1)


def idea_stream(seed: int, helpful: float = HELPFUL) -> list[tuple[str, float]]:
    """(kind, effect in σ) for each idea, in submission order; the same for every policy."""
    rng = random.Random(seed)
    out = []
    for _ in range(N_IDEAS):
        u = rng.random()
        if u < HARMFUL:
            # most harm is slight: exponential, mean 1 σ (a third of it under 0.4 σ)
            out.append(("harmful", rng.expovariate(1.0)))
        elif u < 1.0 - helpful:
            out.append(("neutral", 0.0))
        else:
            out.append(("helpful", -rng.uniform(0.5, 3.0)))
    return out


@dataclass
class Night:
    policy: str
    seed: int
    runs: int
    workers: int
    queue: int
    settings: dict = field(default_factory=dict)
    helpful: float = HELPFUL
    supply: float | None = None     # ideas the agents write per time unit (None: unlimited)

    @property
    def span(self) -> float:
        """The night in time units (one unit: one run): runs / workers in the fleet."""
        return self.runs / (self.workers * len(CLASSES))


def policy_settings(policy: str, rule: dict | None = None) -> dict:
    """The run settings of each policy: greedy is the single-run rule as it was (one head run,
    never re-measured); sequential is the default rule, with ``rule`` (``--rule``) over its
    defaults."""
    return dict(R.SINGLE_RUN) if policy == "greedy" else {**(rule or {}), "policy": "sequential"}


def parse_rule(items: tuple[str, ...]) -> dict:
    """``--rule KEY=VALUE`` items as decision settings, checked as ``init_repo`` would check
    them (a bad one: a click error naming it, before any night runs)."""
    rule: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or key not in R.DECISION_DEFAULTS or key == "policy":
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE, KEY one of "
                                     f"{', '.join(k for k in R.DECISION_DEFAULTS if k != 'policy')}",
                                     param_hint="--rule")
        try:
            value = float(raw)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {raw!r} is not a number", param_hint="--rule")
        rule[key] = int(value) if isinstance(R.DECISION_DEFAULTS[key], int) \
            and value == int(value) else value
    try:
        R.resolve_settings("tiny", {**rule, "policy": "sequential"})
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--rule")
    return rule


def simulate(night: Night, log=print) -> dict:
    ideas = idea_stream(night.seed, night.helpful)
    rng = random.Random(night.seed * 7919 + 1)
    seed_effects = {c.name: [rng.gauss(0.0, c.sigma_seed) for _ in range(64)] for c in CLASSES}
    clock = [0.0]
    span = night.span

    def true_value(cls: HwClass, text: str, at: float | None = None) -> float:
        v = cls.base + sum(ideas[i][1] for i in ideas_of(text)) * cls.sigma
        if at is not None:
            v += cls.drift * cls.sigma * min(1.0, at / span)
        return v

    with tempfile.TemporaryDirectory(prefix="decisions-bench-") as tmp:
        repo = Path(tmp) / "run"
        R.init_repo(repo, tag="bench", preset="tiny", train_py=baseline_text(),
                    **night.settings)
        # one time unit is one run of the seed preset (300 s), so remeasure_seconds means what
        # it would on a real night
        coord = Coordinator(repo, clock=lambda: clock[0] * RUN_SECONDS)
        try:
            return _night(coord, repo, night, ideas, rng, seed_effects, clock, true_value, log)
        finally:
            coord.close()


def _night(coord, repo, night, ideas, rng, seed_effects, clock, true_value, log) -> dict:
    by_name = {c.name: c for c in CLASSES}
    workers = [(f"{c.name.split('/')[0]}-w{k}", c) for c in CLASSES for k in range(night.workers)]
    for wid, c in workers:
        coord.worker_hello(wid, wid, {"sim": True}, c.name, None)
    next_idea = [0]
    cand_idea: dict[int, int] = {}

    def head_text() -> str:
        return R.read_blob(repo, coord.ledger.head()["commit_sha"])

    def top_up(at_most: int | None = None) -> None:
        queued = coord.ledger.scalar("SELECT COUNT(*) FROM candidates WHERE state = 'queued'")
        text = head_text()
        have = ideas_of(text)
        wrote = 0
        while queued < night.queue and (at_most is None or wrote < at_most):
            i = next_idea[0]
            next_idea[0] += 1
            if i in have:
                continue
            out = coord.submit(with_idea(text, i), f"idea {i} ({ideas[i][0]} "
                                                   f"{ideas[i][1]:+.2f}σ)")
            cand_idea[out["candidate_id"]] = i
            queued += 1
            wrote += 1

    # (time, order, worker id) of runs finishing, and ("", ...) of the agents' next idea when
    # their supply is limited (night.supply ideas per time unit, while the queue has room)
    events: list[tuple[float, int, str]] = []
    pending: dict[str, object] = {}
    idle: list[str] = []
    done = [0]
    seq = [0]

    def assign(wid: str) -> None:
        a = coord.next_assignment(wid)
        if a is None:
            idle.append(wid)
            return
        pending[wid] = a
        seq[0] += 1
        heapq.heappush(events, (clock[0] + rng.uniform(0.9, 1.1), seq[0], wid))

    span = night.span
    top_up()
    if night.supply:
        heapq.heappush(events, (1.0 / night.supply, 0, ""))
    for wid, _ in workers:
        assign(wid)
    # Unlimited supply: the night is `runs` runs. Limited: it is the same span of time, and
    # workers with nothing to run wait (a run still in flight at the end does not count).
    while events and (done[0] < night.runs if not night.supply else events[0][0] <= span):
        t, _, wid = heapq.heappop(events)
        clock[0] = t
        if not wid:    # the agents finished an idea: submit it if the queue has room
            top_up(at_most=1)
            seq[0] += 1
            heapq.heappush(events, (t + 1.0 / night.supply, seq[0], ""))
            waiting, idle[:] = list(idle), []
            for w in waiting:
                assign(w)
            continue
        a = pending.pop(wid)
        cls = by_name[dict(workers)[wid].name]
        index = int(a.settings.get("seed", BASE_SEED)) - BASE_SEED
        text = a.train_py
        value = (true_value(cls, text, at=t) + seed_effects[cls.name][index % 64]
                 + rng.gauss(0.0, cls.sigma_run))
        coord.record_result(wid, a.attempt_id, {
            "status": "ok", "val_bpb": value, "result": {"status": "ok", "val_bpb": value},
            "log_tail": "", "exit_code": 0, "wall_seconds": 1.0})
        done[0] += 1
        if not night.supply:
            top_up()    # what the decision took from the queue (stale), on the new head
        waiting, idle[:] = list(idle), []
        for w in [wid] + waiting:
            if w not in pending:
                assign(w)
        if not night.supply:
            top_up()    # the agents keep the queue full: a candidate is always waiting
        if done[0] % 50 == 0:
            log(f"  {night.policy} seed {night.seed}: {done[0]}/{night.runs} runs, "
                f"{len(cand_idea)} candidates submitted")
    return _figures(coord, repo, night, ideas, cand_idea, true_value, head_text()) | {
        "runs_done": done[0]}


def _figures(coord, repo, night, ideas, cand_idea, true_value, final_text) -> dict:
    L = coord.ledger
    rows = L.all("SELECT candidate_id, verdict, rule FROM decisions WHERE candidate_id > 0")
    decided = {r["candidate_id"]: r["verdict"] for r in rows}
    # where each kind of idea ended: kept, or the rule stage that discarded it (screen, test,
    # the head it ran on moved, stale) -- where a policy loses its helpful ideas
    outcomes: dict[str, dict[str, int]] = {}
    for r in rows:
        kind = ideas[cand_idea[r["candidate_id"]]][0]
        how = "kept" if r["verdict"] == "kept" else f"{r['verdict']} {r['rule'] or ''}".strip()
        outcomes.setdefault(kind, {}).setdefault(how, 0)
        outcomes[kind][how] += 1
    runs_of = {r[0]: r[1] for r in L.all(
        "SELECT candidate_id, COUNT(*) FROM attempts WHERE purpose = 'candidate' AND "
        "state = 'done' AND status = 'ok' GROUP BY candidate_id")}
    head_runs = L.scalar("SELECT COUNT(*) FROM attempts WHERE purpose = 'head' AND state = 'done'")
    nonneg = [c for c in decided if ideas[cand_idea[c]][1] >= 0]
    helpful = [c for c in decided if ideas[cand_idea[c]][1] < 0]
    kept = [c for c in decided if decided[c] == "kept"]
    head_sigma = {}
    for cls in CLASSES:
        head_sigma[cls.name] = (true_value(cls, final_text) - cls.base) / cls.sigma
    return {
        "policy": night.policy, "seed": night.seed, "runs": night.runs,
        "submitted": len(cand_idea), "decided": len(decided),
        "undecided": len(cand_idea) - len(decided), "kept": len(kept),
        "false_keeps": sum(1 for c in nonneg if decided[c] == "kept"),
        "false_keep_rate": (sum(1 for c in nonneg if decided[c] == "kept") / len(nonneg)
                            if nonneg else None),
        "power": (sum(1 for c in helpful if decided[c] == "kept") / len(helpful)
                  if helpful else None),
        "runs_per_candidate": (sum(runs_of.get(c, 0) for c in decided) / len(decided)
                               if decided else None),
        "head_runs": head_runs,
        "head_true_sigma": head_sigma,
        "head_true_sigma_mean": sum(head_sigma.values()) / len(head_sigma),
        "head_true_bpb": {c.name: true_value(c, final_text) - c.base for c in CLASSES},
        "kept_ideas": sorted(ideas_of(final_text)),
        "outcomes": outcomes,
    }


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _sd(rows: list[dict], key: str) -> float | None:
    """Sample standard deviation over nights (None under two): the spread a setting's figures
    must be read against."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    if len(vals) < 2:
        return None
    return math.sqrt(sum_sq_dev(vals) / (len(vals) - 1))


SPREAD_KEYS = ("false_keep_rate", "power", "runs_per_candidate", "head_true_sigma_mean")


def paired_gap(nights: list[dict], policy: str, against: str = "greedy") -> dict | None:
    """``policy``'s final true head minus ``against``'s, night by night: both policies see the
    same idea stream and noise draws on a night of the same seed, so the per-night difference
    is far less noisy than either mean (sd over nights of ~5σ each). Mean, its standard error
    and the nights it came from; None without two shared nights."""
    mine = {n["seed"]: n["head_true_sigma_mean"] for n in nights if n["policy"] == policy}
    base = {n["seed"]: n["head_true_sigma_mean"] for n in nights if n["policy"] == against}
    diffs = [mine[s] - base[s] for s in sorted(mine) if s in base]
    if len(diffs) < 2:
        return None
    m, se = mean_sem(diffs)
    return {"against": against, "mean": m, "se": se,
            "nights": len(diffs), "better_nights": sum(1 for d in diffs if d < 0)}


def helpful_outcomes(rows: list[dict]) -> dict:
    """Where a policy's helpful ideas ended, per night: kept, screened out (the first run),
    not shown better (the test, or greedy's one run), otherwise (stale, on an old head)."""
    out = {"decided": 0.0, "kept": 0.0, "screen": 0.0, "test": 0.0, "other": 0.0}
    for night in rows:
        for how, n in (night.get("outcomes") or {}).get("helpful", {}).items():
            out["decided"] += n
            if how == "kept":
                out["kept"] += n
            elif how.endswith("/screen"):
                out["screen"] += n
            elif how.split()[-1] in ("greedy", "sequential/welch", "sequential/paired"):
                out["test"] += n
            else:
                out["other"] += n
    return {k: v / max(1, len(rows)) for k, v in out.items()}


def load_against(path: Path, runs: int, workers: int, queue: int, helpful: float,
                 supply: float | None = None) -> list[dict]:
    """The greedy nights of an earlier run of this script, checked to be comparable."""
    try:
        doc = json.loads(path.read_text())
        nights = [n for n in doc["nights"] if n["policy"] == "greedy"]
        same = (doc["runs"], doc["workers_per_class"], doc["queue"], doc["mix"]["helpful"],
                doc.get("supply"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise click.BadParameter(f"{path}: not a JSON written by this script ({e})",
                                 param_hint="--against")
    if same != (runs, workers, queue, helpful, supply):
        raise click.BadParameter(
            f"{path}: its nights ran with runs/workers/queue/helpful/supply {same}, not "
            f"{(runs, workers, queue, helpful, supply)}: the gap would not be paired",
            param_hint="--against")
    if not nights:
        raise click.BadParameter(f"{path}: has no greedy nights", param_hint="--against")
    return nights


@click.command()
@click.option("--policy", "policies", multiple=True, type=click.Choice(["greedy", "sequential"]),
              help="Policies to compare (default: both, or greedy where only it exists).")
@click.option("--runs", type=click.IntRange(min=10), default=450, show_default=True,
              help="Runs per night (equal compute for every policy).")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Nights per policy (different idea streams and noise).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Workers per hardware class.")
@click.option("--queue", type=click.IntRange(min=1), default=2, show_default=True,
              help="Candidates the agents keep waiting.")
@click.option("--helpful", type=click.FloatRange(0.0, 0.5), default=HELPFUL, show_default=True,
              help="Fraction of ideas that help (the rest: half harmful, the others neutral).")
@click.option("--supply", type=click.FloatRange(min=0.01), default=None,
              help="Ideas the agents write per run time, fleet-wide (default: unlimited, the "
                   "queue is always full). Below what the fleet consumes, workers wait for "
                   "ideas: the night is then a fixed time, not a number of runs.")
@click.option("--rule", "rule_items", multiple=True, metavar="KEY=VALUE",
              help="A setting of the sequential rule over its default (repeatable), e.g. "
                   "--rule confidence=0.9 --rule screen=0.25 --rule head_runs=5.")
@click.option("--against", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A JSON this script wrote with greedy nights of the same settings: the "
                   "paired gap is taken against those instead of running greedy again (to "
                   "tune --rule settings quickly).")
@click.option("--quick", is_flag=True, help="One night of 150 runs per policy.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=OUT,
              show_default=True, help="Where the JSON goes.")
def main(policies, runs, seeds, workers, queue, helpful, supply, rule_items, against, quick,
         out):
    """Compare keep/discard policies on the real coordinator with simulated workers."""
    rule = parse_rule(rule_items)
    if quick:
        runs, seeds = 150, 1
    if not policies:
        policies = ("greedy", "sequential")
    stored = load_against(against, runs, workers, queue, helpful, supply) if against else []
    load_before = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") \
        else None
    t0 = time.time()
    nights = []
    for policy in policies:
        for s in range(seeds):
            night = Night(policy, s + 1, runs, workers, queue, policy_settings(policy, rule),
                          helpful, supply)
            click.echo(f"{policy}, night {s + 1}/{seeds}: {runs} runs on "
                       f"{workers * len(CLASSES)} workers", err=True)
            nights.append(simulate(night, log=lambda m: click.echo(m, err=True)))
    summary = {}
    for policy in policies:
        rows = [n for n in nights if n["policy"] == policy]
        summary[policy] = {k: _mean(rows, k) for k in (
            "false_keep_rate", "power", "runs_per_candidate", "head_true_sigma_mean", "decided",
            "kept", "false_keeps", "undecided", "head_runs", "submitted", "runs_done")}
        summary[policy]["sd"] = {k: _sd(rows, k) for k in SPREAD_KEYS}
        if policy != "greedy":
            summary[policy]["head_true_vs_greedy"] = paired_gap(
                [n for n in stored if n["seed"] <= seeds] + nights, policy)
        summary[policy]["helpful_outcomes"] = helpful_outcomes(rows)
    load_after = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") \
        else None
    doc = {"classes": [asdict(c) | {"sigma": c.sigma} for c in CLASSES], "runs": runs,
           "mix": {"harmful": HARMFUL, "helpful": helpful, "neutral": 1 - HARMFUL - helpful},
           "supply": supply,
           "seeds": seeds, "workers_per_class": workers, "queue": queue, "rule": rule,
           "wall_seconds": time.time() - t0, "loadavg_before": load_before,
           "loadavg_after": load_after, "summary": summary, "nights": nights}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    click.echo(f"\n{'policy':<11} {'false keeps':>13} {'power':>13} {'runs/cand':>11} "
               f"{'head true (σ)':>13} {'decided':>7} {'kept':>5}")
    for policy, s in summary.items():
        def f(key, fmt, width):
            v, sd = s[key], s["sd"].get(key)
            if v is None:
                return "-".rjust(width)
            text = format(v, fmt) + (f"±{format(sd, fmt.lstrip('+'))}" if sd is not None else "")
            return text.rjust(width)
        click.echo(f"{policy:<11} {f('false_keep_rate', '.1%', 13)} {f('power', '.1%', 13)} "
                   f"{f('runs_per_candidate', '.2f', 11)} {f('head_true_sigma_mean', '+.1f', 13)}"
                   f" {s['decided']:7.0f} {s['kept']:5.1f}")
    if supply:
        click.echo("runs done per night (the agents write " + f"{supply:g} ideas per run time): "
                   + ", ".join(f"{p} {s['runs_done']:.0f}" for p, s in summary.items()))
    for policy, s in summary.items():
        ho = s["helpful_outcomes"]
        click.echo(f"{policy}: helpful ideas per night: {ho['decided']:.1f} decided, "
                   f"{ho['kept']:.1f} kept, {ho['screen']:.1f} screened out, "
                   f"{ho['test']:.1f} not shown better, {ho['other']:.1f} otherwise")
    for policy, s in summary.items():
        gap = s.get("head_true_vs_greedy")
        if gap:
            click.echo(f"{policy} - greedy, final true head, paired by night: "
                       f"{gap['mean']:+.1f} ± {gap['se']:.1f}σ (se; better on "
                       f"{gap['better_nights']} of {gap['nights']} nights)")
    if rule:
        click.echo("sequential rule: " + ", ".join(f"{k}={v}" for k, v in rule.items()))
    click.echo(f"(means ± sd over {seeds} night(s) of {runs} runs; load average {load_before} -> "
               f"{load_after}; {time.time() - t0:.0f} s; {out})")


if __name__ == "__main__":
    main()
