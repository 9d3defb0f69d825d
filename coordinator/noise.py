"""The noise model: how much one run's val_bpb scatters on one hardware class.

σ of a class is the pooled within-group standard deviation of every repeated measurement on
it: each *group* is the ok runs of one train.py text (the head's, or a candidate's with at least
two runs), and

    σ² = Σ_groups Σ_runs (value - group mean)²  /  Σ_groups (n_group - 1),   df = Σ (n_group - 1).

Groups differ in their means (that is what is being measured), so only deviations from each
group's own mean count. Runs of different texts are never one group (a rebased candidate is a
new text). Groups selected for looking good after one run (screen passers) have that run at an
extreme, which can only inflate σ: the error is on the conservative side.

The same pooling over *paired differences* (a candidate's run at seed index i minus the head's
run at seed index i, for candidates with at least two such pairs) gives σ_paired, the scatter of
one paired difference. Without any shared seed effect σ_paired ≈ √2·σ; runs that share a seed
(same initialisation, same data order) move together, and σ_paired shows by how much.

Until the pool has ``min_df`` degrees of freedom its σ is itself too noisy to trust (with 2 df
the estimate is off by a factor of 2 one time in ten), so the run's prior σ -- a run setting,
chosen conservatively (larger than the usual spread) -- is used instead, as if known exactly
(``df=None``: normal quantiles). Pure functions: no ledger.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

from coordinator.stats import mean, sum_sq_dev

# Reruns of the same train.py scatter by about 0.02-0.03 bpb (measured on this machine's tiny
# preset, and reported for Macs): 0.03 sits at the top of that range, so it errs towards caution.
DEFAULT_PRIOR_SIGMA = 0.03
# Degrees of freedom the pool needs before its σ replaces the prior (3 head runs on a class give
# 2; a few repeated candidates bring it past 8).
DEFAULT_MIN_DF = 8


@dataclass(frozen=True)
class Noise:
    """σ of one class and where it came from."""
    sigma: float                 # the σ decisions use
    df: int | None               # its degrees of freedom (None: the prior, treated as known)
    source: str                  # "pooled" | "prior"
    pooled_sigma: float | None   # the pool's σ, even while the prior is in use (None: no df)
    pooled_df: int               # degrees of freedom of the pool
    groups: int                  # texts that contributed (>= 2 ok runs each)
    prior_sigma: float
    min_df: int
    paired_sigma: float | None = None   # σ of one paired difference, once its pool has min_df
    paired_df: int = 0                  # degrees of freedom of that pool (used or not)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        pool = (f"pooled {self.pooled_sigma:.4f} from {self.pooled_df} df in {self.groups} "
                f"group{'s' if self.groups != 1 else ''}" if self.pooled_sigma is not None
                else "no repeated runs yet")
        if self.source == "prior":
            return f"σ {self.sigma:.4f} (prior until {self.min_df} df; {pool})"
        return f"σ {self.sigma:.4f} ({pool})"


def pooled(groups: Iterable[list[float]]) -> tuple[float | None, int, int]:
    """(pooled σ, df, groups used) over groups of repeated values; σ None if df is 0."""
    ss, df, used = 0.0, 0, 0
    for values in groups:
        vals = [float(v) for v in values if v is not None and math.isfinite(v)]
        if len(vals) < 2:
            continue
        ss += sum_sq_dev(vals)
        df += len(vals) - 1
        used += 1
    return (math.sqrt(ss / df) if df else None), df, used


def estimate(groups: Iterable[list[float]], prior_sigma: float = DEFAULT_PRIOR_SIGMA,
             min_df: int = DEFAULT_MIN_DF,
             paired_groups: Iterable[list[float]] = ()) -> Noise:
    """The class's Noise from its groups of repeated runs and of paired differences."""
    if isinstance(prior_sigma, bool) or not isinstance(prior_sigma, (int, float)) \
            or not prior_sigma > 0:
        raise ValueError(f"prior σ must be > 0 (got {prior_sigma!r})")
    sigma, df, used = pooled(groups)
    psigma, pdf, _ = pooled(paired_groups)
    # A pool of identical numbers (σ = 0) would make every difference infinitely significant;
    # it can only mean a broken measurement, so it never replaces the prior.
    paired = psigma if psigma and pdf >= min_df else None
    if sigma is not None and df >= min_df and sigma > 0:
        return Noise(sigma, df, "pooled", sigma, df, used, float(prior_sigma), int(min_df),
                     paired, pdf)
    return Noise(float(prior_sigma), None, "prior", sigma, df, used, float(prior_sigma),
                 int(min_df), paired, pdf)


# A head run this many σ away from the mean of the head's earlier runs on its class is reported
# as drift (a one-in-370 event for one run under pure noise): the machine or its load changed.
DRIFT_Z = 3.0


@dataclass(frozen=True)
class Drift:
    value: float        # the newest run
    earlier_mean: float
    earlier_n: int
    z: float            # (value - earlier_mean) in units of its standard error

    def describe(self) -> str:
        return (f"newest head run {self.value:.4f} vs the earlier {self.earlier_mean:.4f} "
                f"({self.earlier_n} run{'s' if self.earlier_n != 1 else ''}): {self.z:+.1f}σ")


def drift(values_in_time_order: list[float], sigma: float, z: float = DRIFT_Z) -> Drift | None:
    """The newest head run against the mean of the earlier ones, if beyond ``z`` standard
    errors (σ·√(1 + 1/n)): a re-measured head that moved by more than its noise."""
    vals = [v for v in values_in_time_order if v is not None and math.isfinite(v)]
    if len(vals) < 2 or not sigma > 0:
        return None
    earlier, new = vals[:-1], vals[-1]
    m = mean(earlier)
    score = (new - m) / (sigma * math.sqrt(1.0 + 1.0 / len(earlier)))
    return Drift(new, m, len(earlier), score) if abs(score) > z else None


__all__ = ["Noise", "Drift", "pooled", "estimate", "drift", "DEFAULT_PRIOR_SIGMA",
           "DEFAULT_MIN_DF", "DRIFT_Z"]
