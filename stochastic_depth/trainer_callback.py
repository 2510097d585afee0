"""``StochasticDepthCallback``: stochastic depth in Hugging Face's ``transformers.Trainer``.

::

    from stochastic_depth import add_stochastic_depth
    from stochastic_depth.trainer_callback import StochasticDepthCallback

    add_stochastic_depth(model, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[StochasticDepthCallback()])

Needs ``transformers`` and ``accelerate`` (which the Trainer needs); neither is a dependency of
the package, and ``import stochastic_depth`` imports neither. Import this module on its own.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from stochastic_depth.gate import set_step, stochastic_depth_gates, stochastic_depth_state

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as error:
    raise ImportError(
        "stochastic_depth.trainer_callback needs Hugging Face transformers, and its Trainer needs accelerate: "
        "pip install 'transformers>=5,<6' 'accelerate>=1.1,<2'"
    ) from error

__all__ = ["StochasticDepthCallback"]


class StochasticDepthCallback(TrainerCallback, ExportableState):
    """Keys a ``transformers.Trainer``'s drops by its optimizer step, and saves the gates' state in its checkpoints.

    ``Trainer(..., callbacks=[StochasticDepthCallback()])``, for a model converted with
    :func:`stochastic_depth.add_stochastic_depth` (or one with gates of its own). It adds no
    hook to the model and communicates nothing; what it does, by the Trainer's events:

    ``on_train_begin``
        Checks that the model has gates (TypeError otherwise). In a run resumed from a
        checkpoint (``trainer.train(resume_from_checkpoint=...)``) it restores the gates'
        state saved there: their seed (a model converted with ``seed=None`` draws a new one
        each time it is built), ``drop_scale``, step and pass count. The resumed run then draws,
        at every step, what the uninterrupted run drew.
    ``on_step_begin``
        ``set_step(model, state.global_step)``: the drops of this optimizer step are a function
        of (seed, gate, step) alone. The Trainer calls it before the first micro-batch of each
        optimizer step, with ``global_step`` the optimizer steps taken so far (0 at the first).
    ``state()`` (the Trainer's ``ExportableState``)
        The gates' state (:meth:`stochastic_depth.StochasticDepthState.get_state`, plain JSON),
        which the Trainer writes into each checkpoint's ``trainer_state.json`` under
        ``stateful_callbacks["StochasticDepthCallback"]["gates"]``.

    The state is read back from the resumed ``TrainerState`` itself, so it is restored whether or
    not ``TrainingArguments(restore_callback_states_from_checkpoint=...)`` is set (it is False by
    default, and True replaces this callback by a new one built from the checkpoint's ``args``).
    A checkpoint saved without this callback holds no gate state: the resumed run then warns
    unless every gate's seed was given explicitly (``seed=`` at conversion), with which the
    drops resume exactly anyway, ``set_step`` keying them by the step. A ``drop_scale`` schedule
    set from ``state.global_step`` in a callback of your own resumes exactly too.

    Gradient accumulation: by default the micro-batches of one optimizer step share its
    key, as one mini-batch does in the paper. In ``"batch"`` mode they run one sub-network;
    in the row modes each micro-batch (a training pass of the step, numbered from 0) draws its
    own samples, a function of (seed, gate, step, micro-batch, process). With
    ``per_micro_batch=True`` each micro-batch gets its own key instead,
    ``set_step(model, global_step, i)`` for micro-batch ``i``: its own sub-network in
    ``"batch"`` mode. The callback counts the micro-batches itself: the Trainer calls
    ``on_substep_end`` after each micro-batch but the last of a step, and ``on_step_begin``
    before the first.

    Distributed training (DDP through accelerate): the callback gets ``trainer.model``, the
    unwrapped model, not the ``DistributedDataParallel`` around it (under FSDP, the wrapped
    one); ``set_step`` reaches the gates through either. Every process
    keys its drops by the same ``global_step``, so in ``"batch"`` mode every process drops the
    same branches if their gates' seeds are equal: convert the model with ``seed=`` (or after the
    same ``torch.manual_seed`` on every process). A resumed run restores the same seed on every
    process (each reads the checkpoint's ``trainer_state.json``). DDP must look for unused
    parameters, since a dropped branch has no gradients: the Trainer passes
    ``find_unused_parameters=True`` unless ``TrainingArguments(ddp_find_unused_parameters=False)``
    or a ``PreTrainedModel`` with gradient checkpointing on (then set it to True).

    Parameters
    ----------
    per_micro_batch : bool
        Give each micro-batch of an optimizer step its own key (see above); False by default.
    """

    def __init__(self, per_micro_batch: bool = False) -> None:
        if not isinstance(per_micro_batch, bool):
            raise TypeError(f"per_micro_batch must be True or False, got {per_micro_batch!r}")
        self.per_micro_batch = per_micro_batch
        self._model: nn.Module | None = None
        self._micro_batch = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        gates = stochastic_depth_gates(model) if isinstance(model, nn.Module) else []
        if not gates:
            raise TypeError(
                f"StochasticDepthCallback: the Trainer's model ({type(model).__name__}) has no StochasticDepth gates, "
                "so there is nothing to drop. Convert the model before building the Trainer: "
                "stochastic_depth.add_stochastic_depth(model, seed=0); or leave the callback out."
            )
        self._model = model
        if state.global_step > 0:  # resumed from a checkpoint (a new run starts at 0)
            name = type(self).__name__
            saved = _saved_gate_state(state.stateful_callbacks, name)
            if saved is not None:
                stochastic_depth_state(model).set_state(saved)
                return control
            # The Trainer's next save would raise KeyError for a stateful callback missing from the
            # resumed state (it replaces only existing entries): give this one its entry.
            state.stateful_callbacks.setdefault(name, self.state())
            if not all(gate.seed_given for gate in gates):
                warnings.warn(
                    f"StochasticDepthCallback: training resumes at step {state.global_step} from a checkpoint "
                    "without the gates' state (saved without this callback), and the model was converted with "
                    "seed=None: its gates drew a new random seed, so the drops differ from the original run's. "
                    "Convert the model with the same seed= as the original run for exact drops.",
                    stacklevel=2,
                )
        return control

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._micro_batch = 0
        if self.per_micro_batch:
            set_step(model, state.global_step, 0)
        else:
            set_step(model, state.global_step)
        return control

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        # After each micro-batch of a step but the last: the next one is micro-batch _micro_batch.
        self._micro_batch += 1
        if self.per_micro_batch:
            set_step(model, state.global_step, self._micro_batch)
        return control

    def state(self) -> dict[str, Any]:
        """What the Trainer saves in ``trainer_state.json``: the arguments, and the gates' state
        (None before training, when the callback has not seen the model yet)."""
        gates = None if self._model is None else stochastic_depth_state(self._model).get_state()
        return {"args": {"per_micro_batch": self.per_micro_batch}, "attributes": {}, "gates": gates}


def _saved_gate_state(stateful_callbacks: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The gates' state that a checkpoint's ``stateful_callbacks`` holds for this callback, or None."""
    saved = (stateful_callbacks or {}).get(name)
    # Several callbacks of one class are saved as a list, to which each save appends: the last is the newest.
    entries = saved if isinstance(saved, list) else [saved]
    states = [entry.get("gates") for entry in entries if isinstance(entry, dict) and entry.get("gates") is not None]
    return states[-1] if states else None
