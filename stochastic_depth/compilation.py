"""Regional compilation: ``torch.compile`` the residual branches, the gates left eager."""

from __future__ import annotations

from typing import Any

from torch import nn

from resnet_with_stochastic_depth import _ResidualBlock, stochastic_depth_gates
from stochastic_depth.gate import CompileOptions

__all__ = ["compile_branches"]


def compile_branches(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation: ``torch.compile`` each residual branch, leaving the gates eager.

    Every gate of `model` (and every block of this project's ResNets without one: a plain
    ``ResNet``'s) runs its branch, and a ResNet block its downsampling shortcut, as a region
    compiled with `options` (``stochastic_depth.gate.compiled_region``). Branches of one
    kind (the same code, modules of the same class and parameter shapes: one branch of the
    blocks of one stage) share one compiled function, also across models (a ``ResNet`` and
    its stochastic twin, an EMA copy): a ResNet-110 compiles 5 branches, a ResNet-152 8 and
    4 shortcuts, a ViT 2, each with its own dynamo cache, so no recompile limit is reached.
    In the row modes the kept samples are a new batch size at every gate and step, and the
    regions are compiled for any batch size. The decisions, the gathering of kept samples
    and the shortcut addition run eagerly in between; dropped branches are still skipped.

    It works on every converted family (torchvision's ResNet, ConvNeXt, Swin and
    EfficientNet, timm's ViT, ConvNeXt and ResNet) and on this project's ResNets. The
    model pickles and deep-copies as before: the gates hold the options only, and a copy
    finds the compiled regions in this process's cache or compiles them again.
    ``torch.compile(model)`` of the whole model works too (the same regions, compiled with
    the model's options); ``compile_branches`` leaves the stem, the head and the
    downsampling layers between stages eager.

    Parameters
    ----------
    model : torch.nn.Module
        A network with stochastic-depth gates, or a ``ResNet`` of this project; changed in place.
    **options
        Passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        For a model with neither gates nor this project's residual blocks.
    """
    gates = stochastic_depth_gates(model)
    plain_blocks = [m for m in model.modules() if isinstance(m, _ResidualBlock) and m.stochastic_depth is None]
    if not gates and not plain_blocks:
        raise TypeError(
            f"{type(model).__name__} has no stochastic-depth gates and no residual blocks of this project to "
            "compile: convert it with add_stochastic_depth first, or torch.compile it as it is"
        )
    shared = CompileOptions(options)  # (one object: copies of the model share it, see there)
    for holder in (*gates, *plain_blocks):
        holder.compile_options = shared
    return model
