"""The keep/discard rule: given the runs so far of the head and of one candidate on ONE hardware
class, keep, discard, or run k more. Pure functions: no ledger, no git, no clock.

Every run carries its seed index: repeat i of any train.py on a class runs with seed i of the
run's seed sequence, so the candidate's run i and the head's run i share initialisation and
data order. σ is the class's noise model (coordinator.noise): the scatter of one run.

The ``sequential`` rule (the default), for a candidate with runs c_1..c_n and a head with
runs h_1..h_m on the class:

  1. d = mean(c) - mean(h) (negative: the candidate is better), with standard error
     se = σ·√(1/n + 1/m). When every candidate run has a head run at the same seed index and
     the class's pool shows that seed-sharing runs move together (σ_paired, the scatter of a
     paired difference, makes a smaller se), the paired test is used instead:
     d = mean(c_i - h_i) over the pairs, se = σ_paired/√n. The choice depends only on counts
     and the class's pooled noise, never on this candidate's numbers, so it cannot flatter it.
  2. confidence = P(T < -(d + margin)/se), T Student's t with the σ's degrees of freedom
     (normal while σ is the prior): the one-sided confidence that the candidate is better than
     the head by more than the margin.
  3. After one run (the screen): discard at once unless d < -margin - screen·σ (d of step 1:
     the first run minus the head's mean, or minus the head's run with its seed when paired).
     Losers and most do-nothing variants cost one run.
  4. With n >= 2 runs: keep if confidence >= the run's confidence (0.95). One lucky run never
     moves the branch. Discard if n reached max_repeats, or if even max_repeats runs at the
     current d could not reach the confidence (futility). Otherwise run k more: the fewest that
     would reach the confidence if d held (1 while that is out of reach), so parallel workers
     finish a clear winner in one round.

``greedy`` is the rule before this one: keep iff the candidate's first run < mean(h) - margin.

Looking again after every repeat gives a do-nothing candidate several chances at 95 %; the
screen and the futility stop take most of them away early. benchmarks/decisions.py measures the
false-keep rate that results (README, *Deciding*).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from coordinator.noise import Noise
from coordinator.stats import mean, t_cdf

SEQUENTIAL, GREEDY = "sequential", "greedy"
POLICIES = (SEQUENTIAL, GREEDY)
KEEP, DISCARD, MORE, WAIT = "keep", "discard", "more", "wait"
# The sequential rule never keeps on fewer runs than this: a keep moves the branch for good.
MIN_RUNS_TO_KEEP = 2

# Defaults of the run settings (coordinator.repo stores them with the run).
DEFAULTS: dict[str, Any] = {"policy": SEQUENTIAL, "margin": 0.0, "confidence": 0.95,
                            "max_repeats": 4, "screen": 0.5}


@dataclass(frozen=True)
class Run:
    """One ok, counted run: its val_bpb and the seed index it ran with."""
    value: float
    seed_index: int
    attempt_id: str = ""


@dataclass(frozen=True)
class RuleSettings:
    policy: str = DEFAULTS["policy"]
    margin: float = DEFAULTS["margin"]            # bpb the candidate must be better by
    confidence: float = DEFAULTS["confidence"]    # one-sided, needed to keep
    max_repeats: int = DEFAULTS["max_repeats"]    # runs of a candidate at most, per class
    screen: float = DEFAULTS["screen"]            # σ the first run must beat the head by

    def __post_init__(self) -> None:
        problem = check_settings(asdict(self))
        if problem:
            raise ValueError(problem)

    @classmethod
    def from_settings(cls, settings: dict) -> "RuleSettings":
        """From a run's settings map (missing keys take the defaults)."""
        return cls(**{k: settings.get(k, v) if settings.get(k) is not None else v
                      for k, v in DEFAULTS.items()})


