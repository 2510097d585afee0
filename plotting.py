"""Learning curves: smoothed per-iteration values, one model against another.

Curves are smoothed with an exponentially weighted mean of span `window`, the same as
pandas' ``Series.ewm(span=window).mean()``: NaN and infinite values get no weight (the
smoothed curve carries on across them and starts at the first finite value).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

__all__ = ["draw", "draw_runs", "ewm_mean"]


def draw(
    first: Sequence[float],
    first_label: str,
    second: Sequence[float] | None = None,
    second_label: str | None = None,
    window: int = 20,
    type_data: str = "accuracy",
    bound: Sequence[float] | None = None,
    axis: Axes | None = None,
) -> Axes:
    """Draw one or two per-iteration curves, smoothed, with the raw values faint behind.

    Parameters
    ----------
    first, second : sequence of float
        Values per iteration (lists, numpy arrays or CPU tensors); the curves may have
        different lengths. `second` is optional.
    first_label, second_label : str
        Legend entries; `second_label` is required with `second`.
    window : int
        Span of the exponentially weighted mean; 1 draws the values unsmoothed.
    type_data : str
        Label of the y axis, e.g. ``'accuracy'`` or ``'loss'``.
    bound : [xmin, xmax, ymin, ymax], optional
        Axis limits; by default matplotlib's.
    axis : matplotlib Axes, optional
        Where to draw; a new figure by default.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        For an empty curve, one with no finite value, a missing `second_label`, a `window`
        below 1 or a `bound` that is not four numbers.

    Examples
    --------
    >>> draw(history["ResNet"]["test_acc"], "ResNet", history["Stochastic"]["test_acc"], "Stochastic")
    """
    _check_options(window, bound)
    curves = [(first_label, _as_curve(first, first_label))]
    if second is not None:
        if second_label is None:
            raise ValueError("second_label is needed to draw second")
        curves.append((second_label, _as_curve(second, second_label)))

    axis = axis if axis is not None else plt.subplots()[1]
    for label, values in curves:
        iterations = np.arange(1, len(values) + 1)
        (line,) = axis.plot(iterations, ewm_mean(values, window), label=label, linewidth=1.5)
        axis.plot(iterations, values, color=line.get_color(), alpha=0.25, linewidth=0.8, zorder=line.get_zorder() - 1)
    return _finish(axis, type_data, bound)


def draw_runs(
    runs: Mapping[str, Sequence[Sequence[float]]],
    window: int = 20,
    type_data: str = "accuracy",
    bound: Sequence[float] | None = None,
    axis: Axes | None = None,
) -> Axes:
    """Draw several runs (e.g. seeds) of each model as their mean with a ±1 std band.

    Each run is smoothed as in :func:`draw`; the line is the mean of the smoothed runs and the
    shaded band spans one standard deviation (over runs, ``ddof=0``) on either side.

    Parameters
    ----------
    runs : mapping of str to a sequence of runs
        Per model label, its runs: each a sequence of per-iteration values. The runs of one
        model must have the same length; different models may differ.
    window, type_data, bound, axis
        As in :func:`draw`.

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ValueError
        For a model without runs, runs of different lengths, and whatever :func:`draw` rejects.

    Examples
    --------
    >>> draw_runs({"ResNet": [h["ResNet"]["test_acc"] for h in histories],
    ...            "Stochastic": [h["Stochastic"]["test_acc"] for h in histories]})
    """
    _check_options(window, bound)
    curves_by_label = {label: [_as_curve(run, label) for run in model_runs] for label, model_runs in runs.items()}
    for label, curves in curves_by_label.items():
        if not curves:
            raise ValueError(f"{label!r}: no runs to draw")
        lengths = sorted({len(curve) for curve in curves})
        if len(lengths) > 1:
            raise ValueError(f"{label!r}: runs have different lengths {lengths}; cut them to a common length")

    axis = axis if axis is not None else plt.subplots()[1]
    for label, curves in curves_by_label.items():
        smoothed = np.stack([ewm_mean(curve, window) for curve in curves])
        mean, std = smoothed.mean(axis=0), smoothed.std(axis=0)
        iterations = np.arange(1, smoothed.shape[1] + 1)
        (line,) = axis.plot(iterations, mean, label=f"{label} (mean ± 1 std, {len(curves)} runs)", linewidth=1.5)
        axis.fill_between(iterations, mean - std, mean + std, color=line.get_color(), alpha=0.25, linewidth=0)
    return _finish(axis, type_data, bound)


def _as_curve(values: Sequence[float], label: str) -> np.ndarray:
    curve = np.asarray(values, dtype=float)
    if curve.ndim != 1 or curve.size == 0:
        raise ValueError(f"{label!r}: need a non-empty sequence of numbers, got shape {curve.shape}")
    if not np.isfinite(curve).any():
        raise ValueError(f"{label!r}: no finite value to draw")
    return curve


def ewm_mean(values: Sequence[float], span: int) -> np.ndarray:
    """Exponentially weighted mean, the smoothing that `draw` plots.

    Parameters
    ----------
    values : sequence of float
        Values per iteration; NaN and infinite values get no weight.
    span : int
        Weights decay as ``(1 - 2 / (span + 1)) ** age``, as pandas' ``ewm(span=span)``.

    Returns
    -------
    numpy.ndarray
        The smoothed values, NaN until the first finite value.
    """
    values = np.asarray(values, dtype=float)
    decay = 1 - 2 / (span + 1)
    smoothed = np.empty(len(values))
    weighted_sum = total_weight = 0.0
    for i, value in enumerate(values):
        weighted_sum *= decay
        total_weight *= decay
        if np.isfinite(value):
            weighted_sum += value
            total_weight += 1
        smoothed[i] = weighted_sum / total_weight if total_weight else np.nan
    return smoothed


def _check_options(window: int, bound: Sequence[float] | None) -> None:
    # Checked before drawing anything, so that a mistake leaves no half-drawn figure behind.
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if bound is not None and len(bound) != 4:
        raise ValueError(f"bound must be [xmin, xmax, ymin, ymax], got {bound!r}")


def _finish(axis: Axes, type_data: str, bound: Sequence[float] | None) -> Axes:
    axis.set_xlabel("Iteration")
    axis.set_ylabel(type_data)
    if bound is not None:
        axis.axis(list(bound))
    axis.legend()
    return axis
