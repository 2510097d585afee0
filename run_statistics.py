"""Statistics for comparing runs across seeds: t intervals, paired differences and ratios, power.

Everything here works on plain numbers (sequences of floats, one per seed or per iteration) and
imports neither torch nor the models, so tools that only read stored results stay light.

- :func:`mean_interval`: a mean and its Student t confidence interval;
- :func:`paired_difference`, :func:`paired_ratio`: treatment against control, paired by seed;
- :func:`minimum_detectable_difference`: the smallest difference a paired t test finds at 80% power;
  :func:`pairs_to_detect`, the number of pairs that brings it down to a target;
- :func:`paired_t_p_value`, :func:`holm_adjusted`: p-values, adjusted for several comparisons;
- :func:`spread` and :func:`fluctuation`: how much values vary, around their mean and from one
  iteration to the next (:func:`shared_fluctuation`, :func:`own_fluctuation` split the latter
  between two curves measured on the same test batches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

__all__ = [
    "CONFIDENCE",
    "fluctuation",
    "holm_adjusted",
    "mean_interval",
    "minimum_detectable_difference",
    "own_fluctuation",
    "pairs_to_detect",
    "paired_difference",
    "paired_ratio",
    "paired_t_p_value",
    "shared_fluctuation",
    "spread",
]

CONFIDENCE = 0.95


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test finds with the given power.

    Uses the noncentral t distribution with ``n - 1`` degrees of freedom and the observed
    standard deviation `sd` of the ``n`` paired differences; the result is in `sd`'s units.
    NaN with fewer than two pairs, a non-finite `sd`, or too few pairs to reach the power.
    """
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(effect: float) -> float:
        shift = effect / (sd / math.sqrt(n))
        # the chance of rejecting on the wrong side; scipy's noncentral t gives NaN for it far out (it is ~0 there)
        wrong_side = float(np.nan_to_num(stats.nct.cdf(-critical, df, shift), nan=0.0))
        return stats.nct.sf(critical, df, shift) + wrong_side - power

    high = sd
    while shortfall(high) < 0:  # widen the bracket until the power is reached
        high *= 2
        if not math.isfinite(shortfall(high)):
            return float("nan")  # too few seeds: the noncentral t cannot be evaluated that far out
    return float(optimize.brentq(shortfall, 0.0, high))


def pairs_to_detect(sd: float, difference: float, alpha: float = 0.05, power: float = 0.8, most: int = 1000) -> int | None:
    """Fewest pairs whose :func:`minimum_detectable_difference` is at most `difference`.

    `sd` is the standard deviation of the paired differences (a pilot's estimate), `difference` the
    smallest true difference the study should find with `power`, both in the same units. ``None`` if
    `most` pairs are not enough (or `sd` is not finite); 2 if `sd` is 0.
    """
    if not math.isfinite(sd) or difference <= 0:
        return None
    low, high = 2, most  # the detectable difference falls as pairs are added: bisect for the first that reaches it
    if minimum_detectable_difference(sd, high, alpha, power) > difference:
        return None
    while low < high:
        middle = (low + high) // 2
        if minimum_detectable_difference(sd, middle, alpha, power) <= difference:
            high = middle
        else:
            low = middle + 1
    return low


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of `values` and its Student t confidence interval, as ``(mean, low, high)``.

    The t interval fits a few runs whose spread is unknown. When every value is the same the
    interval has zero width; with one value it is undefined (NaN). Raises ValueError when
    `values` is empty.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        raise ValueError("need at least one value")
    mean = float(values.mean())
    if len(values) == 1:
        return mean, float("nan"), float("nan")
    sd = spread(values)
    if sd == 0:
        return mean, mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sd / math.sqrt(len(values)))
    return mean, float(low), float(high)


