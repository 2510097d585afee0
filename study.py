"""A multi-seed study of stochastic depth: paired runs, whole-test evaluations, confidence intervals.

For each seed one *job* trains the plain ResNet and one StochasticResNet per value of p_L in
lockstep (:func:`training.train_lockstep`: identical initial weights, identical batches),
evaluates every model on the whole test set at a few points during training, and at the end
evaluates K sampled sub-networks of each stochastic model. A job's result is one JSON file,
written atomically to ``output_dir/runs/<settings key>/seed-<seed>.json``; a study run again
with the same settings reads it back instead of computing it, and an interrupted study computes
only what is missing (a job itself resumes from its last evaluation point).

:func:`summarize` turns the results of several seeds into the study's verdicts, each with a 95%
confidence interval across seeds (:func:`paired_difference`, :func:`paired_ratio`).

Typical use::

    settings = StudySettings(p_lasts=(0.8, 0.65, 0.5, 0.35))
    results = run_study(settings, seeds=5, output_dir="results/study", workers=2)
    summary = summarize(results)
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import platform
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, stats
from torch import nn
from tqdm.auto import tqdm

from mnist import LabelledImages, load_fashion_mnist, load_mnist
from resnet_with_stochastic_depth import ResNet, StochasticResNet
from stochastic_depth.counting import training_flop_floor
from stochastic_depth.evaluation_network import keep_blocks
from training import pick_device, train_lockstep

__all__ = [
    "LOADERS",
    "StudySettings",
    "estimate_job_seconds",
    "fluctuation",
    "holm_adjusted",
    "load_results",
    "mean_interval",
    "minimum_detectable_difference",
    "missing_seeds",
    "paired_difference",
    "paired_ratio",
    "run_seed",
    "run_study",
    "summarize",
    "verdict_lines",
    "write_summary",
]

LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
PLAIN = "ResNet"
CONFIDENCE = 0.95
WARM_UP_STEPS = 5  # step times of the first iterations include one-off costs (allocation, kernel choice)


def stochastic_name(p_last: float) -> str:
    """Name of the StochasticResNet with this p_L in a study's histories, e.g. ``"p_L=0.5"``."""
    return f"p_L={p_last:g}"


