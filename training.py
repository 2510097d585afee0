"""Train several models in lockstep on the very same batches and record what happens.

:func:`train_lockstep` is the loop; :class:`BatchSampler` feeds it from tensors kept on the
training device; :class:`History` holds the per-model, per-iteration measurements.
Iterations are counted from 1: after iteration k the history holds k entries per metric.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from atomic_files import write_atomically, write_json_atomically
from mnist import LabelledImages
from resnet_with_stochastic_depth import (
    ResNet,
    StochasticDepthState,
    StochasticResNet,
    linear_drop_warmup,
    stochastic_depth_gates,
    stochastic_depth_state,
)
from stochastic_depth.evaluation_network import evaluation_mode

__all__ = [
    "METRICS",
    "BatchSampler",
    "CheckpointError",
    "History",
    "NonFiniteLossError",
    "build_resnet",
    "evaluate",
    "pick_device",
    "predict",
    "save_atomically",
    "synchronize",
    "train_lockstep",
]

METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "step_time")

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
# train_lockstep's default optimizer (a module-level value, not a call in the signature).
ADAM: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-3)


def build_resnet(
    layout: Literal["cifar", "imagenet"],
    depth: int,
    *,
    seed: int,
    stochastic: Mapping[str, Any] | None = None,
    **options: Any,
) -> ResNet:
    """``ResNet.<layout>(depth)``, or a ``StochasticResNet`` given its options in `stochastic`.

    The initial weights depend only on `seed` (and the architecture): a plain network and
    stochastic ones built with the same seed start from identical weights, which is how every
    comparison here is built. `options` go to both (``in_channels``, ``num_classes``,
    ``shortcut``); `stochastic` holds the ``StochasticResNet`` options (``p_last``, ``mode``,
    ``survival_rule``, ``seed`` of its draws). Seeds torch's global RNG.
    """
    torch.manual_seed(seed)
    if stochastic is None:
        return getattr(ResNet, layout)(depth, **options)
    return getattr(StochasticResNet, layout)(depth, **options, **stochastic)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device` if given, else the best available: CUDA, then Apple MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class BatchSampler:
    """Random mini-batches from tensors held on one device.

    Each epoch visits every sample exactly once in a fresh random order (the last batch of an
    epoch is smaller when the batch size does not divide the number of samples). The order
    comes from a private CPU generator seeded with `seed`, so it is the same on every device
    and untouched by other code using the global RNG.

    Parameters
    ----------
    images, labels : torch.Tensor
        Samples along the first dimension. They are moved to `device` once, here.
    batch_size : int
        Samples per batch.
    shuffle : bool
        Reshuffle every epoch; if False, every epoch goes through the samples in order.
    n_epochs : int, optional
        Stop (``StopIteration``) after this many epochs; endless by default.
    seed : int
        Seed of the shuffling.
    device : str or torch.device, optional
        Where the data and the batches live; defaults to where `images` already are.

    Examples
    --------
    >>> batches = BatchSampler(train.images, train.labels, 400, device="cuda")
    >>> images, labels = batches.next_batch()
    >>> for images, labels in BatchSampler(test.images, test.labels, 1000, n_epochs=1): ...
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        n_epochs: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need as many images as labels, at least one: got {len(images)} and {len(labels)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images = images.to(device)
        self.labels = labels.to(self.images.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.n_epochs = n_epochs
        self.epoch = 0  # completed epochs
        self.position = 0  # samples of the current epoch already served
        self._generator = torch.Generator().manual_seed(seed)
        self._order = self._new_order()

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the next ``(images, labels)``; raise ``StopIteration`` after `n_epochs`."""
        if self.position == len(self.images):
            self.epoch += 1
            self.position = 0
            self._order = self._new_order()
        if self.n_epochs is not None and self.epoch >= self.n_epochs:
            raise StopIteration
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += len(indices)
        return self.images[indices], self.labels[indices]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    __next__ = next_batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the same batches."""
        return {
            "batch_size": self.batch_size,
            "epoch": self.epoch,
            "position": self.position,
            "order": self._order.cpu(),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["batch_size"] != self.batch_size or len(state["order"]) != len(self.images):
            raise ValueError(
                f"sampler state is for batches of {state['batch_size']} from {len(state['order'])} samples, "
                f"this sampler makes batches of {self.batch_size} from {len(self.images)}"
            )
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = state["order"].to(self.images.device)
        self._generator.set_state(state["generator"])

    def _new_order(self) -> torch.Tensor:
        n = len(self.images)
        order = torch.randperm(n, generator=self._generator) if self.shuffle else torch.arange(n)
        return order.to(self.images.device)


class History:
    """Per-model lists of per-iteration measurements.

    ``history["ResNet"]["test_acc"]`` is the list of test accuracies of model "ResNet",
    one per iteration. Metrics are :data:`METRICS`: ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (on that iteration's batches) and ``step_time`` (seconds).
    Saves to and loads from ``.json`` (one object per model) or ``.csv`` (one row per
    model and iteration, columns ``model, iteration`` and the metrics).
    """

    def __init__(self, models: Iterable[str]) -> None:
        self._values = {model: {metric: [] for metric in METRICS} for model in models}

    @property
    def models(self) -> list[str]:
        return list(self._values)

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS

    def __getitem__(self, model: str) -> dict[str, list[float]]:
        return self._values[model]

    def __len__(self) -> int:
        """Number of iterations recorded."""
        return min((len(values["step_time"]) for values in self._values.values()), default=0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, History) and self._values == other._values

    def __repr__(self) -> str:
        return f"History(models={self.models}, iterations={len(self)})"

    def append(self, model: str, **values: float) -> None:
        """Record one iteration of `model`: one value for each metric."""
        if set(values) != set(METRICS):
            raise ValueError(f"need exactly the metrics {METRICS}, got {sorted(values)}")
        for metric, value in values.items():
            self._values[model][metric].append(float(value))

    def to_dict(self) -> dict[str, dict[str, list[float]]]:
        return {model: {metric: list(values) for metric, values in metrics.items()}
                for model, metrics in self._values.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Mapping[str, Iterable[float]]]) -> History:
        history = cls(values)
        for model, metrics in values.items():
            history._values[model] = {metric: [float(v) for v in metrics[metric]] for metric in METRICS}
        return history

    def save(self, path: str | Path) -> None:
        """Write to `path`, as JSON or CSV according to its suffix."""
        path = Path(path)
        if path.suffix == ".json":
            write_json_atomically(path, self.to_dict(), indent=1)
        elif path.suffix == ".csv":
            write_atomically(path, self._write_csv)
        else:
            raise ValueError(f"{path}: unknown format, use a .json or .csv name")

    def _write_csv(self, path: Path) -> None:
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["model", "iteration", *METRICS])
            for model, metrics in self._values.items():
                for iteration, row in enumerate(zip(*(metrics[m] for m in METRICS)), start=1):
                    writer.writerow([model, iteration, *map(repr, row)])

    @classmethod
    def load(cls, path: str | Path) -> History:
        """Read a history written by :meth:`save`."""
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_dict(json.loads(path.read_text()))
        if path.suffix == ".csv":
            values: dict[str, dict[str, list[float]]] = {}
            with path.open(newline="") as file:
                for row in csv.DictReader(file):
                    metrics = values.setdefault(row["model"], {metric: [] for metric in METRICS})
                    for metric in METRICS:
                        metrics[metric].append(float(row[metric]))
            return cls.from_dict(values)
        raise ValueError(f"{path}: unknown format, use a .json or .csv name")


class NonFiniteLossError(RuntimeError):
    """A model's loss became NaN or infinite; `history` holds the iterations before it.

    No model has taken that iteration's optimizer step: every model's parameters and
    optimizer state are those after the last iteration in `history`.
    """

    def __init__(self, message: str, history: History) -> None:
        super().__init__(message)
        self.history = history


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or written; the message names the file.

    When writing failed during training, `history` holds every iteration recorded so far
    (the models have taken all their steps); when reading failed, `history` is None.
    """

    def __init__(self, message: str, history: History | None = None) -> None:
        super().__init__(message)
        self.history = history


def train_lockstep(
    models: Mapping[str, nn.Module],
    train: LabelledImages,
    test: LabelledImages,
    iterations: int,
    batch_size: int,
    *,
    test_batch_size: int | None = None,
    optimizer: OptimizerFactory = ADAM,
    device: str | torch.device | None = None,
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | Path | None = None,
    drop_warmup_steps: int = 0,
    progress: bool = True,
    on_iteration: Callable[[int, Mapping[str, nn.Module]], None] | None = None,
) -> History:
    """Train `models` side by side: every iteration, each takes one step on the same batch.

    At each iteration every model takes one optimizer step (cross-entropy loss) on the same
    training batch, then every model is evaluated, in eval mode and without gradients, on
    the same test batch. On CPU two runs with the same seed give the same history, apart
    from the measured `step_time`. Every model computes its loss and gradients before any
    takes its optimizer step, so that a non-finite loss stops the run with all models at
    the same iteration. Arguments are checked before the first step.

    Parameters
    ----------
    models : mapping of str to nn.Module
        Models by name, moved to `device`. Seed the global RNG before building them if their
        initialisation must repeat. A model with stochastic depth (a ``StochasticResNet`` or
        a model given ``add_stochastic_depth``) has its ``StochasticDepthState`` (seed, pass
        counts and drop warm-up scale) checkpointed and restored too.
    train, test : LabelledImages
        Training and test data, as returned by ``load_mnist``; copied to `device` once.
    iterations : int
        Total number of iterations, counting those done before a resumed checkpoint
        (so at least as many as the checkpoint holds).
    batch_size : int
        Training batch size.
    test_batch_size : int, optional
        Test batch size; defaults to `batch_size` (None only: 0 is an error).
    optimizer : callable
        Makes an optimizer from a model's parameters; Adam with lr=1e-3 by default.
    device : str or torch.device, optional
        Defaults to :func:`pick_device`'s choice: CUDA, then MPS, then CPU.
    seed : int
        Seeds the batch order and the global torch RNG (dropout and the like).
    checkpoint_path : str or Path, optional
        Where to save a checkpoint (models, optimizers, RNG states, stochastic-depth states,
        batch positions, history, `drop_warmup_steps`): every `checkpoint_every` iterations,
        at the end, and when interrupted. Its folder must exist.
    checkpoint_every : int, optional
        Checkpoint interval in iterations; needs `checkpoint_path`.
    resume_from : str or Path, optional
        A checkpoint to continue from; the models must have the same names and shapes.
        A resumed run ends with the same history as one never interrupted.
    drop_warmup_steps : int
        Drop warm-up of the stochastic-depth models: their drop rates rise linearly from 0
        (no block dropped) at iteration 1 to their targets at iteration
        ``drop_warmup_steps + 1`` (``StochasticDepthState.drop_scale``, set before each
        iteration by :func:`~resnet_with_stochastic_depth.linear_drop_warmup`). 0: none, and
        ``drop_scale`` is left as it is. A resumed run must use the checkpoint's value.
    progress : bool
        Show a tqdm progress bar with the latest test accuracies.
    on_iteration : callable, optional
        Called as ``on_iteration(iteration, models)`` after each iteration is recorded and
        before it is checkpointed (so a checkpoint implies the call finished), e.g. to
        evaluate the models on more data every so often.

    Returns
    -------
    History
        One entry per model, metric and completed iteration. Ctrl-C stops the run after the
        current iteration (a second Ctrl-C at once) and returns what was recorded, with a
        warning naming the iteration.

    Raises
    ------
    ValueError
        For a bad argument (negative `iterations`, a `test_batch_size` or `checkpoint_every`
        below 1, a `checkpoint_path` in a folder that does not exist, fewer `iterations`
        than the resumed checkpoint holds, ...), before any training step; the message
        names the value.
    CheckpointError
        When `resume_from` cannot be read (missing, truncated, corrupted), naming the file;
        or when writing a checkpoint fails, naming the file and carrying the history
        recorded so far in its ``history`` attribute.
    NonFiniteLossError
        When a training loss is NaN or infinite; names the model and iteration and carries
        the history of the iterations before it in its ``history`` attribute. No model has
        taken that iteration's step.
    """
    _check_arguments(iterations, batch_size, test_batch_size, checkpoint_path, checkpoint_every,
                     resume_from, drop_warmup_steps, models)
    device = pick_device(device)
    torch.manual_seed(seed)
    models = {name: model.to(device) for name, model in models.items()}
    optimizers = {name: optimizer(model.parameters()) for name, model in models.items()}
    train_batches = BatchSampler(train.images, train.labels, batch_size, seed=seed, device=device)
    test_batch_size = batch_size if test_batch_size is None else test_batch_size
    test_batches = BatchSampler(test.images, test.labels, test_batch_size, seed=seed + 1, device=device)
    history = History(models)
    samplers = {"train": train_batches, "test": test_batches}
    drop_states = _stochastic_depth_states(models)
    if resume_from is not None:
        history = _load_checkpoint(resume_from, models, optimizers, samplers, drop_warmup_steps)
        if len(history) > iterations:
            raise ValueError(
                f"{resume_from} holds {len(history)} iterations, more than iterations={iterations}: "
                f"iterations counts those of the checkpoint, so ask for at least {len(history)}"
            )

    done = len(history)
    with _deferred_keyboard_interrupt() as interrupt, tqdm(
        total=iterations, initial=done, disable=not progress, desc="lockstep", unit="it"
    ) as bar:
        for iteration in range(done + 1, iterations + 1):
            try:
                images, labels = train_batches.next_batch()
                test_split = LabelledImages(*test_batches.next_batch())
                if drop_warmup_steps:
                    for state in drop_states.values():
                        state.drop_scale = linear_drop_warmup(iteration - 1, drop_warmup_steps)
                # Every model computes its gradients before any steps: a non-finite loss then
                # stops the run with every model's weights at the last recorded iteration.
                record = {
                    name: _forward_backward(model, optimizers[name], images, labels, device)
                    for name, model in models.items()
                }
                for name, values in record.items():
                    if not math.isfinite(values["train_loss"]):
                        raise NonFiniteLossError(
                            f"model {name!r}: training loss is {values['train_loss']} at iteration "
                            f"{iteration}; no model took that step, and the history of the "
                            f"{iteration - 1} iterations before is attached",
                            history,
                        )
                for name, optimizer in optimizers.items():
                    record[name]["step_time"] += _optimizer_step(optimizer, device)
                for name, model in models.items():
                    record[name]["test_loss"], record[name]["test_acc"] = evaluate(model, test_split)
            except KeyboardInterrupt:
                # Not deferred (not the main thread, or a second Ctrl-C): the iteration is half
                # done, so drop it, and keep the last checkpoint rather than saving this state.
                warnings.warn(
                    f"Interrupted during iteration {iteration}; returning the {iteration - 1} iterations before it",
                    stacklevel=2,
                )
                break
            for name, values in record.items():
                history.append(name, **values)
            bar.set_postfix({name: f"{values['test_acc']:.3f}" for name, values in record.items()}, refresh=False)
            bar.update()
            if on_iteration is not None:
                on_iteration(iteration, models)

            at_interval = checkpoint_every is not None and iteration % checkpoint_every == 0
            if checkpoint_path is not None and (at_interval or iteration == iterations or interrupt.is_set()):
                try:
                    _save_checkpoint(checkpoint_path, models, optimizers, samplers, history, drop_warmup_steps)
                except Exception as error:
                    raise CheckpointError(
                        f"could not write the checkpoint {checkpoint_path} after iteration {iteration}: "
                        f"{error}; the history of the {iteration} iterations is attached (.history)",
                        history,
                    ) from error
            if interrupt.is_set():
                warnings.warn(f"Interrupted: stopped after iteration {iteration} of {iterations}", stacklevel=2)
                break
    return history


def _check_arguments(
    iterations: int,
    batch_size: int,
    test_batch_size: int | None,
    checkpoint_path: str | Path | None,
    checkpoint_every: int | None,
    resume_from: str | Path | None,
    drop_warmup_steps: int,
    models: Mapping[str, nn.Module],
) -> None:
    """Refuse bad arguments of train_lockstep before anything runs, naming the value."""
    for name, value, least in (("iterations", iterations, 0), ("batch_size", batch_size, 1),
                               ("test_batch_size", test_batch_size, 1), ("checkpoint_every", checkpoint_every, 1),
                               ("drop_warmup_steps", drop_warmup_steps, 0)):
        if value is None and name in ("test_batch_size", "checkpoint_every"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer of at least {least}, got {value!r}")
    if checkpoint_every is not None and checkpoint_path is None:
        raise ValueError("checkpoint_every needs a checkpoint_path")
    if checkpoint_path is not None:
        folder = Path(checkpoint_path).parent
        if not folder.is_dir():
            raise ValueError(f"checkpoint_path {checkpoint_path}: the folder {folder} does not exist; create it first")
    if resume_from is not None and not Path(resume_from).is_file():
        raise CheckpointError(f"resume_from {resume_from}: no such file")
    if drop_warmup_steps and not _stochastic_depth_states(models):
        raise ValueError(f"drop_warmup_steps={drop_warmup_steps}, but none of the models has stochastic depth")


def _forward_backward(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> dict[str, float]:
    """Loss, accuracy and gradients of one training batch, and the time they took."""
    synchronize(device)  # so that the timer starts when the device is idle
    start = time.perf_counter()
    # set_to_none: parameters a model did not use this step (dropped blocks) keep grad None,
    # and optimizers skip them.
    optimizer.zero_grad(set_to_none=True)
    output = model(images)
    loss = F.cross_entropy(output, labels)
    loss.backward()
    synchronize(device)
    step_time = time.perf_counter() - start
    accuracy = (output.argmax(dim=1) == labels).float().mean()
    return {"train_loss": loss.item(), "train_acc": accuracy.item(), "step_time": step_time}


def _optimizer_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Take the step, and return the time it took.

    Called right after :func:`_forward_backward` or another step, which both end with the
    device idle, so the timer starts without a synchronisation of its own.
    """
    start = time.perf_counter()
    optimizer.step()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
) -> torch.Tensor:
    """Logits of `model` in eval mode: every block runs, each residual scaled by ``p_l``.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; each of its modules has its own mode back afterwards.
    images : torch.Tensor
        Shape (N, C, H, W), on any device: each batch is moved to the model's.
    batch_size : int, optional
        Images per forward pass (all at once by default).
    preprocess : callable, optional
        Applied to each batch on the model's device (normalisation, resizing).
    autocast : context manager, optional
        Entered around each forward pass (``torch.autocast``).

    Returns
    -------
    torch.Tensor
        Shape (N, classes), on the model's device, in the dtype the model computes in.
    """
    device = next(model.parameters()).device
    batches = images.split(batch_size) if batch_size else (images,)
    logits = []
    with evaluation_mode(model):
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits.append(model(preprocess(batch) if preprocess is not None else batch))
    return torch.cat(logits)


