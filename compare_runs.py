"""Compare ``train.py`` runs over several seeds: one model against another, paired by seed.

One seed of each model says little: ``train.py --seed N`` changes the weights, the
validation split, the batch order, the drops and the augmentation. This script pairs
the runs of two groups by seed and reports, for the test error at the best validation
epoch, the final test error and the final training error, the mean difference (second
group minus first, in percentage points) with a Student t 95% interval and the smallest
difference the seeds could detect at 80% power; and the ratio of the median epoch times
(geometric mean with its interval). The statistics are :mod:`run_statistics`'s; neither they nor
this script import torch.

Usage::

    python compare_runs.py --control runs/plain-seed* --treatment runs/sd-seed* [--out comparison.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from atomic_files import write_json_atomically
from run_statistics import paired_difference, paired_ratio

# Settings that may differ between runs of one comparison without changing what is compared.
INCIDENTAL = {"seed", "output_dir", "resume", "progress", "log_every", "device", "torch", "data_dir", "download",
              "eval_batch_size", "world_size", "max_steps", "channels_last"}
# Settings that say which model a run trained: the same within a group, different between groups.
MODEL = {"plain", "p_last", "survival_rule", "dropped_update", "parameters", "drop_schedule", "drop_switch", "drop_path_rate"}
# Settings added to train.py after runs were made, with the value those runs had: a config that lacks one gets it,
# so that a run from before the option compares with one from after (the same as Recipe.from_dict's defaults).
ADDED_LATER = {"drop_schedule": "constant", "drop_switch": 0.25, "model": "resnet", "optimizer": "sgd", "lr_schedule": "step"}
ERRORS = {
    "test error at best val. epoch": lambda run: run["summary"]["test_error_at_best_val"],
    "final test error": lambda run: run["summary"]["final_test_error"],
    "final training error": lambda run: run["epochs"][-1]["train_error"],
}


def load_runs(folders: Sequence[str | Path], group: str) -> dict[int, dict[str, Any]]:
    """The ``metrics.json`` of each folder, by seed; every run finished and alike but for its seed."""
    runs: dict[int, dict[str, Any]] = {}
    for folder in folders:
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            raise ValueError(f"{group}: {path} not found: is {folder} the --output-dir of a finished train.py run?")
        run = json.loads(path.read_text())
        run["config"] = {**ADDED_LATER, **run["config"]}
        if "test_error_at_best_val" not in run["summary"]:
            raise ValueError(f"{group}: {path} has no validation error (trained with --val-size 0?): "
                             "runs to compare need a validation split to pick their best epoch")
        run["folder"] = str(folder)
        seed = run["config"]["seed"]
        if seed in runs:
            raise ValueError(f"{group}: {runs[seed]['folder']} and {folder} both have seed {seed}; give one run per seed")
        runs[seed] = run
    if not runs:
        raise ValueError(f"{group}: no run folders given")
    first = next(iter(runs.values()))
    for run in runs.values():
        differing = sorted(key for key in first["config"].keys() | run["config"].keys()
                           if key not in INCIDENTAL and first["config"].get(key) != run["config"].get(key))
        if differing:
            raise ValueError(f"{group}: {first['folder']} and {run['folder']} differ in {', '.join(differing)}: "
                             "the runs of a group must differ only in their seed")
        if run["summary"]["epochs_done"] != run["config"]["epochs"]:
            raise ValueError(f"{group}: {run['folder']} stopped after {run['summary']['epochs_done']} of "
                             f"{run['config']['epochs']} epochs; resume it (train.py --resume) or leave it out")
    return runs


def compare(control_folders: Sequence[str | Path], treatment_folders: Sequence[str | Path]) -> dict[str, Any]:
    """Paired comparison of two groups of ``train.py`` runs; what :func:`main` prints and writes."""
    control, treatment = load_runs(control_folders, "control"), load_runs(treatment_folders, "treatment")
    if control.keys() != treatment.keys():
        raise ValueError(f"the control runs have seeds {sorted(control)} and the treatment runs {sorted(treatment)}: "
                         "each seed needs one run of each")
    a, b = next(iter(control.values()))["config"], next(iter(treatment.values()))["config"]
    differing = sorted(key for key in a.keys() | b.keys() if key not in INCIDENTAL | MODEL and a.get(key) != b.get(key))
    if differing:
        raise ValueError(f"control and treatment runs differ in {', '.join(differing)}, not only in the model")
    seeds = sorted(control)
    result: dict[str, Any] = {
        "seeds": seeds,
        "control": {key: a.get(key) for key in sorted(MODEL)},
        "treatment": {key: b.get(key) for key in sorted(MODEL)},
        "errors": {},
    }
    for name, error in ERRORS.items():
        first = [100 * error(control[s]) for s in seeds]
        second = [100 * error(treatment[s]) for s in seeds]
        result["errors"][name] = {"control": first, "treatment": second, "difference_points": error_difference(second, first)}
    result["epoch_time_ratio"] = paired_ratio([treatment[s]["summary"]["median_epoch_time_s"] for s in seeds],
                                              [control[s]["summary"]["median_epoch_time_s"] for s in seeds])
    return result


def error_difference(treatment: Sequence[float], control: Sequence[float]) -> dict[str, Any]:
    """``paired_difference`` of error rates (treatment - control, paired by seed), worded for errors.

    ``paired_difference`` calls a positive difference "better"; of an error it is "higher".
    """
    difference = paired_difference(treatment, control)
    difference["verdict"] = {"better": "higher", "worse": "lower"}.get(difference["verdict"], difference["verdict"])
    return difference


def verdict_text(difference: dict[str, Any]) -> str:
    """What a paired difference of errors says, in words: "higher", "lower", or what could have been detected."""
    if difference["n"] < 2:
        return "one seed: no interval, no verdict"
    if difference["verdict"] in ("higher", "lower"):
        return difference["verdict"]
    detectable = difference["min_detectable"]
    return "no difference detectable" + ("" if math.isnan(detectable) else f" (80% power at {detectable:.2f} points)")


def print_comparison(result: dict[str, Any]) -> None:
    print(f"{len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}); control {result['control']}, "
          f"treatment {result['treatment']}")
    print(f"{'':32s} {'control':>9s} {'treatment':>10s} {'difference, points [95% CI]':>30s}  verdict for the treatment")
    for name, values in result["errors"].items():
        d = values["difference_points"]
        print(f"{name:32s} {fmean(values['control']):8.2f}% {fmean(values['treatment']):9.2f}% "
              f"{d['mean']:+9.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]{'':6s}  {verdict_text(d)}")
    ratio = result["epoch_time_ratio"]
    verdict = ratio["verdict"] if ratio["n"] > 1 else "one seed: no interval"
    print(f"{'median epoch time, ratio':32s} {ratio['mean']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]"
          f" ({verdict})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control", nargs="+", required=True, help="output folders of the first model's runs")
    parser.add_argument("--treatment", nargs="+", required=True, help="output folders of the second model's runs")
    parser.add_argument("--out", type=Path, help="also write the comparison here, as JSON")
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    try:
        result = compare(args.control, args.treatment)
    except ValueError as error:
        sys.exit(f"compare_runs.py: {error}")
    print_comparison(result)
    if args.out:
        write_json_atomically(args.out, result, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
