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
- draws the map and the depth curve (:func:`plot_map`, :func:`plot_depth_curve`), reading files only;
- the schedule map (:func:`schedule_map`, :func:`write_schedule_map`): plain against stochastic depth
  throughout (``sd``), ``early`` and ``late``, per cell, with the published claims it tests
  (:func:`paper_claims`), for the ResNets of ``results/schedules-fashion-mnist`` and for the ViT cell of
  ``results/vit-fashion-mnist`` (:data:`SCHEDULE_DESIGNS`: the cells and seeds each was designed with, and
  its claims). The ViT's claims depend on whether its plain runs underfit or overfit (:func:`fit_regime`).

Usage::

    python regime_study.py evaluate --root results/regime-fashion-mnist [--seed 0]   # needs checkpoints
    python regime_study.py map --root results/regime-fashion-mnist                    # files only
    python regime_study.py schedules --root results/schedules-fashion-mnist           # files only
    python regime_study.py vit --root results/vit-fashion-mnist                       # the ViT cell, all of it

``vit`` first evaluates every finished ViT run that has no ``evaluation.json`` yet from its
``checkpoint.pt`` (the evaluation network's training error; no BatchNorm to re-estimate) and writes the
depth curve (``depth_curve.json``) of every plain and ``sd`` run, then makes the schedule map of the root
(``schedule_map.json``, ``.md``, ``.png``, ``depth_curve_vit.png``) from the files, as ``schedules``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, median, pstdev
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import compare_runs
import image_data
import train
from atomic_files import write_json_atomically, write_text_atomically
from resnet_with_stochastic_depth import add_stochastic_depth, stochastic_depth_gates, stochastic_depth_state
from run_statistics import holm_adjusted, paired_t_p_value, pairs_to_detect
from stochastic_depth.evaluation_network import depth_units, keep_blocks, recompute_batchnorm_statistics

# Training images used to re-estimate BatchNorm statistics and to measure the training error of the
# evaluation network: the first ones of the run's training split (a random subset of it).
STATISTICS_IMAGES = 2048
# The depth curve: test images (the first ones of the test set), random draws per k.
CURVE_TEST_IMAGES = 5000
CURVE_DRAWS = 3
# A ViT's depth curve (:func:`curve_plan`): every k of its blocks removed from the end, and every other block,
# each configuration timed this many times (its time: the median).
VIT_CURVE_REPEATS = 3
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

    Returns ``(model, config, data)`` where ``model`` is in training mode as built (a plain ViT with gates
    that never drop, see below), ``data`` has ``train``, ``test`` (stored images, resized
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
    if config.get("model") == "vit" and not stochastic_depth_gates(model):
        # train.py leaves the plain ViT unconverted (timm's blocks, no gates), which keep_blocks cannot number:
        # gates that never drop (p_l = 1) make it countable and leave its evaluation output unchanged, bit for bit.
        add_stochastic_depth(model, p_last=1.0)
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


def _timed_error(model: torch.nn.Module, split: Any, preprocess: Any, repeats: int) -> tuple[float, float]:
    """(error rate, seconds) as :func:`_error`, the seconds the median of `repeats` passes (the error is the same)."""
    passes = [_error(model, split, preprocess) for _ in range(repeats)]
    return passes[0][0], median(seconds for _, seconds in passes)


def depth_curve(model: torch.nn.Module, test: Any, preprocess: Any, removed: list[int], draws: int, seed: int, *,
                patterns: dict[str, list[int]] | None = None, repeats: int = 1) -> dict:
    """Test error and inference time with the last ``k`` blocks removed and with ``k`` random ones.

    The blocks of lowest survival probability are the last ones (linear rule, timm's rule); for a plain
    network "last" is taken literally. A block is what :func:`keep_blocks` numbers (``by="block"``): a
    transformer layer is one, both its branches. `patterns` name further sets of blocks to keep (a ViT's
    every other block: ``{"even": [0, 2, ...], "odd": [1, 3, ...]}``), each measured once (``"patterns"`` in
    the result: ``name``, ``kept``, ``removed``, ``test_error``, ``seconds``). Times are CPU seconds of one
    pass over `test` (see :func:`_error`), the median of `repeats` passes; ``"clock": "process"`` and
    ``"repeats"`` in the result say so.
    """
    blocks = len(depth_units(model))
    generator = torch.Generator().manual_seed(seed)
    curve: dict[str, Any] = {"blocks": blocks, "test_images": len(test.labels), "clock": "process", "repeats": repeats,
                             "last": [], "random": [], "patterns": []}  # fmt: skip
    for k in removed:
        with keep_blocks(model, range(blocks - k)):
            error, seconds = _timed_error(model, test, preprocess, repeats)
        curve["last"].append({"removed": k, "test_error": error, "seconds": seconds})
        if k == 0:
            continue
        for _ in range(draws):
            gone = set(torch.randperm(blocks, generator=generator)[:k].tolist())
            with keep_blocks(model, [i for i in range(blocks) if i not in gone]):
                error, seconds = _timed_error(model, test, preprocess, repeats)
            curve["random"].append({"removed": k, "blocks_removed": sorted(gone), "test_error": error, "seconds": seconds})
    for name, kept in (patterns or {}).items():
        with keep_blocks(model, kept):
            error, seconds = _timed_error(model, test, preprocess, repeats)
        curve["patterns"].append({"name": name, "kept": sorted(kept), "removed": blocks - len(set(kept)),
                                  "test_error": error, "seconds": seconds})  # fmt: skip
    return curve


def curve_plan(config: dict[str, Any], blocks: int) -> dict[str, Any]:
    """What :func:`depth_curve` measures for a run of `config` with `blocks` blocks (its keyword arguments but the data).

    A ResNet (the regime and schedule maps): 0 and 1/8, 1/4, 3/8, 1/2 of its blocks removed from the end, and
    as many random blocks, :data:`CURVE_DRAWS` draws each, one timed pass. A ViT: every ``k`` from 0 to
    ``blocks - 1`` removed from the end, every other block kept (``"even"``: 0, 2, ...; ``"odd"``: 1, 3, ...),
    no random draws, each timed :data:`VIT_CURVE_REPEATS` times.
    """
    if config.get("model") == "vit":
        return {"removed": list(range(blocks)), "draws": 0, "repeats": VIT_CURVE_REPEATS,
                "patterns": {"even": list(range(0, blocks, 2)), "odd": list(range(1, blocks, 2))}}  # fmt: skip
    removed = sorted({0, *(round(f * blocks) for f in (0.125, 0.25, 0.375, 0.5))})
    return {"removed": removed, "draws": CURVE_DRAWS, "repeats": 1, "patterns": {}}


def evaluate_run(folder: str | Path, *, curve: bool = False) -> dict[str, Any]:
    """Write ``evaluation.json`` (and with `curve` ``depth_curve.json``, :func:`curve_plan`'s) for one finished run.

    ``evaluation.json``: the test error as trained (``metrics.json``'s final one: the checkpoint is the model
    evaluated there) and the evaluation network's training error on the first :data:`STATISTICS_IMAGES`
    training images (no augmentation); for a network with BatchNorm layers (the ResNets) also both after
    re-estimating its statistics (``test_error_bn``, ``train_error_bn``). A network without (a ViT) has none
    to re-estimate: ``"batchnorm": false`` and no ``_bn`` errors.
    """
    folder = Path(folder)
    torch.manual_seed(0)
    model, config, data = load_trained(folder)
    batchnorm = any(isinstance(m, _BatchNorm) for m in model.modules())
    result: dict[str, Any] = {"batchnorm": batchnorm}
    result["test_error"] = json.loads((folder / "metrics.json").read_text())["summary"]["final_test_error"]
    result["train_error"], _ = _error(model, data.train, data.preprocess, STATISTICS_IMAGES)
    if curve:
        test = image_data.LabelledImages(data.test.images[:CURVE_TEST_IMAGES], data.test.labels[:CURVE_TEST_IMAGES])
        plan = curve_plan(config, len(depth_units(model)))
        write_json_atomically(folder / "depth_curve.json", depth_curve(model, test, data.preprocess, seed=config["seed"], **plan))
    if batchnorm:
        # The re-estimation sees training images as training saw them (augmented): what changes is the
        # network (every block, scaled by p_l), not the input distribution.
        generator = torch.Generator().manual_seed(config["seed"])
        stats_images = data.augment(data.train.images[:STATISTICS_IMAGES], generator)
        result.update(statistics_images=len(stats_images), statistics_augmentation=config["augmentation"])
        recompute_batchnorm_statistics(model, stats_images)
        result["test_error_bn"], _ = _error(model, data.test, data.preprocess)
        result["train_error_bn"], _ = _error(model, data.train, data.preprocess, STATISTICS_IMAGES)
    write_json_atomically(folder / "evaluation.json", result)
    return result


def evaluate_runs(root: str | Path, *, curve_cells, curve_seeds, curve_arms=ARMS, seed: int | None = None) -> None:
    """:func:`evaluate_run` for every finished run of `root` without ``evaluation.json`` (or a depth curve it needs).

    A run gets a depth curve when its cell is in `curve_cells` (``(depth, size)`` pairs), its seed in
    `curve_seeds` and its arm in `curve_arms`; with `seed`, only that seed's runs. A run without its
    ``checkpoint.pt`` is named and left out. Prints one line per run evaluated.
    """
    for (depth, size), groups in sorted(cells(root).items()):
        for model in ARMS:
            for run_seed, folder in sorted(groups[model].items()):
                if seed is not None and run_seed != seed:
                    continue
                curve = (depth, size) in curve_cells and run_seed in curve_seeds and model in curve_arms
                if (folder / "evaluation.json").is_file() and (not curve or (folder / "depth_curve.json").is_file()):
                    continue
                if not (folder / "checkpoint.pt").is_file():
                    print(f"{folder}: no checkpoint.pt, cannot evaluate")
                    continue
                start = time.perf_counter()
                result = evaluate_run(folder, curve=curve)
                after = (f" -> {100 * result['test_error_bn']:.2f}% with BN re-estimated" if result["batchnorm"]
                         else f", evaluation network's training error {100 * result['train_error']:.2f}%")
                print(f"{folder}: test error {100 * result['test_error']:.2f}%{after}"
                      f"{', depth curve' if curve else ''}, {time.perf_counter() - start:.0f} s", flush=True)


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


def network_name(config: dict[str, Any]) -> str:
    """What a run's ``metrics.json`` config trained, in words: "ResNet-20", "ViT-12 (width 64)"."""
    if config.get("model", "resnet") == "vit":
        return f"ViT-{config['vit_layers']} (width {config['vit_width']})"
    return f"ResNet-{config['depth']}"


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())["config"]


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
    that `control` also has: ``model`` ("resnet" or "vit") and ``network`` (:func:`network_name`) of the
    runs; ``compare_runs.compare`` of the two groups (``errors``: test error at the best
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
            config = _config(groups[control][seeds[0]])
            row: dict[str, Any] = {
                "depth": depth, "train_images": size, "arm": arm, "control": control, "seeds": seeds,
                "model": config.get("model", "resnet"), "network": network_name(config),
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
# The transformer cell's (results/vit-fashion-mnist/run_all.sh): a ViT of 12 blocks on 5,504 images, the same seeds;
# the depth curve for its plain and sd runs.
VIT_CELLS = ((12, 5504),)
VIT_CURVE_ARMS = ("plain", "sd")
# Liu et al. 2023's two regimes, as this study tells them apart, fixed before the ViT cell's runs finished: a network
# overfits where most of its final test error is generalisation gap, that is, where its plain runs' mean final
# training error (metrics.json's last epoch, as training measured it) is below this fraction of their mean final
# test error; otherwise it underfits (it fits its training images about as badly as it predicts new ones).
OVERFIT_TRAIN_TEST_RATIO = 0.5


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


def fit_regime(groups: dict[str, dict[int, Path]], control: str = "plain") -> dict[str, Any] | None:
    """Whether a cell's `control` (plain) runs underfit or overfit; None without a finished one.

    Returns ``network``, ``seeds``, ``train_error`` and ``test_error`` (each run's final ones, percent: the last
    epoch's training error as training measured it, ``summary.final_test_error``), ``gap_points`` (the paired
    difference test - training error over the runs, ``compare_runs.error_difference``), ``regime``:
    "overfits" where the mean training error is below :data:`OVERFIT_TRAIN_TEST_RATIO` times the mean test
    error, else "underfits".
    """
    runs = groups.get(control, {})
    if not runs:
        return None
    metrics = [json.loads((folder / "metrics.json").read_text()) for _, folder in sorted(runs.items())]
    train_errors = [100 * m["epochs"][-1]["train_error"] for m in metrics]
    test_errors = [100 * m["summary"]["final_test_error"] for m in metrics]
    overfits = fmean(train_errors) < OVERFIT_TRAIN_TEST_RATIO * fmean(test_errors)
    return {"network": network_name(metrics[0]["config"]), "seeds": sorted(runs), "train_error": train_errors,
            "test_error": test_errors, "gap_points": compare_runs.error_difference(test_errors, train_errors),
            "regime": "overfits" if overfits else "underfits"}  # fmt: skip


def cell_fits(root: str | Path) -> dict[str, dict[str, Any]]:
    """:func:`fit_regime` of every cell of `root` with a finished plain run: ``{"d12-n5504": fit, ...}``."""
    found = cells(root) if Path(root).is_dir() else {}
    return {f"d{depth}-n{size}": fit for (depth, size), groups in sorted(found.items()) if (fit := fit_regime(groups))}


def fit_line(cell: str, fit: dict[str, Any]) -> str:
    """:func:`fit_regime`'s answer in one line, with its numbers and its rule."""
    gap = fit["gap_points"]
    interval = "" if gap["n"] < 2 else f" [{gap['ci95'][0]:+.2f}, {gap['ci95'][1]:+.2f}]"
    return (f"{fit['network']}, {cell}: the plain network {fit['regime']}: final training error "
            f"{fmean(fit['train_error']):.2f}%, final test error {fmean(fit['test_error']):.2f}%, gap "
            f"{gap['mean']:+.2f} points{interval} ({_count(len(fit['seeds']), 'seed')}; it overfits where the training error "
            f"is below {OVERFIT_TRAIN_TEST_RATIO:g} times the test error)")


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
    return (f"{row['network']}, {row['train_images']:,} images, {ARM_NAMES.get(row['arm'], row['arm'])}: "
            f"plain {fmean(d['control']):.2f}%, {row['arm']} {fmean(d['treatment']):.2f}%, difference "
            f"{diff['mean']:+.2f} points [{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}], Holm p = "
            f"{row['p_value_holm']:.3g} ({len(row['seeds'])} seeds): {word}{notes}")


# The published claims the schedule map tests: (who, claim, which cell, arm, the verdict that supports it). The
# ResNets' cells are chosen by depth, the deepest and the shallowest of the map's design.
PAPER_CLAIMS = (
    ("Huang et al. 2016", "stochastic depth lowers the test error of deep ResNets", "deepest", "sd", "lower"),
    ("Liu et al. 2023", "standard stochastic depth hurts small models", "shallowest", "sd", "higher"),
    ("Liu et al. 2023", "early stochastic depth helps small models", "shallowest", "early", "lower"),
    ("Liu et al. 2023", "late stochastic depth helps large models that overfit", "deepest", "late", "lower"),
)
# The ViT cell's: each claim about the regime it names (:func:`fit_regime`), judged on every cell, applying to the
# cells in that regime (DeiT-Tiny-sized ViTs underfit ImageNet in Liu et al.; larger ones overfit it).
VIT_CLAIMS = (
    ("Liu et al. 2023", "standard stochastic depth hurts a small ViT that underfits", "underfits", "sd", "higher"),
    ("Liu et al. 2023", "early stochastic depth helps a small ViT that underfits", "underfits", "early", "lower"),
    ("Liu et al. 2023", "late stochastic depth helps models that overfit", "overfits", "late", "lower"),
)


def paper_claims(rows: list[dict[str, Any]], cells_designed=SCHEDULE_CELLS, claims=PAPER_CLAIMS,
                 fits: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """One line per claim of `claims` and cell, judged on `rows` (:func:`schedule_map`'s, complete cells only).

    A claim's cell is "deepest" or "shallowest", the depths of the map's design (`cells_designed`), so that
    a claim about deep networks is not judged on a shallow cell while the deep one is pending; or it names
    a regime ("underfits", "overfits"): then every cell of `rows` with :func:`fit_regime`'s answer in
    `fits` (``{"d12-n5504": fit}``) is judged, and the claim applies to the cells in that regime only (in
    the others the line says so, with the training and test errors, and gives the verdict for the record).
    A claim holds where the cell's verdict is the one it predicts, is contradicted where the verdict is the
    opposite, and is neither where no difference was detectable (the line then gives the size the seeds could
    have detected). A claim whose cell is not in `rows` is left out.
    """
    depths = {"deepest": max(d for d, _ in cells_designed), "shallowest": min(d for d, _ in cells_designed)}
    lines = []
    for who, claim, which, arm, supports in claims:
        if which in depths:
            row = next((r for r in rows if r["depth"] == depths[which] and r["arm"] == arm), None)
            judged = [] if row is None else [(row, None)]
        else:
            judged = [(r, fit) for r in rows if r["arm"] == arm
                      and (fit := (fits or {}).get(f"d{r['depth']}-n{r['train_images']}")) is not None]  # fmt: skip
        for row, fit in judged:
            diff = row["errors"]["final test error"]["difference_points"]
            undetected = f"no difference detectable (80% power at {_points(diff['min_detectable'])} points)"
            if row["verdict"] == supports:
                word = "holds"
            elif row["verdict"] == "no difference detectable":
                word = f"not shown: {undetected}"
            else:
                word = "contradicted"
            if fit is not None and fit["regime"] != which:
                measured = undetected if row["verdict"] == "no difference detectable" else f"test error {row['verdict']}"
                word = (f"does not apply: the plain network {fit['regime']} (final training error "
                        f"{fmean(fit['train_error']):.2f}%, test error {fmean(fit['test_error']):.2f}%); measured: {measured}")
            lines.append(f"{who}, {claim}: {row['network']}, {row['arm']} - plain {diff['mean']:+.2f} points "
                         f"[{diff['ci95'][0]:+.2f}, {diff['ci95'][1]:+.2f}] ({len(row['seeds'])} seeds): {word}")
    return lines


@dataclass(frozen=True)
class ScheduleDesign:
    """What a schedule map was designed with: the cells and seeds its ``run_all.sh`` trains, the claims it
    tests (:func:`paper_claims`), and the name of its depth-curve figure (``{depth}``, ``{size}`` filled in)."""

    cells: tuple[tuple[int, int], ...]
    seeds: tuple[int, ...]
    claims: tuple[tuple[str, str, str, str, str], ...]
    curve_figure: str


# Per network (the runs' config "model"): the ResNet map of results/schedules-fashion-mnist, the ViT cell of
# results/vit-fashion-mnist.
SCHEDULE_DESIGNS = {
    "resnet": ScheduleDesign(SCHEDULE_CELLS, SCHEDULE_SEEDS, PAPER_CLAIMS, "depth_curve_d{depth}-n{size}.png"),
    "vit": ScheduleDesign(VIT_CELLS, SCHEDULE_SEEDS, VIT_CLAIMS, "depth_curve_vit.png"),
}


def runs_model(root: str | Path) -> str | None:
    """The network the finished runs of `root` trained ("resnet", "vit"; None without one); mixed ones are an error."""
    models = {_config(folder).get("model", "resnet") for groups in cells(root).values() for runs in groups.values()
              for folder in runs.values()}  # fmt: skip
    if len(models) > 1:
        raise ValueError(f"{root} holds runs of {' and '.join(sorted(models))}: a schedule map is of one network")
    return models.pop() if models else None


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


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
        "| network | arm | seeds | final test error, plain / arm (%) | arm - plain, points [95% CI] | Holm p | "
        f"detectable (points) | seeds to detect {DETECTABLE_GOAL_POINTS:g} points | test error at best val.: arm - plain | training error (last epoch), plain / arm (%) | "
        "evaluation network's training error, plain / arm (%) | runs failing the training criterion | "
        "epoch-time ratio arm / plain |",
        "|---:|---|---:|---|---|---:|---:|---:|---|---|---|---|---|",
    ]
    for row in rows:
        errors, ratio = row["errors"], row["epoch_time_ratio"]
        final = errors["final test error"]
        lines.append(
            f"| {row['network']} | {row['arm']} | {len(row['seeds'])} | {means(final)} | {interval(final)} | "
            f"{row['p_value_holm']:.3g} | {_points(final['difference_points']['min_detectable'])} | {_seeds(row['seeds_for_goal'])} | "
            f"{interval(errors['test error at best val. epoch'])} | {means(errors['final training error'])} | "
            f"{means(row['train_eval']) if 'train_eval' in row else '-'} | {', '.join(row['failed_runs']) or 'none'} | "
            f"{ratio['mean']:.2f} [{ratio['ci95'][0]:.2f}, {ratio['ci95'][1]:.2f}] |"
        )
    return "\n".join(lines)


def plot_schedule_map(rows: list[dict[str, Any]], path: str | Path | None = None):
    """Per cell, each arm's paired final-test-error difference against plain: mean, 95% interval, seeds."""
    import matplotlib.pyplot as plt

    keys = sorted({(r["depth"], r["train_images"]) for r in rows})
    width = max(5 * len(keys), 8)  # a single cell's panel wide enough for the title
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(width, 4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys):
        subset = [r for r in rows if (r["depth"], r["train_images"]) == key]
        for i, row in enumerate(subset):
            final = row["errors"]["final test error"]
            d = final["difference_points"]
            ax.errorbar([i], [d["mean"]], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]], fmt="o",
                        capsize=4, color="C0")  # fmt: skip
            seeds = [t - c for t, c in zip(final["treatment"], final["control"])]
            ax.plot([i + 0.15] * len(seeds), seeds, "x", color="C0", alpha=0.6, markersize=5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(subset)), [r["arm"] for r in subset])
        ax.set_title(f"{subset[0]['network']}, {subset[0]['train_images']:,} training images ({len(subset[0]['seeds'])} seeds)")
        ax.set_ylabel("final test error, arm - plain (points)\n< 0: the arm is better")
    kind = "ViT" if {r["model"] for r in rows} == {"vit"} else "ResNet"
    fig.suptitle(f"Drop schedules against the plain {kind}, paired by seed: mean, 95% interval, seeds (x)", fontsize=11)
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