# ----------------------------------------------------------------------------------
# Settings and jobs
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudySettings:
    """Everything that defines a study's runs; studies with equal settings share their results.

    Parameters
    ----------
    layout, depth : str, int
        ``ResNet.imagenet(depth)`` or ``ResNet.cifar(depth)``, 1 input channel, 10 classes.
    survival_rule : str
        ``"linear"`` (the paper) or ``"uniform"``.
    p_lasts : sequence of float
        One StochasticResNet per value of p_L; 1.0 gives a network that computes exactly what
        the plain ResNet computes (an A/A comparison).
    iterations, batch_size : int
        Lockstep iterations and training (and per-iteration test) batch size.
    dataset : {"mnist", "fashion-mnist"}
    evaluations : int
        Whole-test evaluations, evenly spaced; the last one at the end of training.
    subnetworks : int
        K, the sub-networks sampled from each trained stochastic model at the end.
    eval_samples : int, optional
        Evaluate on the first `eval_samples` test images only; None (the default, and what a
        study's verdicts should rest on) is the whole test set. For quick tries and tests.
    """

    layout: str = "imagenet"
    depth: int = 50
    survival_rule: str = "linear"
    p_lasts: tuple[float, ...] = (0.8, 0.65, 0.5, 0.35)
    iterations: int = 600
    batch_size: int = 128
    dataset: str = "mnist"
    evaluations: int = 5
    subnetworks: int = 10
    eval_samples: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.p_lasts, str):
            raise ValueError(f"p_lasts must be a list of numbers, got the string {self.p_lasts!r} "
                             "(with papermill, pass a list as YAML: -y 'p_lasts: [0.8, 0.5]')")
        p_lasts = tuple(float(p) for p in self.p_lasts)
        object.__setattr__(self, "p_lasts", p_lasts)
        if not p_lasts or len(set(p_lasts)) != len(p_lasts):
            raise ValueError(f"p_lasts must be a non-empty list of distinct values, got {list(p_lasts)}")
        if self.layout not in ("imagenet", "cifar"):
            raise ValueError(f"unknown layout {self.layout!r}: expected 'imagenet' or 'cifar'")
        if self.dataset not in LOADERS:
            raise ValueError(f"unknown dataset {self.dataset!r}: expected one of {sorted(LOADERS)}")
        for name in ("iterations", "batch_size", "evaluations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.evaluations > self.iterations:
            raise ValueError(f"evaluations ({self.evaluations}) cannot exceed iterations ({self.iterations})")
        if self.subnetworks < 0:
            raise ValueError(f"subnetworks must be 0 or more, got {self.subnetworks}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples must be None (the whole test set) or at least 1, got {self.eval_samples}")
        # Build once on the meta device (no memory, no time): bad depths, rules and
        # probabilities fail here, before any job starts, with the model's own message.
        with torch.device("meta"):
            for p_last in p_lasts:
                self.build(StochasticResNet, p_last=p_last, seed=0)

    def to_dict(self) -> dict[str, Any]:
        """The settings as they read back from JSON (lists, not tuples)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudySettings:
        return cls(**values)

    @property
    def key(self) -> str:
        """Short hash of the settings: the name of the folder that holds their runs."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def model_names(self) -> list[str]:
        return [PLAIN] + [stochastic_name(p) for p in self.p_lasts]

    @property
    def evaluation_points(self) -> list[int]:
        """Iterations after which every model is evaluated on the whole test set.

        Multiples of ``iterations // evaluations``, the last one moved to the end of training.
        """
        interval = self.iterations // self.evaluations
        return [interval * i for i in range(1, self.evaluations)] + [self.iterations]

    def build(self, model_class: type[ResNet], **kwargs: Any) -> ResNet:
        factory = {"imagenet": model_class.imagenet, "cifar": model_class.cifar}[self.layout]
        if model_class is StochasticResNet:
            kwargs.setdefault("survival_rule", self.survival_rule)
        return factory(self.depth, in_channels=1, num_classes=10, **kwargs)

    def build_models(self, seed: int) -> dict[str, ResNet]:
        """The plain ResNet and one StochasticResNet per p_L, all from identical weights."""
        models: dict[str, ResNet] = {}
        for name, p_last in [(PLAIN, None)] + [(stochastic_name(p), p) for p in self.p_lasts]:
            torch.manual_seed(seed)  # the same initial weights for every model
            if p_last is None:
                models[name] = self.build(ResNet)
            else:
                models[name] = self.build(StochasticResNet, p_last=p_last, seed=seed)
        return models


def result_path(output_dir: str | Path, settings: StudySettings, seed: int) -> Path:
    return Path(output_dir) / "runs" / settings.key / f"seed-{seed}.json"


def missing_seeds(settings: StudySettings, seeds: Sequence[int], output_dir: str | Path) -> list[int]:
    """The seeds whose result is not in `output_dir` yet."""
    return [seed for seed in seeds if not result_path(output_dir, settings, seed).exists()]


def load_results(settings: StudySettings, seeds: Sequence[int], output_dir: str | Path) -> list[dict[str, Any]]:
    """Read the results of `seeds`; raise FileNotFoundError naming the first missing one."""
    results = []
    for seed in seeds:
        path = result_path(output_dir, settings, seed)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no result for seed {seed} yet; run_study computes it")
        result = json.loads(path.read_text())
        if result["settings"] != settings.to_dict() or result["seed"] != seed:
            raise ValueError(f"{path} holds a run of other settings or another seed; move it away and run again")
        results.append(result)
    return results


def _write_json_atomically(path: Path, value: Any) -> None:
    # Write beside and rename, so that a reader (or a killed writer) never sees half a file.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value))
    os.replace(partial, path)


def run_seed(
    settings: StudySettings,
    seed: int,
    output_dir: str | Path,
    device: str | torch.device | None = None,
    threads: int | None = None,
    checkpoints: bool = True,
) -> dict[str, Any]:
    """One job: the lockstep run of every model of the study for one seed.

    Returns the stored result when there is one. Otherwise trains, evaluates and writes the
    result atomically. The job checkpoints at each evaluation point (beside the result file,
    removed at the end), so a job that was killed or interrupted continues from its last
    evaluation point and ends with the same numbers, apart from the measured times.

    Parameters
    ----------
    settings : StudySettings
    seed : int
        Seeds the initial weights, the batch order and the drops.
    output_dir : str or Path
        The study's folder.
    device : str or torch.device, optional
        Where to train; :func:`training.pick_device`'s choice by default.
    threads : int, optional
        ``torch.set_num_threads`` for this job (for several jobs sharing a CPU).
    checkpoints : bool
        Checkpoint at each evaluation point so that a killed job resumes there.

    Returns
    -------
    dict
        The result: settings, seed, device, times, the per-iteration history, the whole-test
        evaluations and the sub-network evaluations.
    """
    path = result_path(output_dir, settings, seed)
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.time()
    device = pick_device(device)
    train, test = LOADERS[settings.dataset]()
    if settings.eval_samples is not None:
        test_eval = LabelledImages(test.images[: settings.eval_samples], test.labels[: settings.eval_samples])
    else:
        test_eval = test
    models = settings.build_models(seed)

    # With checkpoints the job can resume from its last evaluation point; they hold every
    # model and optimizer (about 1.4 GB for five ResNet-50s), so short GPU jobs may go without.
    checkpoint = path.with_name(f"seed-{seed}.checkpoint.pt") if checkpoints else None
    progress_file = path.with_name(f"seed-{seed}.progress.json")
    resuming = checkpoint is not None and checkpoint.exists() and progress_file.exists()
    done = json.loads(progress_file.read_text()) if resuming else {}
    evaluations: dict[str, dict[str, dict[str, float]]] = done.get("evaluations", {})
    elapsed = done.get("elapsed_s", 0.0)
    points = settings.evaluation_points

    def evaluate_at_points(iteration: int, trained: dict[str, nn.Module]) -> None:
        if iteration in points:
            evaluations[str(iteration)] = {name: _evaluate(model, test_eval, device) for name, model in trained.items()}
            if checkpoint is not None:
                _write_json_atomically(progress_file, {"evaluations": evaluations,
                                                       "elapsed_s": elapsed + time.time() - started})

    history = train_lockstep(
        models, train, test, iterations=settings.iterations, batch_size=settings.batch_size, device=device,
        seed=seed, checkpoint_path=checkpoint, checkpoint_every=points[0] if checkpoint else None,
        resume_from=checkpoint if resuming else None, progress=False, on_iteration=evaluate_at_points,
    )
    if len(history) < settings.iterations:  # Ctrl-C: train_lockstep stopped early, after a checkpoint
        raise KeyboardInterrupt(f"seed {seed} interrupted after iteration {len(history)}; run again to resume")
    subnetworks = {
        name: _sample_subnetworks(model, test_eval, settings.subnetworks, seed, device)
        for name, model in models.items()
        if name != PLAIN
    }
    finished = time.time()
    result = {
        "settings": settings.to_dict(),
        "seed": seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "started_at": started,
        "finished_at": finished,
        "wall_s": elapsed + finished - started,
        "history": history.to_dict(),
        "evaluations": {
            "iterations": settings.evaluation_points,
            "samples": len(test_eval.labels),
            "accuracy": {name: [evaluations[str(p)][name]["accuracy"] for p in points] for name in models},
            "loss": {name: [evaluations[str(p)][name]["loss"] for p in points] for name in models},
        },
        "subnetworks": subnetworks,
    }
    _write_json_atomically(path, result)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        progress_file.unlink(missing_ok=True)
    return result


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1000) -> torch.Tensor:
    """Softmax probabilities of `model` in eval mode, on the CPU."""
    model.eval()
    probabilities = [
        F.softmax(model(images[i : i + batch_size].to(device)).float(), dim=1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    model.train()
    return torch.cat(probabilities)


def _evaluate(model: nn.Module, split: LabelledImages, device: torch.device) -> dict[str, float]:
    probabilities = _predict(model, split.images, device)
    return {
        "accuracy": _accuracy(probabilities, split.labels),
        "loss": F.nll_loss(probabilities.clamp_min(1e-12).log(), split.labels).item(),
    }


def _accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return (probabilities.argmax(dim=1) == labels).float().mean().item()


def _sample_subnetworks(model: StochasticResNet, split: LabelledImages, k: int, seed: int, device: torch.device) -> dict:
    """Whole-test accuracy of the p_l-scaled network, of K sampled sub-networks and of their average."""
    scaled = _predict(model, split.images, device)
    probabilities = torch.tensor(model.survival_probabilities)
    generator = torch.Generator().manual_seed(seed)  # its own stream: the drops of training are untouched
    ensemble = torch.zeros_like(scaled)
    accuracies, active = [], []
    for _ in range(k):
        keep = torch.rand(len(probabilities), generator=generator) < probabilities
        # A training-time draw applied to every test image: kept blocks unscaled, BatchNorm in eval mode.
        with keep_blocks(model, keep.nonzero().flatten().tolist(), unscaled=True):
            predicted = _predict(model, split.images, device)
        ensemble += predicted
        accuracies.append(_accuracy(predicted, split.labels))
        active.append(int(keep.sum()))
    return {
        "scaled_accuracy": _accuracy(scaled, split.labels),
        "accuracies": accuracies,
        "active_blocks": active,
        "ensemble_accuracy": _accuracy(ensemble, split.labels) if k else float("nan"),
    }


# ----------------------------------------------------------------------------------
# Running a study
# ----------------------------------------------------------------------------------


class Job(Protocol):
    """What an executor's ``submit`` returns: a concurrent.futures.Future, a submitit Job, ..."""

    def done(self) -> bool: ...

    def result(self) -> Any: ...


class Executor(Protocol):
    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Job: ...


def run_study(
    settings: StudySettings,
    seeds: int | Sequence[int],
    output_dir: str | Path,
    *,
    workers: int = 1,
    executor: Executor | None = None,
    device: str | torch.device | None = None,
    checkpoints: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Compute the missing runs of a study and return the results of all its seeds.

    Parameters
    ----------
    settings : StudySettings
    seeds : int or sequence of int
        How many seeds (0, 1, ...) or which.
    output_dir : str or Path
        Where results are read from and written to.
    workers : int
        Without `executor`: 1 runs the jobs one after the other in this process; more runs them
        in that many local processes at once (each with its share of the CPU threads).
    executor : object with ``submit(fn, *args)``, optional
        Any ``concurrent.futures``-style executor: ``submitit.AutoExecutor`` (Slurm, or local
        processes without it), a Dask ``Client(...).get_executor()``, a ``ProcessPoolExecutor``.
        Every job writes its own result to `output_dir`, which the executor's machines must share.
    device : str or torch.device, optional
        Where missing runs train.
    checkpoints : bool
        Let each job checkpoint at its evaluation points, so that a killed job resumes there
        (see :func:`run_seed`).
    progress : bool
        A progress bar over jobs.

    Returns
    -------
    list of dict
        One result per seed, in the order of `seeds`.
    """
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    missing = missing_seeds(settings, seeds, output_dir)
    device_name = None if device is None else str(device)
    if missing and executor is None and workers == 1:
        for seed in tqdm(missing, desc="runs", unit="run", disable=not progress):
            run_seed(settings, seed, output_dir, device_name, checkpoints=checkpoints)
    elif missing:
        own_pool = executor is None
        if own_pool:
            # spawn, not fork: a forked copy of a process that has used torch's threads can hang.
            executor = ProcessPoolExecutor(min(workers, len(missing)), mp_context=multiprocessing.get_context("spawn"))
        threads = max(1, (os.cpu_count() or 1) // workers) if own_pool else None
        try:
            jobs = [executor.submit(run_seed, settings, seed, str(output_dir), device_name, threads, checkpoints)
                    for seed in missing]
            _wait(jobs, progress)
        except KeyboardInterrupt:
            if own_pool:
                # Jupyter interrupts the kernel alone: pass it on, so that every running job
                # checkpoints and stops (its next run resumes there) instead of running to its end.
                for process in multiprocessing.active_children():
                    os.kill(process.pid, signal.SIGINT)
            raise
        finally:
            if own_pool:
                executor.shutdown(cancel_futures=True)
    return load_results(settings, seeds, output_dir)


def _wait(jobs: list[Job], progress: bool) -> None:
    """Wait for every job, re-raising the first failure, with a bar that moves as jobs end."""
    pending = list(jobs)
    with tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress) as bar:
        while pending:
            finished = [job for job in pending if job.done()]
            for job in finished:
                job.result()  # raises the job's exception, if any
                pending.remove(job)
                bar.update()
            if pending:
                time.sleep(0.2)


def estimate_job_seconds(settings: StudySettings, output_dir: str | Path, device: str | torch.device | None = None) -> float:
    """About how long one missing job takes: finished jobs' median, else a short measurement.

    The measurement times one training step and one test batch of every model (after one
    warm-up step) and scales them to the job: ``iterations`` lockstep iterations, the
    whole-test evaluations and the sub-network evaluations.
    """
    finished = list((Path(output_dir) / "runs" / settings.key).glob("seed-*[0-9].json"))
    if finished:
        return float(np.median([json.loads(path.read_text())["wall_s"] for path in finished]))
    device = pick_device(device)
    models = {name: model.to(device) for name, model in settings.build_models(seed=0).items()}
    images = torch.rand(settings.batch_size, 1, 28, 28, device=device)
    labels = torch.randint(10, (settings.batch_size,), device=device)
    step_s = test_s = 0.0
    for model in models.values():
        optimizer = torch.optim.Adam(model.parameters())
        for attempt in range(2):  # the first one pays the one-off costs
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
            trained = time.perf_counter()
            _predict(model, images, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if attempt:
                step_s += trained - start
                test_s += time.perf_counter() - trained
    test_samples = settings.eval_samples or len(LOADERS[settings.dataset]()[1].labels)
    batches_per_test_set = test_samples / settings.batch_size
    stochastic_share = len(settings.p_lasts) / len(models)
    evaluation_s = test_s * batches_per_test_set * (settings.evaluations + settings.subnetworks * stochastic_share)
    return settings.iterations * (step_s + test_s) + evaluation_s


# ----------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------


def minimum_detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test finds with the given power.

    Uses the noncentral t distribution with ``n - 1`` degrees of freedom and the observed
    standard deviation of the paired differences.
    """
    if n < 2 or not math.isfinite(sd):
        return float("nan")
    if sd == 0:
        return 0.0
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(effect: float) -> float:
        shift = effect / (sd / math.sqrt(n))
        return stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift) - power

    high = sd
    while shortfall(high) < 0:  # widen the bracket until the power is reached
        high *= 2
        if not math.isfinite(shortfall(high)):
            return float("nan")  # too few seeds: the noncentral t cannot be evaluated that far out
    return float(optimize.brentq(shortfall, 0.0, high))


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """Mean of `values` and its Student t confidence interval, as ``(mean, low, high)``.

    The t interval fits a few runs whose spread is unknown. When every value is the same the
    interval has zero width; with one value it is undefined (NaN).
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        raise ValueError("need at least one value")
    mean = float(values.mean())
    if len(values) == 1:
        return mean, float("nan"), float("nan")
    sd = float(values.std(ddof=1))
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
        ``min_detectable`` (:func:`minimum_detectable_difference` at 80% power) and
        ``verdict``: "better" (interval above 0), "worse" (below 0), or "no difference"
        (interval holds 0).
    """
    differences = np.asarray(treatment, dtype=float) - np.asarray(control, dtype=float)
    mean, low, high = mean_interval(differences, confidence)
    n = len(differences)
    sd = float(differences.std(ddof=1)) if n > 1 else float("nan")
    if low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "no difference"
    return {"mean": mean, "ci95": [low, high], "sd": sd, "n": n,
            "min_detectable": minimum_detectable_difference(sd, n), "verdict": verdict}


def holm_adjusted(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values for testing several hypotheses at once.

    The study compares each p_L with the plain ResNet: with four values, one of them reaching
    p < 0.05 by chance is far likelier than 5%. Holm's adjustment keeps the chance of any false
    "better" or "worse" at 5% without assuming the tests are independent.
    """
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def _paired_t_p_value(differences: Sequence[float]) -> float:
    differences = np.asarray(differences, dtype=float)
    if len(differences) < 2:
        return float("nan")
    if np.all(differences == differences[0]):
        return 1.0 if differences[0] == 0 else 0.0
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Geometric mean of ``numerator / denominator`` over paired runs, with a confidence interval.

    Ratios are averaged on the log scale, where they are symmetric (2x and 0.5x cancel), with
    a t interval there, brought back by exponentiating. Pairs with a non-finite or
    non-positive value are left out (and counted in ``n``'s absence).

    Returns
    -------
    dict
        ``mean`` (geometric), ``ci95`` ([low, high]), ``n`` (pairs used), ``verdict``: "above
        1", "below 1" or "no difference from 1".
    """
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    usable = np.isfinite(num) & np.isfinite(den) & (num > 0) & (den > 0)
    if not usable.any():
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0, "verdict": "undefined"}
    logs = paired_difference(np.log(num[usable]), np.log(den[usable]), confidence)
    verdict = {"better": "above 1", "worse": "below 1", "no difference": "no difference from 1"}[logs["verdict"]]
    return {"mean": math.exp(logs["mean"]), "ci95": [math.exp(v) for v in logs["ci95"]], "n": logs["n"],
            "verdict": verdict}


def fluctuation(values: Sequence[float]) -> float:
    """How much a per-iteration curve jumps from one iteration to the next.

    The standard deviation of successive differences divided by sqrt(2): for independent
    noise around a slowly moving curve it is the noise's standard deviation, and no
    smoothing (which lags behind a rising curve) is needed to find the trend.
    """
    return float(np.std(np.diff(np.asarray(values, dtype=float)), ddof=1) / math.sqrt(2))


def shared_fluctuation(first: Sequence[float], second: Sequence[float]) -> float:
    """Covariance of two curves' successive differences / 2: the jumps they make together.

    Two models evaluated on the same test batch share that batch's difficulty; this is the
    variance of that shared part (in the units of :func:`fluctuation` squared).
    """
    a, b = np.diff(np.asarray(first, dtype=float)), np.diff(np.asarray(second, dtype=float))
    return float(np.cov(a, b, ddof=1)[0, 1] / 2)


def _own_fluctuation(values: Sequence[float], reference: Sequence[float]) -> float:
    """A curve's fluctuation without the part it shares with `reference` (NaN if none is left)."""
    own_variance = fluctuation(values) ** 2 - shared_fluctuation(values, reference)
    return math.sqrt(own_variance) if own_variance > 0 else float("nan")


def _median_step_s(step_times: Sequence[float]) -> float:
    return float(np.median(step_times[min(WARM_UP_STEPS, len(step_times) - 1) :]))


def flop_floors(settings: StudySettings) -> dict[float, float]:
    """Expected fraction of a plain step's FLOPs that each p_L still computes (see training_flop_floor)."""
    torch.manual_seed(0)
    model = settings.build(ResNet)
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])  # FLOP fractions do not depend on the batch size
    floors = {}
    for p_last in settings.p_lasts:
        with torch.device("meta"):
            probabilities = settings.build(StochasticResNet, p_last=p_last, seed=0).survival_probabilities
        floors[p_last] = training_flop_floor(model, images, labels, probabilities)["floor"]
    return floors


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The study's verdicts, computed from its runs (one result per seed, same settings).

    For each p_L, paired across seeds:

    - ``accuracy_difference``: final whole-test accuracy, stochastic minus plain, in
      percentage points, with ``ci95``, ``verdict`` and ``min_detectable`` (points), and the
      paired t test's ``p_value`` and ``p_value_holm`` (adjusted for the number of p_L values);
    - ``fluctuation``: how much the per-iteration test-batch accuracy jumps
      (:func:`fluctuation`), as the ratio stochastic / plain, raw and without the part the two
      models share because they see the same test batch, in the first and second half of the
      run, and each model's second half / first half;
    - ``test_time``: whole-test accuracy of the p_l-scaled network, of single sampled
      sub-networks (mean and spread) and of their average (a Monte-Carlo ensemble);
    - ``step_time_ratio``: median training step, stochastic / plain, beside ``flop_floor``.
    """
    if not results:
        raise ValueError("no results to summarize")
    settings = StudySettings.from_dict(results[0]["settings"])
    if any(r["settings"] != results[0]["settings"] for r in results):
        raise ValueError("results of different settings cannot be summarized together")
    floors = flop_floors(settings)
    final = {name: [r["evaluations"]["accuracy"][name][-1] for r in results] for name in settings.model_names}
    acc = {name: [r["history"][name]["test_acc"] for r in results] for name in settings.model_names}
    half = settings.iterations // 2
    halves = {"first_half": slice(0, half), "second_half": slice(half, None)}

    comparisons = []
    for p_last in settings.p_lasts:
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
                "stochastic_own": [_own_fluctuation(s, p) for s, p in zip(stoch, plain)],
                "plain_own": [_own_fluctuation(p, s) for s, p in zip(stoch, plain)],
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
            "subnetworks": settings.subnetworks,
            "scaled_accuracy": float(np.mean(scaled)),
            "single_subnetwork_accuracy": float(np.mean([np.mean(s["accuracies"]) for s in subnetworks]))
            if settings.subnetworks else float("nan"),
            "single_subnetwork_sd": float(np.mean([np.std(s["accuracies"], ddof=1) for s in subnetworks]))
            if settings.subnetworks > 1 else float("nan"),
            "single_subnetwork_range": [float(min(min(s["accuracies"]) for s in subnetworks)),
                                        float(max(max(s["accuracies"]) for s in subnetworks))]
            if settings.subnetworks else [float("nan"), float("nan")],
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
            "flop_floor": floors[p_last],
        })
    holm = holm_adjusted([_paired_t_p_value(c["per_seed_differences"]) for c in comparisons])
    for c, adjusted in zip(comparisons, holm):
        c["p_value"] = _paired_t_p_value(c["per_seed_differences"])
        c["p_value_holm"] = adjusted
    devices = sorted({f"{r['device_name']} ({r['device']}, torch {r['torch']})" for r in results})
    return {
        "settings": settings.to_dict(),
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
            f"({1 - s['mean']:.0%} shorter); FLOP floor {c['flop_floor']:.3f}x"
        )
    return lines


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> Path:
    """Write `summary` to ``output_dir/study_summary.json``, undefined values as null."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [strict(v) for v in value]
        return value

    path = Path(output_dir) / "study_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(path, strict(summary))
    return path


