"""The network that is evaluated: its depth at test time, and BatchNorm statistics gathered from it.

A model trained with stochastic depth is evaluated with every residual block running and each
residual scaled by its survival probability ``p_l``. The tools that act on that evaluation network:

``evaluation_mode``
    Eval mode for the length of a ``with`` block, after which every submodule has its own
    mode back (``model.train()`` would also switch frozen submodules to training).

``keep_blocks``
    Evaluate with chosen residual blocks removed. A removed block becomes the identity (its
    output is ``relu(shortcut(x))``, exactly what a block dropped in a training pass outputs);
    kept blocks run as in evaluation. A network trained with stochastic depth loses less
    accuracy from it than a plain one (Veit et al., NeurIPS 2016), so it can be deployed at a
    chosen fraction of its depth for a measured cost.
``recompute_batchnorm_statistics``
    Re-estimate every BatchNorm layer's running mean and variance with the evaluation network.
    While training, BatchNorm statistics are gathered under random depth, whereas evaluation runs
    every block scaled by ``p_l``, so the statistics do not match the network evaluated (the
    "variance shift" of dropout before BatchNorm, Li et al., CVPR 2019).
    ``torch.optim.swa_utils.update_bn`` does not fit: it runs the model in training mode, where
    it samples sub-networks.

``keep_blocks`` works on every network with gates: ``ResNet`` and ``StochasticResNet`` of
``resnet_with_stochastic_depth`` and every family ``add_stochastic_depth`` converts (a
transformer layer is one block of two branches, or two units with ``by="gate"``).
``recompute_batchnorm_statistics`` works on any model with BatchNorm layers (it reads only
them). Both use the gates' evaluation rule, not how gates draw while training.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnet_with_stochastic_depth import BasicBlock, Bottleneck
from stochastic_depth.gate import StochasticDepth
from stochastic_depth.library_blocks import GatedBlock, converted_class

__all__ = ["depth_units", "evaluation_mode", "keep_blocks", "recompute_batchnorm_statistics", "residual_blocks"]


def residual_blocks(model: nn.Module) -> list[BasicBlock | Bottleneck]:
    """The residual blocks of `model` in forward order (``model.modules()`` order), numbered from 0.

    Raises
    ------
    TypeError
        If `model` holds blocks not converted yet (convert it with ``add_stochastic_depth``
        first: ``p_last=1.0`` keeps it plain), or no block of this project's ResNets.
    """
    ours = (BasicBlock, Bottleneck)
    blocks = [m for m in model.modules() if isinstance(m, ours)]
    unconverted = [m for m in model.modules() if not isinstance(m, GatedBlock) and converted_class(type(m)) is not None]
    if unconverted:
        raise TypeError(
            f"{type(model).__name__} has {len(unconverted)} residual blocks not converted yet "
            f"({type(unconverted[0]).__module__}.{type(unconverted[0]).__name__}): convert it with "
            "add_stochastic_depth(model) first (p_last=1.0 keeps it a plain network)"
        )
    if not blocks:
        raise TypeError(
            f"{type(model).__name__} has no residual blocks of resnet_with_stochastic_depth (BasicBlock, Bottleneck); "
            "depth_units and keep_blocks number the blocks of any network converted by add_stochastic_depth"
        )
    return blocks


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode inside the block; afterwards each submodule has its own mode back.

    ``model.eval()`` then ``model.train()`` would also switch to training the submodules
    that were in eval mode before (a frozen BatchNorm, a teacher): this puts back the mode
    each module had, whatever the block raised.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        _restore_modes(modes)


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _set_gate(block: nn.Module, name: str, gate: StochasticDepth | None, had_child: bool) -> None:
    """Put `gate` on `block` as `name`; None puts back a plain block exactly as it was built (an attribute, no child)."""
    if gate is not None or had_child:
        setattr(block, name, gate)
    else:
        # nn.Module.__setattr__ would keep a None child entry; a plain block has a plain attribute.
        block._modules.pop(name, None)
        block.__dict__[name] = None


def depth_units(model: nn.Module, by: str = "block") -> list[list[tuple[nn.Module, str]]]:
    """What :func:`keep_blocks` numbers: each unit a list of (block, gate attribute) pairs, in forward order.

    ``by="block"``: one unit per residual block, with all its gates (a transformer layer's
    attention and MLP branches together); this project's ResNets (also plain ones, whose blocks
    hold no gate yet) are numbered as :func:`residual_blocks` numbers them. ``by="gate"``: one
    unit per gate, in ``stochastic_depth_gates`` order (the same as by block where a block has one
    gate).

    Raises
    ------
    TypeError
        For a model whose blocks cannot be numbered (see :func:`residual_blocks`); ValueError
        for another `by`.
    """
    if by not in ("block", "gate"):
        raise ValueError(f"by must be 'block' or 'gate', got {by!r}")
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        blocks: list[nn.Module] = residual_blocks(model)
    else:
        blocks = [m for m in model.modules() if isinstance(m, GatedBlock) and m.gated]
        if not blocks:
            residual_blocks(model)  # raises the error that says what to do
    units = [[(block, name) for name in type(block).GATES] for block in blocks]
    return units if by == "block" else [[pair] for unit in units for pair in unit]


@contextlib.contextmanager
def keep_blocks(model: nn.Module, keep: Iterable[int], *, unscaled: bool = False, by: str = "block") -> Iterator[nn.Module]:
    """Evaluate `model` with only the residual blocks (or branches) `keep`; the others' branches are not computed.

    Inside the ``with`` block the model is in eval mode and each residual branch of a kept
    unit runs as the evaluation network runs it (``shortcut + p_l * branch(x)``; ``p_l = 1`` for a
    plain block and for a gate with ``inverted=True``), while each branch of a removed unit is
    not computed at all, exactly as a branch dropped in a training pass: a ResNet block outputs
    ``relu(shortcut(x))``, a transformer layer its input. A removed unit saves its inference
    time.

    It works on every network with gates (this project's ResNets, plain ones too, and every
    family ``add_stochastic_depth`` converts). The gates, modes and weights are restored on exit
    (also on an error); nothing is copied.

    Parameters
    ----------
    model : torch.nn.Module
        A ``ResNet`` or ``StochasticResNet`` of this project, or a model converted by
        ``add_stochastic_depth``.
    keep : iterable of int
        Indices in ``[0, L)`` of the units to keep, ``L = len(depth_units(model, by))``. All of
        them: the model's own evaluation output, bit for bit. The usual choices: the last ``k``
        removed, ``range(L - k)``; every other one, ``range(0, L, 2)``.
    unscaled : bool
        Add the kept branches unscaled (factor 1) instead of by ``p_l``: the sub-network that a
        training pass of the paper's gate runs when it draws exactly these blocks.
    by : {"block", "gate"}
        Number residual blocks (a transformer layer: both its branches) or single gates; see
        :func:`depth_units`.

    Yields
    ------
    torch.nn.Module
        `model` itself.

    Raises
    ------
    ValueError
        If an index is not an integer in ``[0, L)``.
    TypeError
        As :func:`depth_units`.

    Examples
    --------
    >>> model = StochasticResNet.cifar(110)  # 54 blocks; load trained weights here
    >>> with keep_blocks(model, range(40)):  # the last 14 blocks (lowest p_l) removed
    ...     logits = model(images)
    """
    units = depth_units(model, by)
    kept = set()
    for k in keep:
        try:  # any integer: Python's, numpy's, a 0-d integer tensor
            index = None if isinstance(k, bool) else operator.index(k)
        except TypeError:
            index = None
        if index is None or not 0 <= index < len(units):
            raise ValueError(f"keep must hold integer indices in [0, {len(units)}), got {k!r}")
        kept.add(index)
    pairs = [pair for unit in units for pair in unit]
    saved = [(block, name, getattr(block, name), name in block._modules) for block, name in pairs]
    with evaluation_mode(model), contextlib.ExitStack() as restore:
        restore.callback(lambda: [_set_gate(block, name, gate, had_child) for block, name, gate, had_child in saved])
        for index, unit in enumerate(units):
            for block, name in unit:
                if index not in kept:
                    gate = StochasticDepth(survival_prob=0.0, seed=0)  # eval mode, p = 0: the shortcut alone (seed: never drawn from)
                elif unscaled:
                    gate = StochasticDepth(survival_prob=1.0, seed=0)  # eval mode, p = 1: shortcut + branch
                else:
                    continue  # the branch as the evaluation network runs it
                gate.eval()
                _set_gate(block, name, gate, had_child=True)
        yield model


def _batches(images: Tensor | Iterable, batch_size: int | None) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        if images.dim() < 2 or len(images) == 0:
            raise ValueError(f"images must be a non-empty batch (N, C, ...), got shape {tuple(images.shape)}")
        yield from (images,) if batch_size is None else images.split(batch_size)
        return
    for item in images:
        batch = item[0] if isinstance(item, (tuple, list)) else item  # (images, labels) from a DataLoader
        if not isinstance(batch, Tensor):
            raise TypeError(f"the loader must yield tensors or (images, labels) pairs, got {type(batch).__name__}")
        yield batch


@torch.no_grad()
def recompute_batchnorm_statistics(
    model: nn.Module, images: Tensor | Iterable, *, batch_size: int | None = None
) -> nn.Module:
    """Re-estimate the running mean and variance of every BatchNorm layer in the evaluation network.

    The model runs in eval mode (every residual block, scaled by ``p_l``: no sub-network is
    sampled). Each BatchNorm layer gets as running statistics the mean and the unbiased
    variance, per channel, of its input over all the images given, and normalises with them
    in the same pass, so that the layers after it see what they will see in evaluation. With
    the images in one batch (a tensor and ``batch_size=None``, the default) this is exact:
    afterwards every layer's running statistics are the batch statistics of its input in the
    evaluation network that uses them. Over several batches each batch is normalised by its
    own statistics on the way and the layers' statistics are pooled over all batches (as
    "precise BatchNorm"), an approximation that improves with the batch size.

    Only the running means and variances change: weights, ``num_batches_tracked``, momentum
    and every module's training mode are as they were. Layers without running statistics
    (``track_running_stats=False``) are left alone.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; its BatchNorm layers are found among its modules.
    images : torch.Tensor or iterable
        Network inputs (preprocessed as for the model, training images, no augmentation needed):
        a tensor (N, C, H, W), or an iterable (a ``DataLoader``) of such tensors or of
        ``(images, labels)`` pairs. Batches are moved to the device of the model's parameters.
    batch_size : int, optional
        Split a tensor into batches of this size (less memory, approximate as said above).

    Returns
    -------
    torch.nn.Module
        `model` itself.

    Raises
    ------
    ValueError
        If the model has no BatchNorm layer with running statistics, if no image is given, or
        if `batch_size` is not positive.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics to re-estimate")
    device = next(model.parameters()).device
    # Per layer: count, float64 sums of x and x^2 per channel over all batches.
    totals: dict[nn.Module, list] = {layer: [0, 0.0, 0.0] for layer in layers}

    def gather(layer: _BatchNorm, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError(f"a BatchNorm layer got {n} value per channel: give more images or a larger batch_size")
        mean = x.mean(dims)
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(x.var(dims, correction=1))  # this batch normalised by its own statistics
        total = totals[layer]
        x64 = x.double()
        total[0] += n
        total[1] = total[1] + x64.sum(dims)
        total[2] = total[2] + x64.square().sum(dims)

    before = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    handles = [layer.register_forward_pre_hook(gather) for layer in layers]
    passes = 0
    try:
        with evaluation_mode(model):
            for batch in _batches(images, batch_size):
                model(batch.to(device))
                passes += 1
        if passes == 0:
            raise ValueError("no images given: the loader yielded no batch")
        for layer, (n, sums, squares) in totals.items():
            if n == 0:
                raise ValueError(f"BatchNorm layer {layer} did not run in the evaluation network")
            if passes > 1:  # (after one pass the layer holds its statistics as it normalised with them)
                mean = sums / n
                layer.running_mean.copy_(mean)
                layer.running_var.copy_((squares - n * mean.square()) / (n - 1))
    except BaseException:
        for layer, (mean, var) in zip(layers, before):  # a failed re-estimation leaves the model as it was
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        raise
    finally:
        for handle in handles:
            handle.remove()
    return model