def paired_difference(treatment: Sequence[float], control: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of ``treatment - control`` over paired runs, with a t confidence interval.

    Each pair is one seed's comparison from identical starting weights and batches; the
    interval is :func:`mean_interval` of the differences.

    Returns
    -------
    dict
        ``mean``, ``ci95`` ([low, high]), ``sd`` (of the differences), ``n``,
        ``min_detectable`` (:func:`minimum_detectable_difference` at 80% power), all in the
        units of the inputs, and ``verdict``: "better" (interval above 0), "worse" (below 0),
        or "no difference" (interval holds 0, or undefined with one pair).
    """
    differences = np.asarray(treatment, dtype=float) - np.asarray(control, dtype=float)
    mean, low, high = mean_interval(differences, confidence)
    n = len(differences)
    sd = spread(differences) if n > 1 else float("nan")
    if low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "no difference"
    return {"mean": mean, "ci95": [low, high], "sd": sd, "n": n,
            "min_detectable": minimum_detectable_difference(sd, n), "verdict": verdict}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Geometric mean of ``numerator / denominator`` over paired runs, with a confidence interval.

    Ratios are averaged on the log scale, where they are symmetric (2x and 0.5x cancel), with
    a t interval there, brought back by exponentiating. Pairs with a non-finite or
    non-positive value are left out (and counted in ``n``'s absence).

    Returns
    -------
    dict
        ``mean`` (geometric), ``ci95`` ([low, high]), ``n`` (pairs used), ``verdict``: "above
        1", "below 1", "no difference from 1", or "undefined" when no pair is usable.
    """
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    usable = np.isfinite(num) & np.isfinite(den) & (num > 0) & (den > 0)
    if not usable.any():
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0, "verdict": "undefined"}
    logs = paired_difference(np.log(num[usable]), np.log(den[usable]), confidence)
    verdict = {"better": "above 1", "worse": "below 1", "no difference": "no difference from 1"}[logs["verdict"]]
    return {"mean": math.exp(logs["mean"]), "ci95": [math.exp(v) for v in logs["ci95"]], "n": logs["n"],
            "verdict": verdict}


def paired_t_p_value(differences: Sequence[float]) -> float:
    """Two-sided p-value of a paired t test that the mean of `differences` is 0.

    Differences that are all equal have no spread to test against: p is 1 when they are all 0,
    else 0. NaN with fewer than two differences.
    """
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2:
        return float("nan")
    if np.all(differences == differences[0]):
        return 1.0 if differences[0] == 0 else 0.0
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for testing several hypotheses at once.

    Comparing several models with one control, one of them reaching p < 0.05 by chance is far
    likelier than 5%. Holm's adjustment keeps the chance of any false "better" or "worse" at 5%
    without assuming the tests are independent. Returns the adjusted values in the input's order.
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation of `values` around their mean (``ddof=1``), in their units.

    Over the iterations of a training curve it also counts the curve's trend; :func:`fluctuation`
    does not. NaN with fewer than two values.
    """
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def fluctuation(values: Sequence[float]) -> float:
    """How much a per-iteration curve jumps from one iteration to the next, in its units.

    The :func:`spread` of successive differences divided by sqrt(2): for independent noise
    around a slowly moving curve it is the noise's standard deviation, and no smoothing (which
    lags behind a rising curve) is needed to find the trend. NaN with fewer than three values.
    """
    return spread(np.diff(np.asarray(values, dtype=float))) / math.sqrt(2)


def shared_fluctuation(first: Sequence[float], second: Sequence[float]) -> float:
    """Covariance of two curves' successive differences / 2: the jumps they make together.

    Two models evaluated on the same test batch share that batch's difficulty; this is the
    variance of that shared part (in the units of :func:`fluctuation` squared). The curves
    must have the same length.
    """
    a, b = np.diff(np.asarray(first, dtype=float)), np.diff(np.asarray(second, dtype=float))
    return float(np.cov(a, b, ddof=1)[0, 1] / 2)


def own_fluctuation(values: Sequence[float], reference: Sequence[float]) -> float:
    """A curve's :func:`fluctuation` without the part it shares with `reference` (NaN if none is left)."""
    own_variance = fluctuation(values) ** 2 - shared_fluctuation(values, reference)
    return math.sqrt(own_variance) if own_variance > 0 else float("nan")
