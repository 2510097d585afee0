"""What the gate needs from autograd that torch does not offer as it is.

``add_rows``
    ``shortcut`` with ``alpha * source`` added into the rows ``index``: ``Tensor.index_add``
    whose backward keeps only the indices. torch's ``index_add`` saves ``source`` itself for
    its backward (``derivatives.yaml``: ``expand_as(source)``), which in the row modes kept
    every gate's residual of the kept samples alive until the backward pass: more
    activation memory than the unconverted model with its masking drop path.
``in_backward_pass``
    Whether autograd is running a backward pass in this thread, where activation
    checkpointing recomputes a forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stochastic_depth.compilation import not_a_frame

__all__ = ["add_rows", "in_backward_pass"]


class _AddRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shortcut: Tensor, index: Tensor, source: Tensor, alpha: float) -> Tensor:
        ctx.save_for_backward(index)
        ctx.alpha = alpha
        return shortcut.index_add(0, index, source, alpha=alpha)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        (index,) = ctx.saved_tensors
        grad_source = grad.index_select(0, index) if ctx.needs_input_grad[2] else None
        if grad_source is not None and ctx.alpha != 1.0:
            grad_source = grad_source * ctx.alpha
        return (grad if ctx.needs_input_grad[0] else None), None, grad_source, None


def add_rows(shortcut: Tensor, index: Tensor, source: Tensor, alpha: float = 1.0) -> Tensor:
    """``shortcut.index_add(0, index, source, alpha=alpha)``, saving only `index` for backward.

    Parameters
    ----------
    shortcut : Tensor
        ``(B, ...)``; not changed.
    index : Tensor
        ``(k,)`` distinct row indices (int64) on `shortcut`'s device.
    source : Tensor
        ``(k, ...)``, the rows to add, of `shortcut`'s dtype.
    alpha : float
        The factor of `source`.

    Returns
    -------
    Tensor
        A new ``(B, ...)`` tensor.
    """
    return _AddRows.apply(shortcut, index, source, alpha)


# Called from the gate's eager training pass: not frames for torch.compile to compile (see there).
for _helper in (_AddRows.forward, _AddRows.backward, add_rows):
    not_a_frame(_helper)


def in_backward_pass() -> bool:
    """Whether this thread is inside an autograd backward pass.

    Uses ``torch._C._current_graph_task_id()`` (-1 outside a backward pass), the one private
    PyTorch API of the gate's rules: it is what ``torch.utils.checkpoint`` itself reads, and
    telling a recomputation from a new forward pass is what lets a checkpointed gate draw its
    pass's decision again. Recomputations happen inside the backward pass, new passes outside.
    """
    return torch._C._current_graph_task_id() != -1
