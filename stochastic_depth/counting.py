"""What a training step computes: FLOP floors and operator counts.

``training_flop_floor`` (``ResNet``s) and ``gate_flop_floor`` (any model with gates) give
the fraction of a plain training step's FLOPs that stochastic depth still computes: the
step-time ratio that skipping dropped blocks can reach when time follows FLOPs.
``training_operator_count`` counts a step's operators on the device (GPU kernel launches)
and on the host, which bound a small network's step on a GPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from resnet_with_stochastic_depth import ResNet
from stochastic_depth.gate import StochasticDepth, subset_size

__all__ = ["gate_flop_floor", "training_flop_floor"]


def training_flop_floor(model: ResNet, images: Tensor, labels: Tensor, probabilities: Sequence[float]) -> dict[str, float]:
    """Expected fraction of a plain training step's FLOPs that stochastic depth still computes.

    Counts the forward and backward FLOPs of one cross-entropy training step of `model`
    (a plain ``ResNet``, or a stochastic one in eval mode) with ``torch.utils.flop_counter``.
    A block's skippable work is its branch, everything but its projection shortcut; the
    stem, the shortcuts and the classifier always run. The floor is
    ``(fixed + sum p_l work_l) / (fixed + sum work_l)``: the step-time ratio that skipping
    dropped blocks can reach when time follows FLOPs.

    Parameters
    ----------
    model : ResNet
        The network to count; its gradients are left set by the counted step.
    images, labels : torch.Tensor
        One batch, on the model's device.
    probabilities : sequence of float
        ``p_l`` for each residual block of `model`, in forward order.

    Returns
    -------
    dict
        ``total_gflop`` (a plain step), ``fixed_gflop`` (work no block can skip) and
        ``floor`` (the expected fraction).
    """
    blocks = model.blocks
    if len(probabilities) != len(blocks):
        raise ValueError(f"expected {len(blocks)} survival probabilities, one per block, got {len(probabilities)}")
    counts, total = _counted_step(model, images, labels, FlopCounterMode(display=False))
    names = [name for name, m in model.named_modules() if m in blocks]
    block_work = [counts.get(n, 0) - counts.get(n + ".downsample", 0) for n in names]
    return _floor(total, block_work, probabilities)


def _counted_step(model: nn.Module, images: Tensor, labels: Tensor, counter: FlopCounterMode) -> tuple[dict[str, int], int]:
    """FLOPs of one cross-entropy training step of `model`: by module (``named_modules`` names) and in total."""
    with counter:
        F.cross_entropy(model(images), labels).backward()
    prefix = type(model).__name__ + "."  # how FlopCounterMode names the model's submodules
    counts = {name.removeprefix(prefix): sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counts, counter.get_total_flops()


def _floor(total: int, work: Sequence[int], fractions: Sequence[float]) -> dict[str, float]:
    """The floor ``(fixed + sum q w) / total`` of a step of `total` FLOPs whose parts `work` run with fractions `fractions`."""
    fixed = total - sum(work)
    expected = fixed + sum(q * w for q, w in zip(fractions, work))
    return {"total_gflop": total / 1e9, "fixed_gflop": fixed / 1e9, "floor": expected / total}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, out_shape=None) -> int:
    """FLOPs of a convolution's backward pass: per gradient asked for, as many as its forward.

    torch 2.14's formula leaves out ``groups`` in the backward pass: it counts a
    depthwise convolution's backward (ConvNeXt's, EfficientNet's) as ``channels`` times
    too much (a 3x3 depthwise conv of 64 channels: 65 times its forward instead of 2;
    pytorch/pytorch#183405 took up the groups in these formulas). The forward is
    ``2 * (output elements) * (in_channels / groups) * kernel size``.
    """
    if transposed:  # not in these networks: torch's own formula
        return flop_counter.conv_backward_flop(
            grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups,
            output_mask, out_shape,
        )
    forward = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter_mode() -> FlopCounterMode:
    """``FlopCounterMode`` with grouped convolutions' backward counted right."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def gate_flop_floor(
    model: nn.Module, images: Tensor, labels: Tensor, fractions: Sequence[float] | None = None
) -> dict[str, float]:
    """Expected fraction of a training step's FLOPs that a model with gates still computes.

    ``training_flop_floor`` for any model converted by ``add_stochastic_depth`` (any of
    the blocks above, or ResNets): counts the forward and backward FLOPs of one
    cross-entropy training step with ``torch.utils.flop_counter`` on an eval-mode copy,
    where every gate runs its branch, so that the total is the unconverted model's
    (a masking drop path costs one multiplication per element, no FLOPs counted). A
    gate's skippable work is what runs inside it (its branch, forward and backward);
    the stem, shortcuts, downsampling layers, classifier, and the blocks without a gate
    always run. The floor is ``(fixed + sum q_g work_g) / (fixed + sum work_g)``: the
    step-time ratio that skipping can reach when time follows FLOPs. timm's fused
    attention is counted through its unfused form (the same matrix products), which
    ``FlopCounterMode`` sees on every device; a grouped convolution's backward pass is
    counted as twice its forward (torch's formula leaves out the groups).

    Parameters
    ----------
    model : torch.nn.Module
        A converted model; it is copied, not changed.
    images, labels : torch.Tensor
        One batch, on the model's device.
    fractions : sequence of float, optional
        ``q_g`` of each gate in ``stochastic_depth_gates`` order: the expected fraction
        of the batch its branch runs on. By default ``survival_prob`` in ``"batch"`` and
        ``"row"`` mode and ``k / B`` (``k = round(B p)``, at least 1) in ``"row_subset"``.

    Returns
    -------
    dict
        ``total_gflop`` (a step with every branch), ``fixed_gflop`` (the work no gate
        can skip) and ``floor`` (the expected fraction), GFLOP = 1e9 FLOPs.

    Raises
    ------
    ValueError
        Without gates, or with a number of fractions other than the number of gates.
    """
    twin = copy.deepcopy(model).eval()
    for module in twin.modules():
        if hasattr(module, "fused_attn"):  # timm: count q k^T and attn v as matrix products
            module.fused_attn = False
    names = {gate: name for name, gate in twin.named_modules() if isinstance(gate, StochasticDepth)}
    if not names:
        raise ValueError(f"{type(model).__name__} has no stochastic-depth gates: convert it with add_stochastic_depth")
    gates = list(names)
    if fractions is None:
        batch = images.shape[0]
        fractions = [
            subset_size(batch, g.survival_prob) / batch if g.mode == "row_subset" else g.survival_prob for g in gates
        ]
    if len(fractions) != len(gates):
        raise ValueError(f"expected {len(gates)} fractions, one per gate, got {len(fractions)}")
    counts, total = _counted_step(twin, images, labels, flop_counter_mode())
    return _floor(total, [counts.get(names[g], 0) for g in gates], fractions)