def _timed_curves(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The curves timed in CPU seconds (``"clock": "process"``) where there are any: wall-clock times of a shared
    machine say little."""
    return [c for c in curves if c.get("clock") == "process"] or curves


def _all_blocks(curve: dict[str, Any]) -> dict[str, Any]:
    return next(q for q in curve["last"] if q["removed"] == 0)


def curve_summary(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per k removed: mean test error (last k and random k, over runs and draws), spread, seconds, time ratio to k = 0.

    Spreads are standard deviations over the runs (and draws); ``seconds`` is the mean over the runs of
    each run's time of a pass over its test images, ``time_ratio`` the mean of each run's ratio to its
    time with every block (of :func:`_timed_curves`).
    """
    timed = _timed_curves(curves)
    out = []
    for k in sorted({p["removed"] for c in curves for p in c["last"]}):
        last = [p for c in curves for p in c["last"] if p["removed"] == k]
        pairs = [(p, _all_blocks(c)) for c in timed for p in c["last"] if p["removed"] == k]
        randoms = [p for c in curves for p in c["random"] if p["removed"] == k]
        out.append({
            "removed": k, "kept_fraction": 1 - k / curves[0]["blocks"],
            "last_error": fmean(100 * p["test_error"] for p in last),
            "last_error_spread": pstdev([100 * p["test_error"] for p in last]) if len(last) > 1 else 0.0,
            "random_error": fmean(100 * p["test_error"] for p in randoms) if randoms else fmean(100 * p["test_error"] for p in last),
            "random_error_spread": pstdev([100 * p["test_error"] for p in randoms]) if len(randoms) > 1 else 0.0,
            "seconds": fmean(p["seconds"] for p, _ in pairs),
            "time_ratio": fmean(p["seconds"] / f["seconds"] for p, f in pairs),
        })  # fmt: skip
    return out


def pattern_summary(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per named set of blocks kept (the curves' ``"patterns"``, a ViT's every other block; none in a ResNet's):
    ``name``, ``kept``, ``removed``, ``kept_fraction``, mean test error over the runs (``error``, percent), its
    spread, ``seconds`` and ``time_ratio`` as :func:`curve_summary`'s."""
    timed = _timed_curves(curves)
    out = []
    for name in dict.fromkeys(p["name"] for c in curves for p in c.get("patterns", [])):
        found = [p for c in curves for p in c.get("patterns", []) if p["name"] == name]
        pairs = [(p, _all_blocks(c)) for c in timed for p in c.get("patterns", []) if p["name"] == name]
        errors = [100 * p["test_error"] for p in found]
        out.append({
            "name": name, "kept": found[0]["kept"], "removed": found[0]["removed"],
            "kept_fraction": 1 - found[0]["removed"] / curves[0]["blocks"],
            "error": fmean(errors), "error_spread": pstdev(errors) if len(errors) > 1 else 0.0,
            "seconds": fmean(p["seconds"] for p, _ in pairs), "time_ratio": fmean(p["seconds"] / f["seconds"] for p, f in pairs),
        })  # fmt: skip
    return out


def _kept_text(kept: list[int]) -> str:
    return ", ".join(map(str, kept)) if len(kept) <= 4 else f"{kept[0]}, {kept[1]}, ..., {kept[-1]}"


def curve_table(curves: dict[str, list[dict[str, Any]]]) -> str:
    """The depth curves of the arms with curves as a Markdown table: per set of blocks removed (the last ``k``,
    ``k`` random ones, every other block), each arm's mean test error ± sd over its runs, and its inference time
    (CPU seconds of a pass over the test images, and the ratio to every block)."""
    arms = [arm for arm in ARMS if curves.get(arm)]
    if not arms:
        return ""
    rows: dict[tuple[int, str, str], dict[str, str]] = {}
    for arm in arms:
        blocks = curves[arm][0]["blocks"]
        for s in curve_summary(curves[arm]):
            cell = f"{s['last_error']:.2f} ± {s['last_error_spread']:.2f} | {s['seconds']:.2f} ({s['time_ratio']:.2f})"
            rows.setdefault((0, f"last {s['removed']}", str(blocks - s["removed"])), {})[arm] = cell
            if any(p["removed"] == s["removed"] for c in curves[arm] for p in c["random"]):
                rows.setdefault((1, f"random {s['removed']}", str(blocks - s["removed"])), {})[arm] = (
                    f"{s['random_error']:.2f} ± {s['random_error_spread']:.2f} | -")
        for p in pattern_summary(curves[arm]):
            label = f"every other ({p['name']}: {_kept_text(p['kept'])} kept)"
            rows.setdefault((2, label, str(len(p["kept"]))), {})[arm] = (
                f"{p['error']:.2f} ± {p['error_spread']:.2f} | {p['seconds']:.2f} ({p['time_ratio']:.2f})")
    head = " | ".join(f"{arm}: test error (%), mean ± sd over {_count(len(curves[arm]), 'run')} | {arm}: seconds (ratio to all)"
                      for arm in arms)  # fmt: skip
    lines = [f"| blocks removed | blocks kept | {head} |", "|---|---:|" + "---:|---:|" * len(arms)]
    order = sorted(rows, key=lambda key: (key[0], int(key[1].split()[1]) if key[0] < 2 else 0))
    for key in order:
        lines.append(f"| {key[1]} | {key[2]} | " + " | ".join(rows[key].get(arm, "- | -") for arm in arms) + " |")
    return "\n".join(lines)


def plot_depth_curve(curves: dict[str, list[dict[str, Any]]], title: str, path: str | Path | None = None):
    """Test error against the fraction of blocks kept, per arm with curves; inference-time ratio on a second axis.

    Per arm: the last blocks removed (mean over the runs; where no random blocks were drawn, a band of ± 1 sd
    over the runs), random blocks removed where drawn (± sd over runs and draws), every other block kept where
    measured (± sd over the runs); dotted, on the right axis, the inference time relative to every block (the
    times with every block, in CPU seconds, under the title). The top axis counts the blocks removed.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    twin = ax.twinx()
    drawn = [(index, model, color) for index, (model, color) in enumerate(zip(ARMS, ("C0", "C3", "C2", "C1")))
             if curves.get(model)]  # fmt: skip
    runs = {len(curves[model]) for _, model, _ in drawn}
    full_times = []
    for index, model, color in drawn:
        arm_curves = curves[model]
        label = ARM_NAMES.get(model, model) + ("" if len(runs) == 1 else f" ({_count(len(arm_curves), 'run')})")
        summary = curve_summary(arm_curves)
        x = [s["kept_fraction"] for s in summary]
        last = [s["last_error"] for s in summary]
        drew_random = any(c["random"] for c in arm_curves)
        band = len(arm_curves) > 1 and not drew_random
        ax.plot(x, last, "o-", color=color, label=f"{label}: last blocks removed" + (" (band: ± sd)" if band else ""))
        if band:
            spread = [s["last_error_spread"] for s in summary]
            ax.fill_between(x, [m - d for m, d in zip(last, spread)], [m + d for m, d in zip(last, spread)],
                            color=color, alpha=0.15, linewidth=0)  # fmt: skip
        if drew_random:
            ax.errorbar(x, [s["random_error"] for s in summary], yerr=[s["random_error_spread"] for s in summary],
                        fmt="s--", color=color, alpha=0.6, capsize=3, label=f"{label}: random blocks removed (± sd)")
        for p, marker in zip(pattern_summary(arm_curves), "^vDP"):
            ax.errorbar([p["kept_fraction"] + 0.01 * (index - 1.5)], [p["error"]], yerr=[p["error_spread"]], fmt=marker,
                        color=color, markersize=8, capsize=3, label=f"{label}: every other block kept ({_kept_text(p['kept'])})")
        twin.plot(x, [s["time_ratio"] for s in summary], ":", color=color, alpha=0.6)
        full_times.append(f"{model} {summary[0]['seconds']:.2f} s")
    twin.set_ylabel("inference time / all blocks (dotted)")
    twin.set_ylim(0, 1.1)
    ax.set_xlabel("fraction of blocks kept")
    ax.set_ylabel("test error (%)")
    ax.invert_xaxis()
    blocks = {c["blocks"] for _, model, _ in drawn for c in curves[model]}
    if len(blocks) == 1:
        count = blocks.pop()
        top = ax.secondary_xaxis("top", functions=(lambda f: (1 - f) * count, lambda k: 1 - k / count))
        top.set_xlabel("blocks removed")
    images = sorted({c["test_images"] for _, model, _ in drawn for c in curves[model]})
    note = (f"{_count(runs.pop(), 'run')} per arm\n" if len(runs) == 1 else "") + (
        f"inference with all blocks: {', '.join(full_times)} (CPU) per {' or '.join(f'{n:,}' for n in images)} test images")
    ax.set_title(f"{title}\n{note}", fontsize=9)
    entries = len(ax.get_legend_handles_labels()[1])
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=1 if entries <= 5 else 2)  # below the axes
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def write_schedule_map(root: Path, model: str | None = None) -> dict[str, Any]:
    """Compute :func:`schedule_map` from `root`'s files, print it, write ``schedule_map.json``, ``.md``, ``.png``.

    `model` ("resnet", "vit"; by default the network the runs trained, see :func:`runs_model`) picks the
    design (:data:`SCHEDULE_DESIGNS`): the cells and seeds the status counts, the claims judged on the complete
    cells. Also :func:`fit_regime` per cell, and the figure and numbers of the depth curves of the deepest
    designed cell with any ``depth_curve.json``.
    """
    found_model = runs_model(root)
    if model is not None and found_model not in (None, model):
        raise ValueError(f"{root} holds {found_model} runs, not {model} runs")
    model = model or found_model or "resnet"
    design = SCHEDULE_DESIGNS[model]
    rows = schedule_map(root)
    found = cells(root)
    finished = {f"d{depth}-n{size}": {arm: sorted(runs) for arm, runs in groups.items() if runs}
                for (depth, size), groups in sorted(found.items())}  # fmt: skip
    table = schedule_table(rows)
    verdicts = [schedule_verdict(row) for row in rows]
    print(table)
    print()
    print("\n".join(verdicts))
    for cell, arms in finished.items():
        print(f"{cell}: finished runs, seeds per arm: " + "; ".join(f"{arm} {seeds}" for arm, seeds in arms.items()))
    status = schedule_status(root, design.cells, design.seeds)
    status_lines = [f"{cell}: {state['finished']} of {state['expected']} runs finished"
                    + ("" if state["complete"] else f"; pending: {', '.join(state['missing'])}")
                    for cell, state in status.items()]  # fmt: skip
    print("\n".join(status_lines))
    fits = cell_fits(root)
    fit_lines = [fit_line(cell, fit) for cell, fit in fits.items()]
    print("\n".join(fit_lines))
    complete = [r for r in rows if status.get(f"d{r['depth']}-n{r['train_images']}", {}).get("complete")]
    claims = paper_claims(complete, design.cells, design.claims, fits)
    if claims:
        print("\nThe papers' claims, on the complete cells:")
        print("\n".join(claims))
    # The test-time depth curve of the deepest designed cell with any (regime_study.py evaluate or vit writes each run's).
    with_curves = [(d, n) for d, n in design.cells if any(depth_curves(root, d, n).values())]
    curve_result: dict[str, Any] | None = None
    if with_curves:
        depth, size = max(with_curves)
        curves = depth_curves(root, depth, size)
        path = root / design.curve_figure.format(depth=depth, size=size)
        network = network_name(_config(next(f for runs in found[depth, size].values() for f in runs.values())))
        plot_depth_curve(curves, f"{network}, {size:,} training images: blocks removed at test time", path)
        print(f"wrote {path} ({', '.join(f'{m}: {len(c)} runs' for m, c in curves.items() if c)})")
        curve_result = {"cell": f"d{depth}-n{size}", "network": network, "figure": path.name,
                        "test_images": sorted({c["test_images"] for arm in curves.values() for c in arm}),
                        "repeats": sorted({c.get("repeats", 1) for arm in curves.values() for c in arm}),
                        "runs": {m: len(c) for m, c in curves.items() if c},
                        "summary": {m: curve_summary(c) for m, c in curves.items() if c},
                        "patterns": {m: pattern_summary(c) for m, c in curves.items() if c},
                        "table": curve_table(curves)}  # fmt: skip
        print(curve_result["table"])
    result = {"model": model, "design": {"cells": [f"d{d}-n{n}" for d, n in design.cells], "seeds": list(design.seeds)},
              "training_criterion_points": TRAINING_CRITERION_POINTS, "status": status, "finished_runs": finished,
              "rows": rows, "fits": fits, "overfit_train_test_ratio": OVERFIT_TRAIN_TEST_RATIO,
              "paper_claims": claims, "depth_curve": curve_result}  # fmt: skip
    write_json_atomically(root / "schedule_map.json", json.loads(json.dumps(result, default=str)))
    kind = "ViT" if model == "vit" else "ResNet"
    sections = [f"# The schedule map of {root.name} ({kind})",
                table if rows else "No arm has two finished seeds paired with plain runs yet.", "## Runs\n\n" + "\n".join(f"- {line}" for line in status_lines)]
    if verdicts:
        sections.append("## Verdicts (final test error, arm - plain)\n\n" + "\n".join(f"- {line}" for line in verdicts))
    if fit_lines:
        sections.append("## Underfitting or overfitting\n\n" + "\n".join(f"- {line}" for line in fit_lines))
    sections.append("## The papers' claims, on the complete cells\n\n"
                    + ("\n".join(f"- {line}" for line in claims) or "None yet: no cell is complete."))  # fmt: skip
    if curve_result is not None:
        sections.append(f"## Depth at test time: {curve_result['network']}, {curve_result['cell']}\n\n"
                        f"`{curve_result['figure']}`; the first {' or '.join(f'{n:,}' for n in curve_result['test_images'])} "
                        f"test images; CPU seconds of a pass over them (the median of {' or '.join(map(str, curve_result['repeats']))} "
                        f"passes).\n\n{curve_result['table']}")  # fmt: skip
    write_text_atomically(root / "schedule_map.md", "\n\n".join(sections) + "\n")
    if rows:
        plot_schedule_map(rows, root / "schedule_map.png")
    print(f"wrote {root}/schedule_map.json, .md" + (", .png" if rows else " (no cell with two paired seeds to draw)"))
    return result


DEFAULT_ROOTS = {"vit": Path("results/vit-fashion-mnist"), "schedules": Path("results/schedules-fashion-mnist")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["evaluate", "map", "schedules", "vit"],
                        help="'map': the sd-against-plain map (map.json, map.md, map.png); 'schedules': the schedule "
                        "map (schedule_map.json, .md, .png), both from the files in --root only; 'vit': the ViT cell "
                        "(evaluates its runs without evaluation.json, the depth curves of its plain and sd runs, "
                        "then 'schedules')")  # fmt: skip
    parser.add_argument("--root", type=Path, help="the runs' folder (default: results/regime-fashion-mnist; "
                        "results/schedules-fashion-mnist for 'schedules', results/vit-fashion-mnist for 'vit')")
    parser.add_argument("--seed", type=int, help="evaluate: only this seed's runs")
    parser.add_argument("--curve-depth", type=int, default=110, help="evaluate: depth whose runs get a depth curve")
    parser.add_argument("--curve-size", type=int, default=55000, help="evaluate: training-set size of those runs")
    parser.add_argument("--curve-seeds", type=int, nargs="+", default=[0, 1, 2], help="evaluate: seeds of those runs")
    args = parser.parse_args(argv)
    root = args.root or DEFAULT_ROOTS.get(args.command, Path("results/regime-fashion-mnist"))
    if args.command in ("evaluate", "vit"):
        torch.set_num_threads(1)  # the depth curves' inference times: CPU seconds of one thread
    if args.command == "evaluate":
        evaluate_runs(root, curve_cells={(args.curve_depth, args.curve_size)}, curve_seeds=args.curve_seeds,
                      seed=args.seed)  # fmt: skip
        return
    if args.command == "vit":
        design = SCHEDULE_DESIGNS["vit"]
        evaluate_runs(root, curve_cells=design.cells, curve_seeds=design.seeds, curve_arms=VIT_CURVE_ARMS, seed=args.seed)
        write_schedule_map(root, "vit")
        return
    if args.command == "schedules":
        write_schedule_map(root)
        return
    rows = regime_map(root)
    print(map_table(rows))
    print()
    for row in rows:
        print(verdict(row, "test"))
        print("  BN re-estimated: " + verdict(row, "test_bn"))
    serialisable = json.loads(json.dumps(rows, default=str))
    write_json_atomically(root / "map.json", serialisable)
    write_text_atomically(root / "map.md", map_table(rows) + "\n")
    plot_map(rows, root / "map.png")
    depth = max((r["depth"] for r in rows), default=None)
    if depth is not None:
        for size in sorted({r["train_images"] for r in rows}):
            curves = depth_curves(root, depth, size)
            if curves["plain"] or curves["sd"]:
                plot_depth_curve(curves, f"ResNet-{depth}, {size:,} training images: blocks removed at test time",
                                 root / f"depth_curve_d{depth}-n{size}.png")
    print(f"wrote {root}/map.json, map.md, map.png and the depth curves")


if __name__ == "__main__":
    main()
