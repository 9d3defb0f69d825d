"""The decision rule, the noise model, the seed sequence and the t distribution: pure functions,
checked against tables (run sets -> verdicts; t quantiles from a printed table)."""
from __future__ import annotations

import math
import random

import pytest

from coordinator import noise as N
from coordinator import rule as R
from coordinator.seeds import next_index, seed_for
from coordinator.stats import betainc, t_cdf, t_quantile

# ---- the t distribution ------------------------------------------------------------------------

# Two-sided 95 % and one-sided 95 % critical values, as printed in any statistics table.
T_TABLE = [(1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182), (5, 0.975, 2.571),
           (10, 0.975, 2.228), (30, 0.975, 2.042), (120, 0.975, 1.980), (1, 0.95, 6.314),
           (4, 0.95, 2.132), (8, 0.95, 1.860), (20, 0.95, 1.725), (None, 0.95, 1.645),
           (None, 0.975, 1.960), (6, 0.995, 3.707), (15, 0.99, 2.602)]


@pytest.mark.parametrize("df,p,t", T_TABLE)
def test_t_quantiles_match_the_table(df, p, t):
    assert t_quantile(p, df) == pytest.approx(t, abs=6e-4)
    assert t_cdf(t, df) == pytest.approx(p, abs=2e-4)
    assert t_cdf(-t, df) == pytest.approx(1 - p, abs=2e-4)


def test_betainc_closed_forms():
    # I_x(1, 1) = x; I_x(a, 1) = x^a; I_x(1/2, 1/2) = (2/π) asin(√x); symmetry.
    for x in (0.01, 0.2, 0.5, 0.77, 0.999):
        assert betainc(1, 1, x) == pytest.approx(x, rel=1e-12)
        assert betainc(3.5, 1, x) == pytest.approx(x ** 3.5, rel=1e-10)
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)),
                                                     rel=1e-10)
        assert betainc(2.5, 7, x) + betainc(7, 2.5, 1 - x) == pytest.approx(1.0, abs=1e-12)
    assert t_cdf(0.0, 3) == 0.5 and t_cdf(math.inf, 3) == 1.0
    with pytest.raises(ValueError):
        betainc(0, 1, 0.5)


# ---- the noise model ---------------------------------------------------------------------------

def test_pooled_sigma_uses_within_group_deviations_only():
    # Two groups far apart in mean, each with spread 0.01: σ is 0.01, not the spread of all.
    sigma, df, used = N.pooled([[1.00, 1.02], [2.00, 2.02, 2.01], [3.0]])
    assert (df, used) == (3, 2)
    ss = 2 * 0.01 ** 2 + 2 * 0.01 ** 2
    assert sigma == pytest.approx(math.sqrt(ss / 3))


def test_prior_until_enough_df_then_pooled():
    few = N.estimate([[1.0, 1.01], [2.0, 2.02]], prior_sigma=0.03, min_df=8)
    assert few.source == "prior" and few.sigma == 0.03 and few.df is None
    assert few.pooled_df == 2 and few.pooled_sigma is not None
    assert "prior until 8 df" in few.describe()
    rng = random.Random(3)
    groups = [[rng.gauss(2.0 + k, 0.02) for _ in range(3)] for k in range(6)]
    many = N.estimate(groups, prior_sigma=0.03, min_df=8)
    assert many.source == "pooled" and many.df == 12 and many.sigma != 0.03
    assert 0.01 < many.sigma < 0.035
    # identical numbers are a broken measurement, never a σ of zero
    flat = N.estimate([[1.0] * 5] * 3, prior_sigma=0.03, min_df=8)
    assert flat.source == "prior"
    with pytest.raises(ValueError):
        N.estimate([], prior_sigma=0)


# ---- seeds -------------------------------------------------------------------------------------

