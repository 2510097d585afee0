"""Schedules of the gates' ``drop_scale`` over training (``StochasticDepthState.drop_scale``).

A schedule maps the training step to the fraction of each gate's drop probability
``1 - p_l`` that applies: 1 is the target rate, 0 drops nothing. Set it before each step,
``stochastic_depth_state(model).drop_scale = early_drops(step, drop_steps)``; a function of the step
alone, so a resumed run continues it. In eval mode a gate scales its residual by the survival
probability in force, ``1 - drop_scale * (1 - p_l)``.

- :func:`linear_drop_warmup`: from 0 up to 1 (fewer drops at first);
- :func:`early_drops`: 1, then 0 (Liu et al. 2023's early stochastic depth, against underfitting);
- :func:`late_drops`: 0, then 1 (their late stochastic depth, against overfitting).
"""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["early_drops", "late_drops", "linear_drop_warmup"]


def linear_drop_warmup(step: int, warmup_steps: int) -> float:
    """``drop_scale`` after `step` training steps of a linear drop warm-up over `warmup_steps`.

    0 at step 0 (no block dropped), rising linearly to 1 (the target drop rates) at
    `warmup_steps` and staying there; 1 throughout when `warmup_steps` is 0.
    """
    _check_steps(step, warmup_steps, "warmup_steps")
    return 1.0 if step >= warmup_steps else step / warmup_steps


def early_drops(step: int, drop_steps: int) -> float:
    """``drop_scale`` after `step` training steps of early stochastic depth: the target rates for `drop_steps` steps.

    1 (the target drop rates) for steps ``0 .. drop_steps - 1``, then 0 (no block dropped) for the rest
    of training: Liu et al.'s "early dropout" (2023) applied to stochastic depth, for models that
    underfit. With the model in eval mode the gates scale each residual by the survival probability
    in force (see ``StochasticDepth``): after this schedule, 1, every block at full strength, as
    the last training steps ran them.
    """
    _check_steps(step, drop_steps, "drop_steps")
    return 1.0 if step < drop_steps else 0.0


def late_drops(step: int, drop_from: int) -> float:
    """``drop_scale`` after `step` training steps of late stochastic depth: none before step `drop_from`.

    0 (no block dropped) for steps ``0 .. drop_from - 1``, then 1 (the target drop rates) for the
    rest of training: Liu et al.'s "late" schedule (2023), for models that overfit. Evaluation
    after it scales each residual by ``p_l``, as with drops throughout.
    """
    _check_steps(step, drop_from, "drop_from")
    return 0.0 if step < drop_from else 1.0


def _check_steps(step: Any, steps: Any, name: str) -> None:
    """Both numbers of steps are non-negative integers (int, numpy's, a 0-d integer tensor)."""
    for value, what in ((step, "step"), (steps, name)):
        try:
            number = None if isinstance(value, bool) else operator.index(value)
        except TypeError:
            number = None
        if number is None or number < 0:
            fraction = " (a fraction of training? multiply it by the number of training steps)" \
                if isinstance(value, float) and 0 < value < 1 else ""
            raise (TypeError if number is None else ValueError)(
                f"{what} must be a non-negative integer number of steps, got {value!r}{fraction}"
            )