def check_settings(s: dict) -> str | None:
    """One line saying what is wrong with these rule settings, or None."""
    def number(key: str) -> bool:
        v = s.get(key)
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

    if s.get("policy") not in POLICIES:
        return f"policy={s.get('policy')!r}: one of {', '.join(POLICIES)}"
    if not number("margin") or s["margin"] < 0:
        return f"margin={s.get('margin')!r}: must be a number >= 0"
    if not number("confidence") or not 0.5 <= s["confidence"] < 1:
        return f"confidence={s.get('confidence')!r}: must be in [0.5, 1)"
    if not number("screen"):
        return f"screen={s.get('screen')!r}: must be a number (σ)"
    mr = s.get("max_repeats")
    if isinstance(mr, bool) or not isinstance(mr, int) or mr < 1:
        return f"max_repeats={mr!r}: must be an integer >= 1"
    if s["policy"] == SEQUENTIAL and mr < MIN_RUNS_TO_KEEP:
        return (f"max_repeats={mr}: the sequential policy keeps only on >= {MIN_RUNS_TO_KEEP} "
                "runs, so it needs max_repeats >= 2 (or use policy greedy)")
    return None


@dataclass(frozen=True)
class Comparison:
    """Candidate vs head on one class: the numbers a decision row records."""
    test: str                   # "paired" | "welch"
    n_candidate: int
    n_head: int
    candidate_mean: float
    head_mean: float
    candidate_sem: float        # σ/√n of each side (the model's, not the sample's)
    head_sem: float
    difference: float           # candidate - head (negative: better)
    se: float
    sigma: float                # σ of one run (or of one paired difference, when paired)
    df: int | None
    sigma_source: str           # "pooled" | "prior" | "pooled-paired"
    confidence: float           # P(candidate better than head by more than the margin)
    pairs: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    action: str                 # keep | discard | more | wait
    rule: str                   # the policy and stage that decided, e.g. "sequential/screen"
    reason: str
    more: int = 0               # runs to add (action "more")
    comparison: Comparison | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _paired_complete(head: Sequence[Run], cand: Sequence[Run]) -> bool:
    """Every candidate run has exactly one head run at its seed index (and seeds are unique)."""
    hs = [r.seed_index for r in head]
    cs = [r.seed_index for r in cand]
    return len(set(hs)) == len(hs) and len(set(cs)) == len(cs) and set(cs) <= set(hs)


def _se(sigma: float, n: int, m: int, paired: bool) -> float:
    return sigma / math.sqrt(n) if paired else sigma * math.sqrt(1.0 / n + 1.0 / m)


def compare(head: Sequence[Run], cand: Sequence[Run], noise: Noise,
            margin: float = 0.0) -> Comparison:
    """The test of step 1-2 in the module doc. Needs >= 1 run on each side."""
    if not head or not cand:
        raise ValueError("compare needs at least one run of the head and of the candidate")
    n, m = len(cand), len(head)
    cm, hm = mean([r.value for r in cand]), mean([r.value for r in head])
    test, d, sigma, df, source = "welch", cm - hm, noise.sigma, noise.df, noise.source
    se = _se(noise.sigma, n, m, paired=False)
    pairs = len({r.seed_index for r in cand} & {r.seed_index for r in head})
    if noise.paired_sigma and _paired_complete(head, cand):
        se_p = _se(noise.paired_sigma, n, m, paired=True)
        if se_p < se:
            by_seed = {r.seed_index: r.value for r in head}
            d = mean([r.value - by_seed[r.seed_index] for r in cand])
            test, se, sigma, df, source = ("paired", se_p, noise.paired_sigma,
                                           noise.paired_df, "pooled-paired")
    conf = t_cdf(-(d + margin) / se, df)
    return Comparison(test, n, m, cm, hm, noise.sigma / math.sqrt(n), noise.sigma / math.sqrt(m),
                      d, se, sigma, df, source, conf, pairs)


def runs_to_reach(c: Comparison, settings: RuleSettings) -> int | None:
    """Fewest extra runs after which the confidence would reach the target if the observed
    difference held; None if not within max_repeats."""
    gain = -(c.difference + settings.margin)
    for extra in range(0, settings.max_repeats - c.n_candidate + 1):
        se = _se(c.sigma, c.n_candidate + extra, c.n_head, paired=c.test == "paired")
        if gain > 0 and t_cdf(gain / se, c.df) >= settings.confidence:
            return extra
    return None


