"""A multi-seed study of stochastic depth: paired runs, whole-test evaluations, confidence intervals.

For each seed one *job* trains the plain ResNet and one StochasticResNet per value of p_L in
lockstep (:func:`training.train_lockstep`: identical initial weights, identical batches),
evaluates every model on the whole test set at a few points during training, and at the end
evaluates K sampled sub-networks of each stochastic model. A job's result is one JSON file,
written atomically to ``output_dir/runs/<settings key>/seed-<seed>.json``; a study run again
with the same settings reads it back instead of computing it, and an interrupted study computes
only what is missing (a job itself resumes from its last evaluation point).

:func:`summarize` turns the results of several seeds into the study's verdicts, each with a 95%
confidence interval across seeds, from the stored results alone; it and :func:`verdict_lines`
live in :mod:`study_summary`, the statistics in :mod:`run_statistics` (neither imports torch).
This module re-exports the names a study's notebook uses.

Typical use::

    settings = StudySettings(p_lasts=(0.8, 0.65, 0.5, 0.35))
    results = run_study(settings, seeds=5, output_dir="results/study", workers=2)
    summary = summarize(results)
"""

from __future__ import annotations

import hashlib
import json
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
from torch import nn
from tqdm.auto import tqdm

from atomic_files import write_json_atomically
from mnist import LabelledImages, load_fashion_mnist, load_mnist
from resnet_with_stochastic_depth import ResNet, StochasticResNet
from run_statistics import (
    fluctuation,
    holm_adjusted,
    mean_interval,
    minimum_detectable_difference,
    paired_difference,
    paired_ratio,
    shared_fluctuation,
)
from stochastic_depth.counting import training_flop_floor
from stochastic_depth.evaluation_network import keep_blocks
from study_summary import PLAIN, stochastic_name, summarize, verdict_lines
from training import build_resnet, evaluate, pick_device, predict, synchronize, train_lockstep

__all__ = [
    "LOADERS",
    "StudySettings",
    "estimate_job_seconds",
    "flop_floors",
    "fluctuation",
    "holm_adjusted",
    "load_results",
    "mean_interval",
    "minimum_detectable_difference",
    "missing_seeds",
    "paired_difference",
    "paired_ratio",
    "record_flop_floors",
    "run_seed",
    "run_study",
    "shared_fluctuation",
    "stochastic_name",
    "summarize",
    "verdict_lines",
    "write_summary",
]

LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
EVAL_BATCH_SIZE = 1000  # images per forward pass in the whole-test evaluations


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
        # fork_rng: building seeds torch's global RNG, which settings must leave alone.
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            for p_last in p_lasts:
                self.build_model(p_last, seed=0)

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

    def build_model(self, p_last: float | None, seed: int) -> ResNet:
        """The plain ResNet (`p_last` None) or the StochasticResNet with this p_L.

        The initial weights depend on `seed` alone (:func:`training.build_resnet`), which also
        seeds the stochastic model's drops.
        """
        stochastic = None if p_last is None else {"p_last": p_last, "survival_rule": self.survival_rule, "seed": seed}
        return build_resnet(self.layout, self.depth, seed=seed, stochastic=stochastic, in_channels=1, num_classes=10)

    def build_models(self, seed: int) -> dict[str, ResNet]:
        """The plain ResNet and one StochasticResNet per p_L, all from identical weights."""
        models = {PLAIN: self.build_model(None, seed)}
        models.update({stochastic_name(p): self.build_model(p, seed) for p in self.p_lasts})
        return models


def result_path(output_dir: str | Path, settings: StudySettings, seed: int) -> Path:
    return Path(output_dir) / "runs" / settings.key / f"seed-{seed}.json"


def missing_seeds(settings: StudySettings, seeds: Sequence[int], output_dir: str | Path) -> list[int]:
    """The seeds whose result is not in `output_dir` yet."""
    return [seed for seed in seeds if not result_path(output_dir, settings, seed).exists()]


def load_results(settings: StudySettings, seeds: Sequence[int], output_dir: str | Path) -> list[dict[str, Any]]:
    """Read the results of `seeds`, as :func:`run_seed` returns them.

    A result stored without its ``flop_floors`` gets them from :func:`record_flop_floors`'s
    file. Raises FileNotFoundError naming the first missing result, ValueError for a file that
    holds another run.
    """
    floors_file = flop_floors_path(output_dir, settings)
    stored_floors = json.loads(floors_file.read_text()) if floors_file.exists() else None
    results = []
    for seed in seeds:
        path = result_path(output_dir, settings, seed)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no result for seed {seed} yet; run_study computes it")
        result = json.loads(path.read_text())
        if result["settings"] != settings.to_dict() or result["seed"] != seed:
            raise ValueError(f"{path} holds a run of other settings or another seed; move it away and run again")
        if "flop_floors" not in result and stored_floors is not None:
            result["flop_floors"] = stored_floors
        results.append(result)
    return results


