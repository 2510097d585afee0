"""Where does stochastic depth help? The regime study's evaluation, map and depth curve.

The runs are ``train.py`` runs, one folder each, laid out as
``ROOT/d{depth}-n{train images}/{plain,sd}-seed{seed}/`` (``results/regime-fashion-mnist/run_all.sh``
makes them). This module

- evaluates each finished run again from its checkpoint (:func:`evaluate_run`): the test error
  and the training error of the evaluation network, before and after
  :func:`stochastic_depth.evaluation_network.recompute_batchnorm_statistics`, into ``evaluation.json``; and for the
  deepest networks the depth curve (:func:`depth_curve`): test error and inference time with the
  last ``k`` blocks removed, or ``k`` random blocks, through :func:`stochastic_depth.evaluation_network.keep_blocks`,
  into ``depth_curve.json``;
- computes the map from those files (:func:`regime_map`): per (depth, size) cell the paired
  difference stochastic - plain of the test error with its 95% interval (``compare_runs.compare``,
  whose statistics are :mod:`run_statistics`'s), with and without the re-estimation, the training errors
  beside, the step-time ratio and the smallest difference the seeds could detect;
- draws the map and the depth curve (:func:`plot_map`, :func:`plot_depth_curve`), reading files only.

Usage::

    python regime_study.py evaluate --root results/regime-fashion-mnist [--seed 0]   # needs checkpoints
    python regime_study.py map --root results/regime-fashion-mnist                    # files only
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from statistics import fmean, median, pstdev
from typing import Any

import torch

import compare_runs
import image_data
import train
from atomic_files import write_json_atomically, write_text_atomically
from resnet_with_stochastic_depth import stochastic_depth_state
from run_statistics import holm_adjusted, paired_t_p_value, pairs_to_detect
from stochastic_depth.evaluation_network import keep_blocks, recompute_batchnorm_statistics, residual_blocks

# Training images used to re-estimate BatchNorm statistics and to measure the training error of the
# evaluation network: the first ones of the run's training split (a random subset of it).
STATISTICS_IMAGES = 2048
# The depth curve: test images (the first ones of the test set), random draws per k.
CURVE_TEST_IMAGES = 5000
CURVE_DRAWS = 3
_CELL = re.compile(r"d(\d+)-n(\d+)$")
# The run folders' model names: "plain" and "sd" (stochastic depth throughout) in both maps; "early" and "late"
# (train.py --drop-schedule) in the schedule map (results/schedules-fashion-mnist).
ARMS = ("plain", "sd", "early", "late")
# The training criterion of the schedule map, fixed before its runs: a run trained if its final training error
# (the last epoch's, as training measured it) is at most this many points above the median of its arm's runs in
# its cell. A run that fails it is reported, and kept in the comparisons.
TRAINING_CRITERION_POINTS = 5.0
# The schedule map's bar: the smallest difference in test error (points) each cell should detect at 80% power;
# a cell whose spread puts it out of reach says how many paired seeds would reach it.
DETECTABLE_GOAL_POINTS = 3.0


def load_trained(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    """The model of a finished ``train.py`` run, its config, and its data exactly as it trained.

    Returns ``(model, config, data)`` where ``data`` has ``train``, ``test`` (stored images, resized
    as in training), ``preprocess`` (normalisation as in training, no augmentation) and ``augment``
    (the training run's augmentation too, when called with a generator).
    """
    folder = Path(folder)
    config = json.loads((folder / "metrics.json").read_text())["config"]
    args = argparse.Namespace(**config)
    splits = image_data.load_splits(args.dataset, args.data_dir, val_size=args.val_size, seed=args.seed, download=False)
    if args.train_subset is not None:
        splits.train = image_data.LabelledImages(splits.train.images[: args.train_subset], splits.train.labels[: args.train_subset])
    if args.image_size is not None:
        splits.train, splits.test = (train.resize_split(s, args.image_size) for s in (splits.train, splits.test))
    mean_image, std = image_data.normalisation(splits.train)
    preprocess = image_data.Preprocess(mean_image, std, "none")
    augment = image_data.Preprocess(mean_image, std, args.augmentation)
    model = train.build_model(train.Recipe.from_dict(config), splits.train.images.shape[1], splits.num_classes)
    checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    if checkpoint.get("stochastic_depth") is not None:
        # The gates' drop_scale as training left it: evaluation scales each residual by the survival probability
        # in force (after an early drop schedule, 1), as train.py's own evaluation of the checkpoint did.
        stochastic_depth_state(model).set_state(checkpoint["stochastic_depth"])
    data = argparse.Namespace(train=splits.train, test=splits.test, preprocess=preprocess, augment=augment)
    return model, config, data


def _error(model: torch.nn.Module, split: Any, preprocess: Any, limit: int | None = None) -> tuple[float, float]:
    """(error rate, seconds) of `model` in eval mode on the first `limit` images of `split`.

    The seconds are this process's CPU time (one thread in the study): unlike the wall clock, it
    does not count the time other processes of a shared machine take.
    """
    if limit is not None:
        split = image_data.LabelledImages(split.images[:limit], split.labels[:limit])
    start = time.process_time()
    _, error = train.evaluate(model, split, preprocess, train.Processes(), batch_size=1000)
    return error, time.process_time() - start


def depth_curve(model: torch.nn.Module, test: Any, preprocess: Any, removed: list[int], draws: int, seed: int) -> dict:
    """Test error and inference time with the last ``k`` blocks removed and with ``k`` random ones.

    The blocks of lowest survival probability are the last ones (linear rule); for a plain
    network "last" is taken literally. Times are CPU seconds of one pass over `test` (see :func:`_error`);
    ``"clock": "process"`` in the result says so.
    """
    blocks = len(residual_blocks(model))
    generator = torch.Generator().manual_seed(seed)
    curve: dict[str, Any] = {"blocks": blocks, "test_images": len(test.labels), "clock": "process", "last": [], "random": []}
    for k in removed:
        with keep_blocks(model, range(blocks - k)):
            error, seconds = _error(model, test, preprocess)
        curve["last"].append({"removed": k, "test_error": error, "seconds": seconds})
        if k == 0:
            continue
        for _ in range(draws):
            gone = set(torch.randperm(blocks, generator=generator)[:k].tolist())
            with keep_blocks(model, [i for i in range(blocks) if i not in gone]):
                error, seconds = _error(model, test, preprocess)
            curve["random"].append({"removed": k, "blocks_removed": sorted(gone), "test_error": error, "seconds": seconds})
    return curve


def evaluate_run(folder: str | Path, *, curve: bool = False) -> dict[str, Any]:
    """Write ``evaluation.json`` (and with `curve` ``depth_curve.json``) for one finished run."""
    folder = Path(folder)
    torch.manual_seed(0)
    model, config, data = load_trained(folder)
    # The re-estimation sees training images as training saw them (augmented): what changes is the
    # network (every block, scaled by p_l), not the input distribution.
    generator = torch.Generator().manual_seed(config["seed"])
    stats_images = data.augment(data.train.images[:STATISTICS_IMAGES], generator)
    # The test error as trained is metrics.json's (the checkpoint is the model evaluated there).
    result: dict[str, Any] = {"statistics_images": len(stats_images), "statistics_augmentation": config["augmentation"]}
    result["test_error"] = json.loads((folder / "metrics.json").read_text())["summary"]["final_test_error"]
    result["train_error"], _ = _error(model, data.train, data.preprocess, STATISTICS_IMAGES)
    if curve:
        blocks = len(residual_blocks(model))
        removed = sorted({0, *(round(f * blocks) for f in (0.125, 0.25, 0.375, 0.5))})
        test = image_data.LabelledImages(data.test.images[:CURVE_TEST_IMAGES], data.test.labels[:CURVE_TEST_IMAGES])
        write_json_atomically(folder / "depth_curve.json", depth_curve(model, test, data.preprocess, removed, CURVE_DRAWS, config["seed"]))
    recompute_batchnorm_statistics(model, stats_images)
    result["test_error_bn"], _ = _error(model, data.test, data.preprocess)
    result["train_error_bn"], _ = _error(model, data.train, data.preprocess, STATISTICS_IMAGES)
    write_json_atomically(folder / "evaluation.json", result)
    return result


# ----------------------------------------------------------------------------------
# The map, from files only
# ----------------------------------------------------------------------------------


def cells(root: str | Path) -> dict[tuple[int, int], dict[str, dict[int, Path]]]:
    """``{(depth, train images): {arm: {seed: folder}}}`` of the finished runs, for every arm of :data:`ARMS`."""
    found: dict[tuple[int, int], dict[str, dict[int, Path]]] = {}
    for cell in sorted(Path(root).iterdir()):
        match = _CELL.match(cell.name)
        if not match or not cell.is_dir():
            continue
        groups: dict[str, dict[int, Path]] = {arm: {} for arm in ARMS}
        for run in cell.iterdir():
            model, _, seed = run.name.partition("-seed")
            metrics = run / "metrics.json"
            if model in groups and metrics.is_file():
                summary = json.loads(metrics.read_text())
                if summary["summary"].get("epochs_done") == summary["config"]["epochs"]:
                    groups[model][int(seed)] = run
        found[int(match[1]), int(match[2])] = groups
    return found


def regime_map(root: str | Path) -> list[dict[str, Any]]:
    """One row per (depth, size) cell with runs of both models for at least two common seeds.

    Differences are stochastic - plain in percentage points of error (negative: stochastic
    depth better), paired by seed. ``bn`` columns use the errors after
    ``recompute_batchnorm_statistics`` (``evaluation.json``); ``train`` errors are those of the
    evaluation network on the first 2,048 training images.
    """
    rows = []
    for (depth, size), groups in sorted(cells(root).items()):
        seeds = sorted(groups["plain"].keys() & groups["sd"].keys())
        if len(seeds) < 2:
            continue
        comparison = compare_runs.compare([groups["plain"][s] for s in seeds], [groups["sd"][s] for s in seeds])
        row: dict[str, Any] = {"depth": depth, "train_images": size, "seeds": seeds,
                               "test": comparison["errors"]["final test error"],
                               "step_time_ratio": comparison["epoch_time_ratio"]}  # fmt: skip
        evaluations = {m: [groups[m][s] / "evaluation.json" for s in seeds] for m in ("plain", "sd")}
        if all(p.is_file() for paths in evaluations.values() for p in paths):
            loaded = {m: [json.loads(p.read_text()) for p in paths] for m, paths in evaluations.items()}
            for key in ("test_error_bn", "train_error", "train_error_bn"):
                plain = [100 * e[key] for e in loaded["plain"]]
                sd = [100 * e[key] for e in loaded["sd"]]
                row[key.replace("_error", "")] = {"control": plain, "treatment": sd, "difference_points": compare_runs.error_difference(sd, plain)}
        rows.append(row)
    return rows


def verdict(row: dict[str, Any], key: str = "test") -> str:
    """One line: the cell, the mean errors, the difference with its interval, and what it says."""
    if key not in row:
        return f"ResNet-{row['depth']}, {row['train_images']:,} images: not evaluated yet"
    values = row[key]
    d = values["difference_points"]
    word = {"higher": "higher with stochastic depth", "lower": "lower with stochastic depth"}.get(d["verdict"])
    if word is None:
        word = compare_runs.verdict_text(d)
    return (f"ResNet-{row['depth']}, {row['train_images']:,} images: plain {fmean(values['control']):.2f}%, "
            f"stochastic {fmean(values['treatment']):.2f}%, difference {d['mean']:+.2f} points "
            f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] ({len(row['seeds'])} seeds): {word}")


def map_table(rows: list[dict[str, Any]]) -> str:
    """The map as a Markdown table."""
    def cell(row, key, what="difference"):
        if key not in row:
            return "-"
        d = row[key]["difference_points"]
        if what == "means":
            return f"{fmean(row[key]['control']):.1f} / {fmean(row[key]['treatment']):.1f}"
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"

    lines = [
        "| depth | training images | seeds | test error, plain / SD (%) | SD - plain, points [95% CI] | "
        "detectable (points) | with BN re-estimated: plain / SD (%) | SD - plain [95% CI] | "
        "training error plain / SD (%) | with BN re-estimated | step-time ratio SD / plain |",
        "|---:|---:|---:|---|---|---:|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = row["step_time_ratio"]
        detectable = row["test"]["difference_points"]["min_detectable"]
        lines.append(
            f"| {row['depth']} | {row['train_images']:,} | {len(row['seeds'])} | {cell(row, 'test', 'means')} | "
            f"{cell(row, 'test')} | {detectable:.2f} | {cell(row, 'test_bn', 'means')} | {cell(row, 'test_bn')} | "
            f"{cell(row, 'train', 'means')} | {cell(row, 'train_bn', 'means')} | "
            f"{ratio['mean']:.2f} [{ratio['ci95'][0]:.2f}, {ratio['ci95'][1]:.2f}] |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# The schedule map: plain against sd, early and late, from files only
# ----------------------------------------------------------------------------------


def training_criterion(groups: dict[str, dict[int, Path]], points: float = TRAINING_CRITERION_POINTS) -> list[dict[str, Any]]:
    """Every finished run of a cell against the training criterion: one dict per run.

    A run passes if its final training error (``metrics.json``'s last epoch, in percent) is at most
    `points` above the median of its arm's runs in the cell. Each dict: ``arm``, ``seed``,
    ``train_error``, ``arm_median``, ``passed``.
    """
    checked = []
    for arm, runs in groups.items():
        errors = {seed: 100 * json.loads((folder / "metrics.json").read_text())["epochs"][-1]["train_error"]
                  for seed, folder in sorted(runs.items())}  # fmt: skip
        if not errors:
            continue
        middle = median(errors.values())
        checked += [{"arm": arm, "seed": seed, "train_error": error, "arm_median": middle,
                     "passed": error <= middle + points} for seed, error in errors.items()]  # fmt: skip
    return checked


def schedule_map(root: str | Path, control: str = "plain") -> list[dict[str, Any]]:
    """One row per (cell, arm): the arm against `control`, paired by seed, with Holm's correction per cell.

    For every arm of :data:`ARMS` other than `control` that has finished runs of at least two seeds
    that `control` also has: ``compare_runs.compare`` of the two groups (``errors``: test error at the best
    validation epoch, final test error, final training error, each with the paired difference arm -
    control in points, its 95% interval and the difference detectable at 80% power; ``epoch_time_ratio``),
    the paired t test's ``p_value`` of the final test error and ``p_value_holm``, adjusted over the arms
    of the cell; ``verdict``: "higher" / "lower" (test error with the arm, Holm p < 0.05) or "no
    difference detectable"; ``seeds_for_goal``, the paired seeds that would detect
    :data:`DETECTABLE_GOAL_POINTS` at 80% power with the observed spread of the final test error's
    differences (``run_statistics.pairs_to_detect``; None beyond 1,000); the evaluation network's
    training error (``evaluation.json``, first 2,048 training images, no augmentation) as ``train_eval`` where every run has one; ``criterion``, the
    :func:`training_criterion` of the cell's runs of both groups, and ``failed_runs``.
    """
    rows = []
    for (depth, size), groups in sorted(cells(root).items()):
        criterion = training_criterion(groups)
        cell_rows = []
        for arm in ARMS:
            if arm == control:
                continue
            seeds = sorted(groups[control].keys() & groups[arm].keys())
            if len(seeds) < 2:
                continue
            comparison = compare_runs.compare([groups[control][s] for s in seeds], [groups[arm][s] for s in seeds])
            final = comparison["errors"]["final test error"]
            row: dict[str, Any] = {
                "depth": depth, "train_images": size, "arm": arm, "control": control, "seeds": seeds,
                "errors": comparison["errors"], "epoch_time_ratio": comparison["epoch_time_ratio"],
                "p_value": paired_t_p_value([t - c for t, c in zip(final["treatment"], final["control"])]),
                "criterion": [c for c in criterion if c["arm"] in (arm, control) and c["seed"] in seeds],
            }  # fmt: skip
            row["failed_runs"] = [f"{c['arm']}-seed{c['seed']}" for c in row["criterion"] if not c["passed"]]
            row["seeds_for_goal"] = pairs_to_detect(final["difference_points"]["sd"], DETECTABLE_GOAL_POINTS)
            evaluations = {m: [groups[m][s] / "evaluation.json" for s in seeds] for m in (control, arm)}
            if all(p.is_file() for paths in evaluations.values() for p in paths):
                plain, treated = ([100 * json.loads(p.read_text())["train_error"] for p in evaluations[m]] for m in (control, arm))
                row["train_eval"] = {"control": plain, "treatment": treated,
                                     "difference_points": compare_runs.error_difference(treated, plain)}  # fmt: skip
            cell_rows.append(row)
        for row, adjusted in zip(cell_rows, holm_adjusted([r["p_value"] for r in cell_rows])):
            row["p_value_holm"] = adjusted
            mean = row["errors"]["final test error"]["difference_points"]["mean"]
            row["verdict"] = ("higher" if mean > 0 else "lower") if adjusted < 0.05 else "no difference detectable"
        rows += cell_rows
    return rows


# The schedule map's design: its cells and the runs each needs (results/schedules-fashion-mnist/run_all.sh).
SCHEDULE_CELLS = ((20, 5504), (56, 5504))
SCHEDULE_SEEDS = (0, 1, 2, 3, 4)


def schedule_status(root: str | Path, cells_wanted=SCHEDULE_CELLS, seeds=SCHEDULE_SEEDS) -> dict[str, dict[str, Any]]:
    """Per wanted cell (``"d20-n5504"``): ``finished`` and ``expected`` run counts, ``complete``, ``missing`` runs.

    A cell is complete when every arm of :data:`ARMS` has a finished run for every seed; only complete
    cells get a verdict in the docs and the notebook.
    """
    found = cells(root) if Path(root).is_dir() else {}
    status = {}
    for depth, size in cells_wanted:
        groups = found.get((depth, size), {arm: {} for arm in ARMS})
        missing = [f"{arm}-seed{seed}" for seed in seeds for arm in ARMS if seed not in groups[arm]]
        expected = len(ARMS) * len(seeds)
        status[f"d{depth}-n{size}"] = {"finished": expected - len(missing), "expected": expected,
                                       "complete": not missing, "missing": missing}  # fmt: skip
    return status


ARM_NAMES = {"sd": "stochastic depth throughout", "early": "early stochastic depth", "late": "late stochastic depth"}


def schedule_verdict(row: dict[str, Any]) -> str:
    """One line: the cell, the arm, the mean test errors, the difference with its interval, Holm's p, the verdict;
    the runs failing the training criterion, and the seeds that would detect :data:`DETECTABLE_GOAL_POINTS` if
    the cell cannot."""
    d = row["errors"]["final test error"]
    diff = d["difference_points"]
    if row["verdict"] == "no difference detectable":
        word = compare_runs.verdict_text({**diff, "verdict": row["verdict"]})  # with the detectable size, if defined
    else:
        word = f"test error {row['verdict']} with {row['arm']}"
    notes = f"; runs failing the training criterion: {', '.join(row['failed_runs'])}" if row["failed_runs"] else ""
    if not diff["min_detectable"] <= DETECTABLE_GOAL_POINTS:  # also where it is undefined
        notes += f"; {_seeds(row['seeds_for_goal'])} paired seeds would detect {DETECTABLE_GOAL_POINTS:g} points at this spread"
    return (f"ResNet-{row['depth']}, {row['train_images']:,} images, {ARM_NAMES.get(row['arm'], row['arm'])}: "
            f"plain {fmean(d['control']):.2f}%, {row['arm']} {fmean(d['treatment']):.2f}%, difference "
            f"{diff['mean']:+.2f} points [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}], Holm p = "
            f"{row['p_value_holm']:.3g} ({len(row['seeds'])} seeds): {word}{notes}")


# The published claims the schedule map tests: (who, claim, which cell, arm, the verdict that supports it).
PAPER_CLAIMS = (
    ("Huang et al. 2016", "stochastic depth lowers the test error of deep ResNets", "deepest", "sd", "lower"),
    ("Liu et al. 2023", "standard stochastic depth hurts small models", "shallowest", "sd", "higher"),
    ("Liu et al. 2023", "early stochastic depth helps small models", "shallowest", "early", "lower"),
    ("Liu et al. 2023", "late stochastic depth helps large models that overfit", "deepest", "late", "lower"),
)


def paper_claims(rows: list[dict[str, Any]], cells_designed=SCHEDULE_CELLS) -> list[str]:
    """One line per claim of :data:`PAPER_CLAIMS`, judged on `rows` (:func:`schedule_map`'s, complete cells only).

    "Deepest" and "shallowest" are the depths of the map's design (`cells_designed`), so that a claim
    about deep networks is not judged on a shallow cell while the deep one is pending. A claim holds
    where the cell's verdict is the one it predicts, is contradicted where the verdict is the opposite,
    and is neither where no difference was detectable (the line then gives the size the seeds could
    have detected). A claim whose cell is not in `rows` is left out.
    """
    depths = {"deepest": max(d for d, _ in cells_designed), "shallowest": min(d for d, _ in cells_designed)}
    lines = []
    for who, claim, which, arm, supports in PAPER_CLAIMS:
        row = next((r for r in rows if r["depth"] == depths[which] and r["arm"] == arm), None)
        if row is None:
            continue
        diff = row["errors"]["final test error"]["difference_points"]
        if row["verdict"] == supports:
            word = "holds"
        elif row["verdict"] == "no difference detectable":
            word = f"not shown: no difference detectable (80% power at {_points(diff['min_detectable'])} points)"
        else:
            word = "contradicted"
        lines.append(f"{who}, {claim}: ResNet-{row['depth']}, {row['arm']} - plain {diff['mean']:+.2f} points "
                     f"[{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}] ({len(row['seeds'])} seeds): {word}")
    return lines


def _points(value: float) -> str:
    """`value` with two decimals, or "-" where it is undefined (a detectable size from two seeds)."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def _seeds(count: int | None) -> str:
    """A number of seeds, or "over 1,000" where :func:`pairs_to_detect` found none."""
    return "over 1,000" if count is None else str(count)


def schedule_table(rows: list[dict[str, Any]]) -> str:
    """The schedule map as a Markdown table."""
    def means(values):
        return f"{fmean(values['control']):.2f} / {fmean(values['treatment']):.2f}"

    def interval(values):
        d = values["difference_points"]
        return f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"

    lines = [
        "| depth | arm | seeds | final test error, plain / arm (%) | arm - plain, points [95% CI] | Holm p | "
        f"detectable (points) | seeds to detect {DETECTABLE_GOAL_POINTS:g} points | test error at best val.: arm - plain | training error (last epoch), plain / arm (%) | "
        "evaluation network's training error, plain / arm (%) | runs failing the training criterion | "
        "epoch-time ratio arm / plain |",
        "|---:|---|---:|---|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for row in rows:
        errors, ratio = row["errors"], row["epoch_time_ratio"]
        final = errors["final test error"]
        lines.append(
            f"| {row['depth']} | {row['arm']} | {len(row['seeds'])} | {means(final)} | {interval(final)} | "
            f"{row['p_value_holm']:.3g} | {_points(final['difference_points']['min_detectable'])} | {_seeds(row['seeds_for_goal'])} | "
            f"{interval(errors['test error at best val. epoch'])} | {means(errors['final training error'])} | "
            f"{means(row['train_eval']) if 'train_eval' in row else '-'} | {', '.join(row['failed_runs']) or 'none'} | "
            f"{ratio['mean']:.2f} [{ratio['ci95'][0]:.2f}, {ratio['ci95'][1]:.2f}] |"
        )
    return "\n".join(lines)


def plot_schedule_map(rows: list[dict[str, Any]], path: str | Path | None = None):
    """Per depth, each arm's paired final-test-error difference against plain: mean, 95% interval, seeds."""
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in rows})
    fig, axes = plt.subplots(1, max(len(depths), 1), figsize=(5 * max(len(depths), 1), 4), squeeze=False, sharey=True)
    for ax, depth in zip(axes[0], depths):
        subset = [r for r in rows if r["depth"] == depth]
        for i, row in enumerate(subset):
            final = row["errors"]["final test error"]
            d = final["difference_points"]
            ax.errorbar([i], [d["mean"]], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]], fmt="o",
                        capsize=4, color="C0")  # fmt: skip
            seeds = [t - c for t, c in zip(final["treatment"], final["control"])]
            ax.plot([i + 0.15] * len(seeds), seeds, "x", color="C0", alpha=0.6, markersize=5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(subset)), [r["arm"] for r in subset])
        ax.set_title(f"ResNet-{depth}, {subset[0]['train_images']:,} training images ({len(subset[0]['seeds'])} seeds)")
        ax.set_ylabel("final test error, arm - plain (points)\n< 0: the arm is better")
    fig.suptitle("Drop schedules against the plain ResNet, paired by seed: mean, 95% interval, seeds (x)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_map(rows: list[dict[str, Any]], path: str | Path | None = None):
    """Paired test-error difference per cell with its 95% interval, without and with BN re-estimation."""
    import matplotlib.pyplot as plt

    sizes = sorted({r["train_images"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4), squeeze=False, sharey=True)
    for ax, size in zip(axes[0], sizes):
        subset = [r for r in rows if r["train_images"] == size]
        for offset, key, label, color in ((-0.12, "test", "as trained", "C0"), (0.12, "test_bn", "BatchNorm re-estimated", "C1")):
            points = [(i + offset, r[key]["difference_points"]) for i, r in enumerate(subset) if key in r]
            if not points:
                continue
            x = [p[0] for p in points]
            mean = [p[1]["mean"] for p in points]
            low = [p[1]["mean"] - p[1]["ci95"][0] for p in points]
            high = [p[1]["ci95"][1] - p[1]["mean"] for p in points]
            ax.errorbar(x, mean, yerr=[low, high], fmt="o", capsize=4, color=color, label=label)
            for i, r in enumerate(subset):  # each seed's difference: a diverged run stands out
                if key in r:
                    seeds = [t - c for t, c in zip(r[key]["treatment"], r[key]["control"])]
                    ax.plot([i + 2 * offset] * len(seeds), seeds, "x", color=color, alpha=0.6, markersize=5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(subset)), [f"ResNet-{r['depth']}" for r in subset])
        ax.set_title(f"{size:,} training images")
        ax.set_ylabel("test error, stochastic - plain (points)\n< 0: stochastic depth better")
        ax.legend(fontsize=8)
    fig.suptitle("Stochastic depth (linear, $p_L$ = 0.5) against plain, paired by seed: mean, 95% interval, seeds (x)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def depth_curves(root: str | Path, depth: int, size: int) -> dict[str, list[dict[str, Any]]]:
    """The ``depth_curve.json`` of every run of a cell, per arm of :data:`ARMS`: ``{"plain": [...], "sd": [...], ...}``."""
    groups = cells(root).get((depth, size), {})
    return {m: [json.loads((f / "depth_curve.json").read_text()) for _, f in sorted(groups.get(m, {}).items())
                if (f / "depth_curve.json").is_file()] for m in ARMS}  # fmt: skip


def curve_summary(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per k removed: mean test error (last k and random k, over runs and draws), spread, time ratio to k = 0.

    The time ratio comes from the curves timed in CPU seconds (``"clock": "process"``) where there
    are any: wall-clock times of a shared machine say little.
    """
    timed = [c for c in curves if c.get("clock") == "process"] or curves
    out = []
    for k in sorted({p["removed"] for c in curves for p in c["last"]}):
        last = [p for c in curves for p in c["last"] if p["removed"] == k]
        pairs = [(p, next(q for q in c["last"] if q["removed"] == 0)) for c in timed for p in c["last"] if p["removed"] == k]
        randoms = [p for c in curves for p in c["random"] if p["removed"] == k]
        out.append({
            "removed": k, "kept_fraction": 1 - k / curves[0]["blocks"],
            "last_error": fmean(100 * p["test_error"] for p in last),
            "last_error_spread": pstdev([100 * p["test_error"] for p in last]) if len(last) > 1 else 0.0,
            "random_error": fmean(100 * p["test_error"] for p in randoms) if randoms else fmean(100 * p["test_error"] for p in last),
            "random_error_spread": pstdev([100 * p["test_error"] for p in randoms]) if len(randoms) > 1 else 0.0,
            "time_ratio": fmean(p["seconds"] / f["seconds"] for p, f in pairs),
        })  # fmt: skip
    return out


def plot_depth_curve(curves: dict[str, list[dict[str, Any]]], title: str, path: str | Path | None = None):
    """Test error against the fraction of blocks kept, per arm with curves; inference-time ratio on a second axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    twin = ax.twinx()
    for model, color in zip(ARMS, ("C0", "C3", "C2", "C1")):
        if not curves.get(model):
            continue
        label = ARM_NAMES.get(model, model)
        summary = curve_summary(curves[model])
        x = [s["kept_fraction"] for s in summary]
        ax.plot(x, [s["last_error"] for s in summary], "o-", color=color, label=f"{label}: last blocks removed")
        ax.errorbar(x, [s["random_error"] for s in summary], yerr=[s["random_error_spread"] for s in summary],
                    fmt="s--", color=color, alpha=0.6, capsize=3, label=f"{label}: random blocks removed (± sd)")
        twin.plot(x, [s["time_ratio"] for s in summary], ":", color=color, alpha=0.5)
    twin.set_ylabel("inference time / all blocks (dotted)")
    twin.set_ylim(0, 1.1)
    ax.set_xlabel("fraction of residual blocks kept")
    ax.set_ylabel("test error (%)")
    ax.invert_xaxis()
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: the curves fill the axes
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_schedule_map(root: Path) -> dict[str, Any]:
    """Compute :func:`schedule_map` from `root`'s files, print it, write ``schedule_map.json``, ``.md``, ``.png``."""
    rows = schedule_map(root)
    finished = {f"d{depth}-n{size}": {arm: sorted(runs) for arm, runs in groups.items() if runs}
                for (depth, size), groups in sorted(cells(root).items())}  # fmt: skip
    print(schedule_table(rows))
    print()
    for row in rows:
        print(schedule_verdict(row))
    for cell, arms in finished.items():
        print(f"{cell}: finished runs, seeds per arm: " + "; ".join(f"{arm} {seeds}" for arm, seeds in arms.items()))
    status = schedule_status(root)
    for cell, state in status.items():
        print(f"{cell}: {state['finished']} of {state['expected']} runs finished"
              + ("" if state["complete"] else f"; pending: {', '.join(state['missing'])}"))
    complete = [r for r in rows if status.get(f"d{r['depth']}-n{r['train_images']}", {}).get("complete")]
    claims = paper_claims(complete)
    if claims:
        print("\nThe papers' claims, on the complete cells:")
        print("\n".join(claims))
    result = {"training_criterion_points": TRAINING_CRITERION_POINTS, "status": status, "finished_runs": finished,
              "rows": rows, "paper_claims": claims}  # fmt: skip
    write_json_atomically(root / "schedule_map.json", json.loads(json.dumps(result, default=str)))
    write_text_atomically(root / "schedule_map.md", schedule_table(rows) + "\n")
    if rows:
        plot_schedule_map(rows, root / "schedule_map.png")
    print(f"wrote {root}/schedule_map.json, .md" + (", .png" if rows else " (no cell with two paired seeds to draw)"))
    if rows:  # the deepest cell's test-time depth curve (regime_study.py evaluate writes each run's)
        depth = max(r["depth"] for r in rows)
        size = max(r["train_images"] for r in rows if r["depth"] == depth)
        curves = depth_curves(root, depth, size)
        if any(curves.values()):
            path = root / f"depth_curve_d{depth}-n{size}.png"
            plot_depth_curve(curves, f"ResNet-{depth}, {size:,} training images: blocks removed at test time", path)
            print(f"wrote {path} ({', '.join(f'{m}: {len(c)} runs' for m, c in curves.items() if c)})")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["evaluate", "map", "schedules"],
                        help="'map': the sd-against-plain map (map.json, map.md, map.png); 'schedules': the schedule "
                        "map (schedule_map.json, .md, .png), both from the files in --root only")
    parser.add_argument("--root", type=Path, default=Path("results/regime-fashion-mnist"))
    parser.add_argument("--seed", type=int, help="evaluate: only this seed's runs")
    parser.add_argument("--curve-depth", type=int, default=110, help="evaluate: depth whose runs get a depth curve")
    parser.add_argument("--curve-size", type=int, default=55000, help="evaluate: training-set size of those runs")
    parser.add_argument("--curve-seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluate: seeds of those runs")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        for (depth, size), groups in sorted(cells(args.root).items()):
            for model in ARMS:
                for seed, folder in sorted(groups[model].items()):
                    if args.seed is not None and seed != args.seed:
                        continue
                    curve = (depth, size) == (args.curve_depth, args.curve_size) and seed in args.curve_seeds
                    if (folder / "evaluation.json").is_file() and (not curve or (folder / "depth_curve.json").is_file()):
                        continue
                    if not (folder / "checkpoint.pt").is_file():
                        print(f"{folder}: no checkpoint.pt, cannot evaluate")
                        continue
                    start = time.perf_counter()
                    result = evaluate_run(folder, curve=curve)
                    print(f"{folder}: test error {100 * result['test_error']:.2f}% -> {100 * result['test_error_bn']:.2f}% "
                          f"with BN re-estimated, {time.perf_counter() - start:.0f} s", flush=True)
        return
    if args.command == "schedules":
        write_schedule_map(args.root)
        return
    rows = regime_map(args.root)
    print(map_table(rows))
    print()
    for row in rows:
        print(verdict(row, "test"))
        print("  BN re-estimated: " + verdict(row, "test_bn"))
    serialisable = json.loads(json.dumps(rows, default=str))
    write_json_atomically(args.root / "map.json", serialisable)
    write_text_atomically(args.root / "map.md", map_table(rows) + "\n")
    plot_map(rows, args.root / "map.png")
    depth = max((r["depth"] for r in rows), default=None)
    if depth is not None:
        for size in sorted({r["train_images"] for r in rows}):
            curves = depth_curves(args.root, depth, size)
            if curves["plain"] or curves["sd"]:
                plot_depth_curve(curves, f"ResNet-{depth}, {size:,} training images: blocks removed at test time",
                                 args.root / f"depth_curve_d{depth}-n{size}.png")
    print(f"wrote {args.root}/map.json, map.md, map.png and the depth curves")


if __name__ == "__main__":
    main()