def fmt_runs(values_mean: float, sem: float, n: int) -> str:
    """``2.2480 ± 0.0100 (3)``: mean ± sem (n), the one way runs are shown everywhere."""
    return f"{values_mean:.4f} ± {sem:.4f} ({n})"


def _summary(c: Comparison, settings: RuleSettings) -> str:
    where = "" if not settings.margin else f" (margin {settings.margin:g})"
    df = "prior" if c.df is None else f"{c.df} df"
    return (f"{fmt_runs(c.candidate_mean, c.candidate_sem, c.n_candidate)} vs head "
            f"{fmt_runs(c.head_mean, c.head_sem, c.n_head)}: d {c.difference:+.4f}{where}, "
            f"{100 * c.confidence:.1f}% confident better, {c.test}, σ {c.sigma:.4f} ({df})")


def decide(head: Sequence[Run], cand: Sequence[Run], noise: Noise,
           settings: RuleSettings) -> Verdict:
    """Keep, discard, run k more, or wait (the head has no runs on this class yet)."""
    if not head:
        return Verdict(WAIT, f"{settings.policy}/head", "waiting for the head's runs")
    if not cand:
        return Verdict(MORE, f"{settings.policy}/start", "no runs yet", more=1)
    if settings.policy == GREEDY:
        return _greedy(head, cand, noise, settings)
    c = compare(head, cand, noise, settings.margin)
    text = _summary(c, settings)
    if c.n_candidate == 1:
        # d is the first run minus the head's mean, or minus the head's run with the same seed
        # when the class's runs are paired (compare chose which)
        if c.difference >= -settings.margin - settings.screen * noise.sigma:
            return Verdict(DISCARD, "sequential/screen",
                           f"screened out: first run {cand[0].value:.4f} not below head "
                           f"{c.head_mean:.4f} by {settings.screen:g}σ; {text}", comparison=c)
        need = runs_to_reach(c, settings)
        k = max(1, min(need or 1, settings.max_repeats - 1))
        return Verdict(MORE, "sequential/screen",
                       f"passed the screen: {k} more run{'s' if k > 1 else ''}; {text}",
                       more=k, comparison=c)
    if c.confidence >= settings.confidence:
        return Verdict(KEEP, f"sequential/{c.test}",
                       f"better: {text} >= {100 * settings.confidence:g}%", comparison=c)
    if c.n_candidate >= settings.max_repeats:
        return Verdict(DISCARD, f"sequential/{c.test}",
                       f"not shown better in {settings.max_repeats} runs: {text}", comparison=c)
    need = runs_to_reach(c, settings)
    if need is None:
        return Verdict(DISCARD, f"sequential/{c.test}",
                       f"cannot reach {100 * settings.confidence:g}% within "
                       f"{settings.max_repeats} runs at this difference: {text}", comparison=c)
    k = max(1, need)
    return Verdict(MORE, f"sequential/{c.test}",
                   f"{k} more run{'s' if k > 1 else ''}: {text}", more=k, comparison=c)


def _greedy(head: Sequence[Run], cand: Sequence[Run], noise: Noise,
            settings: RuleSettings) -> Verdict:
    """Today's single-run rule: the candidate's first run against the head's mean."""
    first = min(cand, key=lambda r: r.seed_index)
    c = compare(head, [first], noise, settings.margin)
    head_text = fmt_runs(c.head_mean, c.head_sem, c.n_head)
    how = f"(margin {settings.margin:g}, greedy: one run)"
    if first.value < c.head_mean - settings.margin:
        return Verdict(KEEP, "greedy", f"{first.value:.4f} < head {head_text} {how}",
                       comparison=c)
    return Verdict(DISCARD, "greedy", f"{first.value:.4f} >= head {head_text} - margin {how}",
                   comparison=c)


__all__ = ["Run", "RuleSettings", "Comparison", "Verdict", "compare", "decide",
           "runs_to_reach", "check_settings", "fmt_runs", "POLICIES", "SEQUENTIAL", "GREEDY",
           "KEEP", "DISCARD", "MORE", "WAIT", "MIN_RUNS_TO_KEEP", "DEFAULTS"]
