"""The multi-seed study's verdicts, from its stored results alone (no torch, no models).

:func:`summarize` turns the results of several seeds (the JSON that :func:`study.run_seed`
writes, one per seed) into numbers with 95% confidence intervals across seeds;
:func:`verdict_lines` puts them into words. Everything either needs is in the results: the FLOP
floors were counted when the runs were made (``flop_floors``, see :func:`study.flop_floors`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from run_statistics import (
    fluctuation,
    holm_adjusted,
    own_fluctuation,
    paired_difference,
    paired_ratio,
    paired_t_p_value,
    spread,
)

__all__ = ["PLAIN", "WARM_UP_STEPS", "stochastic_name", "summarize", "verdict_lines"]

PLAIN = "ResNet"
WARM_UP_STEPS = 5  # step times of the first iterations include one-off costs (allocation, kernel choice)


def stochastic_name(p_last: float) -> str:
    """Name of the StochasticResNet with this p_L in a study's histories, e.g. ``"p_L=0.5"``."""
    return f"p_L={p_last:g}"


def _median_step_s(step_times: Sequence[float]) -> float:
    return float(np.median(step_times[min(WARM_UP_STEPS, len(step_times) - 1) :]))


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The study's verdicts, computed from its runs (one result per seed, same settings).

    For each p_L, paired across seeds:

    - ``accuracy_difference``: final whole-test accuracy, stochastic minus plain, in
      percentage points, with ``ci95``, ``verdict`` and ``min_detectable`` (points), and the
      paired t test's ``p_value`` and ``p_value_holm`` (adjusted for the number of p_L values);
    - ``fluctuation``: how much the per-iteration test-batch accuracy jumps
      (:func:`run_statistics.fluctuation`), as the ratio stochastic / plain, raw and without the
      part the two models share because they see the same test batch, in the first and second
      half of the run, and each model's second half / first half;
    - ``test_time``: whole-test accuracy of the p_l-scaled network, of single sampled
      sub-networks (mean and :func:`run_statistics.spread`) and of their average (a Monte-Carlo
      ensemble);
    - ``step_time_ratio``: median training step, stochastic / plain, beside ``flop_floor``.

    Raises ValueError when `results` is empty, mixes settings, or lacks the FLOP floors.
    """
    if not results:
        raise ValueError("no results to summarize")
    settings = results[0]["settings"]
    if any(r["settings"] != settings for r in results):
        raise ValueError("results of different settings cannot be summarized together")
    if "flop_floors" not in results[0]:
        raise ValueError("the results have no flop_floors: load them with study.load_results, after "
                         "study.record_flop_floors(settings, output_dir) for runs stored without them")
    floors = results[0]["flop_floors"]
    p_lasts = [float(p) for p in settings["p_lasts"]]
    subnetwork_count = settings["subnetworks"]
    model_names = [PLAIN] + [stochastic_name(p) for p in p_lasts]
    final = {name: [r["evaluations"]["accuracy"][name][-1] for r in results] for name in model_names}
    acc = {name: [r["history"][name]["test_acc"] for r in results] for name in model_names}
    half = settings["iterations"] // 2
    halves = {"first_half": slice(0, half), "second_half": slice(half, None)}

    comparisons = []
    for p_last in p_lasts:
        name = stochastic_name(p_last)
        accuracy = paired_difference(100 * np.asarray(final[name]), 100 * np.asarray(final[PLAIN]))
        fluct: dict[str, Any] = {}
        per_half: dict[str, dict[str, list[float]]] = {}
        for half_name, part in halves.items():
            stoch = [run[part] for run in acc[name]]
            plain = [run[part] for run in acc[PLAIN]]
            per_half[half_name] = {
                "stochastic": [fluctuation(s) for s in stoch],
                "plain": [fluctuation(p) for p in plain],
                "stochastic_own": [own_fluctuation(s, p) for s, p in zip(stoch, plain)],
                "plain_own": [own_fluctuation(p, s) for s, p in zip(stoch, plain)],
            }
            h = per_half[half_name]
            fluct[half_name] = {
                "stochastic": float(np.mean(h["stochastic"])),
                "plain": float(np.mean(h["plain"])),
                "ratio": paired_ratio(h["stochastic"], h["plain"]),
                "own_ratio": paired_ratio(h["stochastic_own"], h["plain_own"]),
            }
        fluct["second_over_first_half"] = {
            "stochastic": paired_ratio(per_half["second_half"]["stochastic"], per_half["first_half"]["stochastic"]),
            "plain": paired_ratio(per_half["second_half"]["plain"], per_half["first_half"]["plain"]),
        }
        subnetworks = [r["subnetworks"][name] for r in results]
        scaled = [s["scaled_accuracy"] for s in subnetworks]
        ensemble = [s["ensemble_accuracy"] for s in subnetworks]
        test_time = {
            "subnetworks": subnetwork_count,
            "scaled_accuracy": float(np.mean(scaled)),
            "single_subnetwork_accuracy": float(np.mean([np.mean(s["accuracies"]) for s in subnetworks]))
            if subnetwork_count else float("nan"),
            "single_subnetwork_sd": float(np.mean([spread(s["accuracies"]) for s in subnetworks]))
            if subnetwork_count > 1 else float("nan"),
            "single_subnetwork_range": [float(min(min(s["accuracies"]) for s in subnetworks)),
                                        float(max(max(s["accuracies"]) for s in subnetworks))]
            if subnetwork_count else [float("nan"), float("nan")],
            "ensemble_accuracy": float(np.mean(ensemble)),
            "ensemble_minus_scaled": paired_difference(100 * np.asarray(ensemble), 100 * np.asarray(scaled)),
        }
        step_ratio = paired_ratio([_median_step_s(r["history"][name]["step_time"]) for r in results],
                                  [_median_step_s(r["history"][PLAIN]["step_time"]) for r in results])
        comparisons.append({
            "p_last": p_last,
            "seeds": len(results),
            "accuracy_difference": accuracy["mean"],
            "ci95": accuracy["ci95"],
            "verdict": accuracy["verdict"],
            "min_detectable_difference": accuracy["min_detectable"],
            "sd_of_differences": accuracy["sd"],
            "per_seed_differences": [100 * (s - p) for s, p in zip(final[name], final[PLAIN])],
            "plain_accuracy": float(np.mean(final[PLAIN])),
            "stochastic_accuracy": float(np.mean(final[name])),
            "fluctuation": fluct,
            "test_time": test_time,
            "step_time_ratio": step_ratio,
            "flop_floor": floors[name],
        })
    p_values = [paired_t_p_value(c["per_seed_differences"]) for c in comparisons]
    for c, p_value, adjusted in zip(comparisons, p_values, holm_adjusted(p_values)):
        c["p_value"] = p_value
        c["p_value_holm"] = adjusted
    devices = sorted({f"{r['device_name']} ({r['device']}, torch {r['torch']})" for r in results})
    return {
        "settings": {**settings, "p_lasts": p_lasts},
        "seeds": [r["seed"] for r in results],
        "devices": devices,
        "job_wall_time_s": float(sum(r["wall_s"] for r in results)),
        "study_wall_time_s": float(max(r["finished_at"] for r in results) - min(r["started_at"] for r in results)),
        "plain_median_step_ms": float(np.mean([1000 * _median_step_s(r["history"][PLAIN]["step_time"]) for r in results])),
        "comparisons": comparisons,
    }


def _interval(ci: Sequence[float], fmt: str) -> str:
    return f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def verdict_lines(summary: dict[str, Any]) -> dict[str, list[str]]:
    """The study's verdicts in words, one line per p_L, computed from :func:`summarize`'s output.

    Returns
    -------
    dict
        ``accuracy``, ``fluctuation``, ``test_time`` and ``speed``: lists of lines.
    """
    lines: dict[str, list[str]] = {"accuracy": [], "fluctuation": [], "test_time": [], "speed": []}
    for c in summary["comparisons"]:
        p, n = f"p_L={c['p_last']:g}", c["seeds"]
        if c["sd_of_differences"] == 0:
            verdict = "no difference: the two networks ended identical in every seed"
        elif c["verdict"] == "no difference" and math.isfinite(c["min_detectable_difference"]):
            verdict = (f"no difference detectable with {n} seeds (a true difference of "
                       f"{c['min_detectable_difference']:.2f} points would be detected 80% of the time)")
        elif c["verdict"] == "no difference":
            verdict = f"no difference detectable with {n} seeds, too few to say how small a difference could be"
        else:
            verdict = f"stochastic depth is {c['verdict']}"
        if len(summary["comparisons"]) > 1 and c["verdict"] != "no difference":
            holds = "holds" if c["p_value_holm"] < 0.05 else "does not hold"
            verdict += (f" (paired t test p = {c['p_value']:.3f}; after Holm's correction for "
                        f"{len(summary['comparisons'])} values of p_L, p = {c['p_value_holm']:.3f}: it {holds})")
        lines["accuracy"].append(
            f"{p}: final whole-test accuracy {100 * c['stochastic_accuracy']:.2f}% vs {100 * c['plain_accuracy']:.2f}%, "
            f"difference {c['accuracy_difference']:+.2f} points, 95% CI {_interval(c['ci95'], '+.2f')}: {verdict}"
        )

        f, change = c["fluctuation"], c["fluctuation"]["second_over_first_half"]
        raw, own = f["second_half"]["ratio"], f["second_half"]["own_ratio"]
        own_text = (f"{own['mean']:.2f}x {_interval(own['ci95'], '.2f')}" if own["n"] else "undefined (nothing left)")
        lines["fluctuation"].append(
            f"{p}: in the second half its test-batch accuracy jumps {raw['mean']:.2f}x as much as the plain "
            f"ResNet's {_interval(raw['ci95'], '.2f')} ({raw['verdict']}); without the noise the two share "
            f"through the same test batch: {own_text}. Second half / first half: "
            f"{change['stochastic']['mean']:.2f}x {_interval(change['stochastic']['ci95'], '.2f')} "
            f"(plain: {change['plain']['mean']:.2f}x {_interval(change['plain']['ci95'], '.2f')})"
        )

        t = c["test_time"]
        if t["subnetworks"]:
            gain = t["ensemble_minus_scaled"]
            lines["test_time"].append(
                f"{p}: p_l-scaled network {100 * t['scaled_accuracy']:.2f}%; single sampled sub-networks "
                f"{100 * t['single_subnetwork_accuracy']:.2f}% on average, spread (sd) {100 * t['single_subnetwork_sd']:.2f} "
                f"points, from {100 * t['single_subnetwork_range'][0]:.2f}% to {100 * t['single_subnetwork_range'][1]:.2f}%; "
                f"average of {t['subnetworks']}: {100 * t['ensemble_accuracy']:.2f}% "
                f"({gain['mean']:+.2f} points vs scaled, 95% CI {_interval(gain['ci95'], '+.2f')})"
            )

        s = c["step_time_ratio"]
        lines["speed"].append(
            f"{p}: median training step {s['mean']:.3f}x the plain one, 95% CI {_interval(s['ci95'], '.3f')} "
            f"({abs(1 - s['mean']):.0%} {'shorter' if s['mean'] <= 1 else 'longer'}); FLOP floor {c['flop_floor']:.3f}x"
        )
    return lines