def evaluate(model: nn.Module, split: LabelledImages, **options: Any) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction correct) of `model` on `split`, in eval mode.

    `options` are :func:`predict`'s (batch size, preprocessing, autocast).
    """
    logits = predict(model, split.images, **options).float()
    labels = split.labels.to(logits.device)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(dim=1) == labels).float().mean().item()


def synchronize(device: torch.device) -> None:
    """Wait for `device` to finish its queued work (CUDA, MPS); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def _deferred_keyboard_interrupt() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a flag the loop checks between iterations.

    Signal handlers can only be installed from the main thread; elsewhere Ctrl-C stays a
    KeyboardInterrupt. A second Ctrl-C before the loop stops raises it as usual.
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _rng_states(models: Mapping[str, nn.Module]) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "models": {name: state.get_state() for name, state in _stochastic_depth_states(models).items()},
    }


def _set_rng_states(states: Mapping[str, Any], models: Mapping[str, nn.Module]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    model_states = _stochastic_depth_states(models)
    for name, state in states["models"].items():
        model_states[name].set_state(state)


def _stochastic_depth_states(models: Mapping[str, nn.Module]) -> dict[str, StochasticDepthState]:
    """The stochastic-depth state (seed, pass counts, drop warm-up scale) of each model that has one."""
    return {name: stochastic_depth_state(model) for name, model in models.items() if stochastic_depth_gates(model)}


def _save_checkpoint(
    path: str | Path,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    samplers: Mapping[str, BatchSampler],
    history: History,
    drop_warmup_steps: int,
) -> None:
    checkpoint = {
        "drop_warmup_steps": drop_warmup_steps,
        "models": {name: model.state_dict() for name, model in models.items()},
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "samplers": {name: sampler.state_dict() for name, sampler in samplers.items()},
        "rng": _rng_states(models),
        "history": history.to_dict(),
    }
    save_atomically(checkpoint, path)


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save`` `obj` to `path` with :func:`write_atomically`."""
    write_atomically(path, functools.partial(torch.save, obj))


def _load_checkpoint(
    path: str | Path,
    models: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    samplers: Mapping[str, BatchSampler],
    drop_warmup_steps: int,
) -> History:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved_models, history = checkpoint["models"], History.from_dict(checkpoint["history"])
    except Exception as error:
        raise CheckpointError(
            f"cannot resume from {path}: it is not a readable train_lockstep checkpoint "
            f"(truncated or corrupted?): {type(error).__name__}: {error}"
        ) from error
    if set(saved_models) != set(models):
        raise ValueError(f"{path} holds models {sorted(saved_models)}, not {sorted(models)}")
    saved_warmup = checkpoint.get("drop_warmup_steps", 0)
    if saved_warmup != drop_warmup_steps:
        raise ValueError(
            f"{path} was written by a run with drop_warmup_steps={saved_warmup}, "
            f"not {drop_warmup_steps}: resume with drop_warmup_steps={saved_warmup}"
        )
    for name, model in models.items():
        model.load_state_dict(saved_models[name])
        optimizers[name].load_state_dict(checkpoint["optimizers"][name])
    for name, sampler in samplers.items():
        sampler.load_state_dict(checkpoint["samplers"][name])
    _set_rng_states(checkpoint["rng"], models)
    return history