def main() -> None:
    """Run a study from the command line (e.g. on a GPU machine or a cluster's login node)."""
    import argparse

    defaults = StudySettings()
    parser = argparse.ArgumentParser(description="Run a multi-seed stochastic-depth study; see study.py.")
    parser.add_argument("--layout", default=defaults.layout, choices=["imagenet", "cifar"])
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--survival-rule", default=defaults.survival_rule)
    parser.add_argument("--p-lasts", type=float, nargs="+", default=list(defaults.p_lasts))
    parser.add_argument("--iterations", type=int, default=defaults.iterations)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--dataset", default=defaults.dataset, choices=sorted(LOADERS))
    parser.add_argument("--evaluations", type=int, default=defaults.evaluations)
    parser.add_argument("--subnetworks", type=int, default=defaults.subnetworks)
    parser.add_argument("--eval-samples", type=int, default=None, help="first N test images only (quick tries)")
    parser.add_argument("--seeds", type=int, default=5, help="how many seeds: 0, 1, ...")
    parser.add_argument("--workers", type=int, default=1, help="local processes running jobs at once")
    parser.add_argument("--executor", choices=["local", "submitit"], default="local",
                        help="submitit: Slurm where there is one, else submitit's local processes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-checkpoints", action="store_true", help="jobs do not checkpoint (short jobs)")
    parser.add_argument("--output-dir", default="results/study")
    args = parser.parse_args()

    settings = StudySettings(
        layout=args.layout, depth=args.depth, survival_rule=args.survival_rule, p_lasts=tuple(args.p_lasts),
        iterations=args.iterations, batch_size=args.batch_size, dataset=args.dataset,
        evaluations=args.evaluations, subnetworks=args.subnetworks, eval_samples=args.eval_samples,
    )
    executor = None
    if args.executor == "submitit":
        import submitit

        executor = submitit.AutoExecutor(folder=Path(args.output_dir) / "submitit")
        executor.update_parameters(timeout_min=24 * 60, gpus_per_node=1 if args.device == "cuda" else 0)
    missing = missing_seeds(settings, range(args.seeds), args.output_dir)
    print(f"settings {settings.key}: {len(missing)} of {args.seeds} runs to compute", flush=True)
    results = run_study(settings, args.seeds, args.output_dir, workers=args.workers, executor=executor,
                        device=args.device, checkpoints=not args.no_checkpoints)
    summary = summarize(results)
    print(f"wrote {write_summary(summary, args.output_dir)}")
    for topic, lines in verdict_lines(summary).items():
        print(f"\n{topic}:", *lines, sep="\n  ")


if __name__ == "__main__":
    main()
