"""What the gate needs from autograd that torch does not offer as it is.

``add_rows``
    ``shortcut`` with ``alpha * source`` added into the rows ``index``: ``Tensor.index_add``
    whose backward keeps only the indices. torch's ``index_add`` saves ``source`` itself for
    its backward (``derivatives.yaml``: ``expand_as(source)``), which in the row modes kept
    every gate's residual of the kept samples alive until the backward pass: more
    activation memory than the unconverted model with its masking drop path.
``conv_on_rows``
    ``conv(x[index])`` whose backward keeps ``x`` rather than the gathered rows. A ResNet
    block's first convolution saves its input for backward; in the plain network that input
    is the previous block's ReLU output, which autograd keeps anyway, but run on the kept
    samples it is a new copy of them, kept alive per block (in a ResNet-50 at drop rate 0.4,
    about 0.14 of the masking model's saved bytes): more activation memory than the model
    being converted. The backward gathers the rows again (cheap) instead.
``select_rows``
    ``x.index_select(0, index)`` in ``x``'s memory layout (channels_last stays so).
``in_backward_pass``
    Whether autograd is running a backward pass in this thread, where activation
    checkpointing recomputes a forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stochastic_depth.compilation import not_a_frame

__all__ = ["add_rows", "conv_on_rows", "in_backward_pass", "is_channels_last", "select_rows"]


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


def is_channels_last(t: Tensor) -> bool:
    """Whether `t` is laid out channels_last, not (also) plainly contiguous: (N, C, H, W) with C fastest."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def select_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(0, index)``, channels_last if `x` is.

    A channels_last ``x`` is gathered as its ``(N, H, W, C)`` view, in which it is plainly
    contiguous (``index_select`` on the NCHW view returns NCHW: a depthwise convolution then
    runs about 3 times slower on the CPU).
    """
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


class _ConvOnRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> Tensor:
        out = F.conv2d(select_rows(x, index), weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, index, weight)
        # Under autocast the convolution ran in out.dtype: the backward casts to it as autocast did.
        ctx.conv = (bias is not None, stride, padding, dilation, groups, out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, index, weight = ctx.saved_tensors
        has_bias, stride, padding, dilation, groups, dtype = ctx.conv
        need_x, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_rows, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad.to(dtype), select_rows(x, index).to(dtype), weight.to(dtype), [weight.shape[0]] if has_bias else None,
            stride, padding, dilation, False, [0] * len(stride), groups, [need_x, need_weight, need_bias],
        )
        grad_x = torch.zeros_like(x).index_add_(0, index, grad_rows.to(x.dtype)) if need_x else None
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(weight.dtype) if need_bias else None
        return grad_x, None, grad_weight, grad_bias, None, None, None, None


# nn.Conv2d's own methods as this module found them: a patched class (a profiler's, a
# quantisation tool's) is then called as it is, like a subclass.
_CONV2D_METHODS = (nn.Conv2d.forward, nn.Conv2d._conv_forward)


def _runs_as_plain_conv2d(conv: nn.Module) -> bool:
    """Whether calling `conv` computes exactly ``F.conv2d`` with its attributes and runs nothing else.

    Not when its class or the module itself (accelerate's ``add_hook_to_module`` sets
    ``module.forward``) replaces ``forward``. torch has no public way to ask whether a module has
    hooks: its hook dictionaries are read here (a hook, pruning's mask or a profiler's, must
    still see the module called).
    """
    hooked = (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks or conv._backward_pre_hooks
              or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
              or nn.modules.module._global_backward_hooks or nn.modules.module._global_backward_pre_hooks)
    replaced = "forward" in conv.__dict__ or "_conv_forward" in conv.__dict__
    return ((type(conv).forward, type(conv)._conv_forward) == _CONV2D_METHODS and not replaced
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str) and not hooked)


def conv_on_rows(conv: nn.Module, x: Tensor, index: Tensor) -> Tensor:
    """``conv(select_rows(x, index))``, saving `x` and `index` for backward instead of the gathered rows.

    For a convolution whose input the network keeps for backward anyway (a ResNet block's
    input, the previous block's ReLU output): there the gathered rows would be an extra copy.
    Where ``x`` would not be kept otherwise, the plain ``conv(select_rows(x, index))`` saves
    less. A module that is not a plain ``nn.Conv2d`` (a subclass or an instance with its own
    forward, other padding modes, one with hooks: pruning, the old ``nn.utils.weight_norm`` and
    ``spectral_norm``) is called as it is, on the gathered rows, and then saves them as before;
    ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``) keeps the saving.

    Parameters
    ----------
    conv : nn.Module
        The convolution, e.g. ``nn.Conv2d``.
    x : Tensor
        ``(B, C, H, W)``.
    index : Tensor
        ``(k,)`` distinct row indices (int64) on `x`'s device.

    Returns
    -------
    Tensor
        ``(k, C_out, H_out, W_out)``. Its backward is made of differentiable operators, so
        double backward (a gradient penalty) works.
    """
    if not _runs_as_plain_conv2d(conv):
        return conv(select_rows(x, index))
    return _ConvOnRows.apply(x, index, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def in_backward_pass() -> bool:
    """Whether this thread is inside an autograd backward pass.

    Uses ``torch._C._current_graph_task_id()`` (-1 outside a backward pass), the one private
    PyTorch API of the gate's rules: it is what ``torch.utils.checkpoint`` itself reads, and
    telling a recomputation from a new forward pass is what lets a checkpointed gate draw its
    pass's decision again. Recomputations happen inside the backward pass, new passes outside.
    """
    return torch._C._current_graph_task_id() != -1


# Called from the gate's eager training pass: not frames for torch.compile to compile (see there).
for _helper in (_AddRows.forward, _AddRows.backward, add_rows, is_channels_last, select_rows, _ConvOnRows.forward,
                _ConvOnRows.backward, _runs_as_plain_conv2d, conv_on_rows):
    not_a_frame(_helper)