def test_seed_sequence_starts_at_the_run_seed_and_reuses_holes():
    assert [seed_for(42, i) for i in range(3)] == [42, 43, 44]
    assert next_index(set()) == 0 and next_index({0, 1, 3}) == 2
    with pytest.raises(ValueError):
        seed_for(42, -1)


# ---- the rule: tables of run sets -> verdicts ---------------------------------------------------

PRIOR = N.Noise(0.02, None, "prior", None, 0, 0, 0.02, 8)
POOLED = N.Noise(0.02, 20, "pooled", 0.02, 20, 7, 0.03, 8)
# A class whose pool shows seed-sharing runs moving together: paired differences scatter by
# 0.012 where independent runs would give 0.02 * √2 = 0.028.
CORRELATED = N.Noise(0.02, 20, "pooled", 0.02, 20, 7, 0.03, 8, paired_sigma=0.012, paired_df=12)
SEQ = R.RuleSettings()
HEAD = [2.250, 2.230, 2.270]        # mean 2.250


def runs(*values, start=0):
    return [R.Run(v, start + i, f"a{start + i}") for i, v in enumerate(values)]


CASES = [
    # (name, head, candidate, noise, settings, action, rule)
    ("no head runs yet: wait", [], [2.1], PRIOR, SEQ, R.WAIT, "sequential/head"),
    ("no candidate runs: one", HEAD, [], PRIOR, SEQ, R.MORE, "sequential/start"),
    ("clearly worse: one run", HEAD, [2.300], PRIOR, SEQ, R.DISCARD, "sequential/screen"),
    ("neutral: one run", HEAD, [2.250], PRIOR, SEQ, R.DISCARD, "sequential/screen"),
    ("better by less than the screen", HEAD, [2.245], PRIOR, SEQ, R.DISCARD, "sequential/screen"),
    ("lucky-looking first run is repeated", HEAD, [2.200], PRIOR, SEQ, R.MORE,
     "sequential/screen"),
    ("clearly better on two runs: keep", HEAD, [2.190, 2.200], PRIOR, SEQ, R.KEEP,
     "sequential/welch"),
    ("borderline on two: more", HEAD, [2.222, 2.222], PRIOR, SEQ, R.MORE, "sequential/welch"),
    ("second run undoes the first: futile", HEAD, [2.220, 2.270], PRIOR, SEQ, R.DISCARD,
     "sequential/welch"),
    ("max repeats without confidence", HEAD, [2.230, 2.232, 2.228, 2.230], PRIOR, SEQ,
     R.DISCARD, "sequential/welch"),
    ("margin makes a keep a more", HEAD, [2.200, 2.200], PRIOR,
     R.RuleSettings(margin=0.02), R.MORE, "sequential/welch"),
    ("greedy keeps one lucky run", HEAD, [2.249], PRIOR, R.RuleSettings(policy="greedy"),
     R.KEEP, "greedy"),
    ("greedy discards a tie", HEAD, [2.250], PRIOR, R.RuleSettings(policy="greedy"),
     R.DISCARD, "greedy"),
    ("paired when the pool shows seed correlation", HEAD, [2.225, 2.205, 2.245], CORRELATED,
     SEQ, R.KEEP, "sequential/paired"),
]


@pytest.mark.parametrize("name,head,cand,noise,settings,action,rule_name", CASES,
                         ids=[c[0] for c in CASES])
def test_rule_table(name, head, cand, noise, settings, action, rule_name):
    v = R.decide(runs(*head), runs(*cand), noise, settings)
    assert (v.action, v.rule) == (action, rule_name), v.reason
    if action == R.MORE:
        assert 1 <= v.more <= settings.max_repeats - len(cand)
    if v.comparison is not None:
        c = v.comparison
        assert (c.n_candidate, c.n_head) == (len(cand) if settings.policy != "greedy" else 1,
                                             len(head))
        assert c.head_mean == pytest.approx(sum(head) / len(head))
        assert f"({c.n_head})" in v.reason  # mean ± sem (n) in every reason


