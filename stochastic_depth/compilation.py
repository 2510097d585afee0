"""Regional compilation: ``torch.compile`` the residual branches, the gates left eager."""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from resnet_with_stochastic_depth import _ResidualBlock

__all__ = ["compile_branch", "compile_branches"]


def compile_branches(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation: ``torch.compile`` each residual branch, leaving the gates eager.

    Compiling the whole model makes every gate a graph break and gives dynamo one frame
    per block, which reaches its recompile limit in a deep network and runs the rest
    eagerly. Here only the branches (convolutions, BatchNorms, ReLUs) are compiled, and
    blocks whose branches have the same layers (same class, channels and stride) share
    one compiled function, also across models (a ``ResNet`` and its stochastic twin): a
    ResNet-110 compiles 5 branches, a ResNet-152 8, each with its own dynamo cache, so no
    recompile limit is reached (dynamo's limit counts the variants of one function, and
    parameter shapes are always specialised). The decisions, the gathering of kept
    samples and the shortcut addition run eagerly in between; dropped blocks are still
    skipped. The model can still be pickled whole (``torch.save(model, f)``) and
    deep-copied (an EMA copy): a compiled branch travels as what it was compiled from and
    is compiled again (or found in this process's cache) when it is loaded or copied.

    Parameters
    ----------
    model : torch.nn.Module
        A network with this module's residual blocks (a ``ResNet``, a ``StochasticResNet``
        or a model given ``add_stochastic_depth``), changed in place.
    **options
        Passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        For a model without this module's residual blocks.
    """
    blocks = [m for m in model.modules() if isinstance(m, _ResidualBlock)]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no residual blocks of this module to compile")
    for block in blocks:
        compile_branch(block, options)
    return model


def compile_branch(block: _ResidualBlock, options: Mapping[str, Any]) -> None:
    """Give `block` the compiled branch shared by every block of its layers and these options."""
    layers = tuple(repr(m) for name, m in block.named_children() if name not in ("downsample", "stochastic_depth"))
    block.compiled_branch = _shared_branch(type(block), layers, dict(options))


class CompiledBranch:
    """``torch.compile`` of a block class's ``branch``, called as ``compiled(block, x)``.

    A compiled function holds dynamo's process-local caches and cannot be pickled or
    copied; this object pickles (and deep-copies) as the block class, layers and options it
    was compiled from, and is rebuilt from the process's cache when loaded.
    """

    def __init__(self, kind: type[_ResidualBlock], layers: tuple[str, ...], options: dict[str, Any]) -> None:
        self.kind, self.layers, self.options = kind, layers, options
        self.function = torch.compile(_branch_function(kind, len(_COMPILED_BRANCHES)), **options)

    def __call__(self, block: _ResidualBlock, x: Tensor) -> Tensor:
        return self.function(block, x)

    def __reduce__(self) -> tuple[Callable[..., CompiledBranch], tuple[Any, ...]]:
        return _shared_branch, (self.kind, self.layers, self.options)


def _shared_branch(kind: type[_ResidualBlock], layers: tuple[str, ...], options: dict[str, Any]) -> CompiledBranch:
    """The process's one compiled branch for blocks of `kind` with these `layers` and `options`."""
    key = (kind.__module__, kind.__qualname__, *layers, repr(sorted(options.items())))
    if key not in _COMPILED_BRANCHES:
        _COMPILED_BRANCHES[key] = CompiledBranch(kind, layers, options)
    return _COMPILED_BRANCHES[key]


# Compiled branches by block class, layers and options: models of the same shapes (a ResNet
# and its stochastic twin, a deepcopy) share them, and each is compiled once per process.
_COMPILED_BRANCHES: dict[tuple[str, ...], CompiledBranch] = {}


def _branch_function(kind: type[_ResidualBlock], index: int) -> Callable[[_ResidualBlock, Tensor], Tensor]:
    """``kind.branch`` as a new function with its own code object, hence its own dynamo cache."""
    function = kind.branch
    code = function.__code__.replace(co_name=f"{function.__name__}_{index}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)