def flop_floors(settings: StudySettings) -> dict[str, float]:
    """Expected fraction of a plain step's FLOPs that each p_L still computes, by model name.

    :func:`stochastic_depth.counting.training_flop_floor` of the plain ResNet with each
    StochasticResNet's survival probabilities, e.g. ``{"p_L=0.5": 0.749}``; it counts one
    training step of a 2-image batch on the CPU (FLOP fractions do not depend on the batch size).
    Leaves torch's global RNG as it was.
    """
    with torch.random.fork_rng(devices=[]):
        model = settings.build_model(None, seed=0)
        images, labels = torch.rand(2, 1, 28, 28), torch.tensor([0, 1])
        floors = {}
        for p_last in settings.p_lasts:
            with torch.device("meta"):
                probabilities = settings.build_model(p_last, seed=0).survival_probabilities
            floors[stochastic_name(p_last)] = training_flop_floor(model, images, labels, probabilities)["floor"]
    return floors


def flop_floors_path(output_dir: str | Path, settings: StudySettings) -> Path:
    return Path(output_dir) / "runs" / settings.key / "flop_floors.json"


def record_flop_floors(settings: StudySettings, output_dir: str | Path) -> Path:
    """Write :func:`flop_floors` beside the settings' runs, for results stored without them.

    :func:`load_results` gives such results these floors; results made by :func:`run_seed`
    carry their own. Returns the file's path (``runs/<settings key>/flop_floors.json``).
    """
    path = flop_floors_path(output_dir, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, flop_floors(settings), indent=1)
    return path


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
        evaluations, the sub-network evaluations and the FLOP floors (:func:`flop_floors`):
        everything :func:`summarize` needs.
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
            evaluations[str(iteration)] = {name: _evaluate(model, test_eval) for name, model in trained.items()}
            if checkpoint is not None:
                write_json_atomically(progress_file, {"evaluations": evaluations,
                                                      "elapsed_s": elapsed + time.time() - started})

    history = train_lockstep(
        models, train, test, iterations=settings.iterations, batch_size=settings.batch_size, device=device,
        seed=seed, checkpoint_path=checkpoint, checkpoint_every=points[0] if checkpoint else None,
        resume_from=checkpoint if resuming else None, progress=False, on_iteration=evaluate_at_points,
    )
    if len(history) < settings.iterations:  # Ctrl-C: train_lockstep stopped early, after a checkpoint
        raise KeyboardInterrupt(f"seed {seed} interrupted after iteration {len(history)}; run again to resume")
    subnetworks = {
        name: _sample_subnetworks(model, test_eval, settings.subnetworks, seed)
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
        "flop_floors": flop_floors(settings),
    }
    write_json_atomically(path, result)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
        progress_file.unlink(missing_ok=True)
    return result


def _probabilities(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of `model` in eval mode (:func:`training.predict`), float32 on the CPU."""
    return F.softmax(predict(model, images, batch_size=EVAL_BATCH_SIZE).float(), dim=1).cpu()


def _evaluate(model: nn.Module, split: LabelledImages) -> dict[str, float]:
    """Whole-split ``accuracy`` (fraction correct) and ``loss`` (mean cross-entropy) of `model`."""
    loss, accuracy = evaluate(model, split, batch_size=EVAL_BATCH_SIZE)
    return {"accuracy": accuracy, "loss": loss}


def _accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return (probabilities.argmax(dim=1) == labels).float().mean().item()


def _sample_subnetworks(model: StochasticResNet, split: LabelledImages, k: int, seed: int) -> dict:
    """Whole-test accuracy of the p_l-scaled network, of K sampled sub-networks and of their average."""
    scaled = _probabilities(model, split.images)
    probabilities = torch.tensor(model.survival_probabilities)
    generator = torch.Generator().manual_seed(seed)  # its own stream: the drops of training are untouched
    ensemble = torch.zeros_like(scaled)
    accuracies, active = [], []
    for _ in range(k):
        keep = torch.rand(len(probabilities), generator=generator) < probabilities
        # A training-time draw applied to every test image: kept blocks unscaled, BatchNorm in eval mode.
        with keep_blocks(model, keep.nonzero().flatten().tolist(), unscaled=True):
            predicted = _probabilities(model, split.images)
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
            synchronize(device)  # queued GPU work belongs to the step
            trained = time.perf_counter()
            predict(model, images)
            synchronize(device)
            if attempt:
                step_s += trained - start
                test_s += time.perf_counter() - trained
    test_samples = settings.eval_samples or len(LOADERS[settings.dataset]()[1].labels)
    batches_per_test_set = test_samples / settings.batch_size
    stochastic_share = len(settings.p_lasts) / len(models)
    evaluation_s = test_s * batches_per_test_set * (settings.evaluations + settings.subnetworks * stochastic_share)
    return settings.iterations * (step_s + test_s) + evaluation_s


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> Path:
    """Write `summary` to ``output_dir/study_summary.json``, undefined values as null."""
    path = Path(output_dir) / "study_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, summary)
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
