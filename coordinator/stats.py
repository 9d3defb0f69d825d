"""Small statistics the decision rule needs, with the standard library only.

Student's t CDF through the regularized incomplete beta function, evaluated with its continued
fraction (modified Lentz), and the t quantile by bisection on that CDF. ``df=None`` means
infinitely many degrees of freedom (the normal distribution). Accuracy is ~1e-12, far below
anything a keep/discard decision can feel; tests/test_rule.py checks it against table values.
"""
from __future__ import annotations

import math

_EPS = 1e-15       # relative change at which the continued fraction has converged
_TINY = 1e-300     # keeps Lentz's denominators away from exactly zero
_MAX_TERMS = 500   # the fraction converges in well under 100 terms for the (a, b) used here


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (converges fast for x < (a + 1) / (a + b + 2))."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS + 1):
        # even step: d_{2m} = m (b - m) x / ((a + 2m - 1)(a + 2m))
        num = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + num / c if abs(c) > _TINY else 1.0 + num / _TINY
        h *= d * c
        # odd step: d_{2m+1} = -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + num / c if abs(c) > _TINY else 1.0 + num / _TINY
        step = d * c
        h *= step
        if abs(step - 1.0) < _EPS:
            return h
    return h  # not reached for the arguments this module passes


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc needs a, b > 0 (got {a}, {b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1 (got {x})")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    front = math.exp(log_front)
    # Use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def t_cdf(t: float, df: float | None) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (None: the normal)."""
    if df is None or math.isinf(df):
        return normal_cdf(t)
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0 (got {df})")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float | None) -> float:
    """The t with P(T <= t) = p (bisection on ``t_cdf``; monotone, so it cannot miss)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1 (got {p})")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def sum_sq_dev(values: list[float]) -> float:
    """Sum of squared deviations from the mean (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return sum((v - m) ** 2 for v in values)


def mean_sem(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean of the finite values (sem None with fewer than 2)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None, None
    if len(vals) < 2:
        return mean(vals), None
    return mean(vals), math.sqrt(sum_sq_dev(vals) / (len(vals) - 1) / len(vals))


__all__ = ["betainc", "normal_cdf", "t_cdf", "t_quantile", "mean", "sum_sq_dev", "mean_sem"]