def test_keep_confidence_is_the_one_sided_t_test():
    v = R.decide(runs(*HEAD), runs(2.190, 2.200), POOLED, SEQ)
    c = v.comparison
    se = 0.02 * math.sqrt(1 / 2 + 1 / 3)
    assert c.se == pytest.approx(se)
    assert c.difference == pytest.approx(2.195 - 2.250)
    assert c.confidence == pytest.approx(t_cdf(0.055 / se, 20))
    assert c.df == 20 and c.sigma_source == "pooled" and c.test == "welch"


def test_missing_pairs_fall_back_to_welch_even_with_seed_correlation():
    # the head's seed-1 run failed, so the candidate's seed-1 run has no partner
    head = [R.Run(2.250, 0), R.Run(2.250, 2), R.Run(2.250, 3)]
    cand = runs(2.225, 2.205, 2.245)
    c = R.compare(head, cand, CORRELATED)
    assert c.test == "welch" and c.pairs == 2
    full = R.compare(runs(*HEAD), cand, CORRELATED)
    assert full.test == "paired" and full.pairs == 3
    by_seed = [2.225 - 2.250, 2.205 - 2.230, 2.245 - 2.270]
    assert full.difference == pytest.approx(sum(by_seed) / 3)
    assert full.se == pytest.approx(0.012 / math.sqrt(3)) and full.df == 12


def test_parallel_repeats_for_a_clear_winner():
    # One run far ahead: the rule asks for enough repeats at once to finish in one round.
    v = R.decide(runs(*HEAD), runs(2.195), PRIOR, R.RuleSettings(max_repeats=5))
    assert v.action == R.MORE and v.more == 1
    v = R.decide(runs(*HEAD), runs(2.222), PRIOR, R.RuleSettings(max_repeats=5))
    assert v.action == R.MORE and v.more >= 2


@pytest.mark.parametrize("bad,msg", [
    ({"policy": "yolo"}, "policy"), ({"confidence": 1.0}, "confidence"),
    ({"confidence": 0.2}, "confidence"), ({"margin": -0.1}, "margin"),
    ({"max_repeats": 1}, "max_repeats"), ({"max_repeats": 2.5}, "max_repeats"),
    ({"screen": float("nan")}, "screen")])
def test_bad_settings_say_which(bad, msg):
    with pytest.raises(ValueError, match=msg):
        R.RuleSettings(**bad)
    assert R.RuleSettings(policy="greedy", max_repeats=1).max_repeats == 1


def test_false_keeps_of_do_nothing_variants_are_rare_and_cheap():
    """A thousand candidates that change nothing, each decided to the end against a head of 3
    runs: few are kept, and they cost little more than one run each on average."""
    rng = random.Random(7)
    kept = runs_used = 0
    for _ in range(1000):
        head = runs(*[rng.gauss(2.25, 0.02) for _ in range(3)])
        cand: list[R.Run] = []
        while (v := R.decide(head, cand, PRIOR, SEQ)).action == R.MORE:
            cand += runs(*[rng.gauss(2.25, 0.02) for _ in range(v.more)], start=len(cand))
        kept += v.action == R.KEEP
        runs_used += len(cand)
    assert kept <= 80            # ~5.5 % expected (per-look 95 %, a shared 3-run head)
    assert runs_used / 1000 < 1.6


def test_drift_is_the_newest_head_run_beyond_three_standard_errors():
    assert N.drift([2.25, 2.26, 2.24], 0.02) is None
    d = N.drift([2.25, 2.26, 2.24, 2.35], 0.02)
    assert d is not None and d.earlier_n == 3 and d.z == pytest.approx(0.10 / (0.02 * math.sqrt(4 / 3)))
    assert "+4.3σ" in d.describe()
    assert N.drift([2.25, 2.10], 0.02).z < 0
    assert N.drift([2.25], 0.02) is None
