"""Schedules of the gates' ``drop_scale`` over training (``StochasticDepthState.drop_scale``).

A schedule maps the training step to the fraction of each gate's drop probability
``1 - p_l`` that applies: 1 is the target rate, 0 drops nothing.
"""

from __future__ import annotations

__all__ = ["linear_drop_warmup"]


def linear_drop_warmup(step: int, warmup_steps: int) -> float:
    """``drop_scale`` after `step` training steps of a linear drop warm-up over `warmup_steps`.

    0 at step 0 (no block dropped), rising linearly to 1 (the target drop rates) at
    `warmup_steps` and staying there; 1 throughout when `warmup_steps` is 0.
    """
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be non-negative, got {step} and {warmup_steps}")
    return 1.0 if step >= warmup_steps else step / warmup_steps
