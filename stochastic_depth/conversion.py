"""Converting a network: ``add_stochastic_depth`` gives its residual blocks gates, in place.

Every block kind is converted by one mechanism: ``stochastic_depth.library_blocks``
registers a gated class for each library class it converts (torchvision's and timm's
blocks there, torchvision's ResNet blocks in ``resnet_with_stochastic_depth``), and a
converted block is an instance of that class holding the very same submodules, parameters,
buffers and hooks, with one gate per residual branch where the drop paths were. Everything
is checked, and every converted block built, before the model is changed.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import nn
from torchvision.models import efficientnet as tv_efficientnet
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

try:  # timm is optional
    from timm.layers import DropPath
except ImportError:
    DropPath = None

from stochastic_depth.gate import (
    DropMode,
    StochasticDepth,
    SurvivalRule,
    check_mode,
    seed_or_random,
    survival_probabilities,
)
from stochastic_depth.hugging_face import FAMILIES, REFUSED
from stochastic_depth.layer_drop import StackConversion, layer_drop_stacks, stop_stack_draws
from stochastic_depth.library_blocks import GatedBlock, converted_class, supported_blocks

__all__ = ["BlockConversion", "add_stochastic_depth", "block_conversions"]

_DROP_PATH_TYPES: tuple[type[nn.Module], ...] = (TorchvisionStochasticDepth,) + (() if DropPath is None else (DropPath,))


class BlockConversion(NamedTuple):
    """One residual block that ``add_stochastic_depth`` converts.

    ``parent`` holds the block as its child ``name``; ``block`` is the converted block
    to put there (the same object when it is converted already), holding the very
    same submodules, with ``None`` in place of each gate named in ``gate_names`` (in
    forward order) until the caller sets the gates. ``drop_probs``: the drop
    probability of each gate's branch in the unconverted model, one per gate, or None
    when the block has none of its own (the ResNets).
    """

    parent: nn.Module
    name: str
    block: nn.Module
    gate_names: tuple[str, ...]
    drop_probs: tuple[float, ...] | None
    also: tuple[tuple[nn.Module, str], ...] = ()  # the other (parent, name) places of a block used twice
    stack: StackConversion | None = None  # a layer of a transformers stack with LayerDrop: the stack


# Drop-path classes of other libraries, known by name (Hugging Face's ConvNextDropPath,
# Dinov2DropPath, BeitDropPath, ...; fairseq's LayerDrop is a list, not a path).
_DROP_PATH_NAME = re.compile(r"drop_?path|stochastic_?depth", re.IGNORECASE)


def _is_hugging_face(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _is_drop_path(module: nn.Module) -> bool:
    """Whether `module` masks a residual branch: torchvision's or timm's class, or a class named like one."""
    if isinstance(module, StochasticDepth):  # a gate: already converted
        return False
    return isinstance(module, _DROP_PATH_TYPES) or any(_DROP_PATH_NAME.search(c.__name__) for c in type(module).__mro__)


# ----------------------------------------------------------------------------------
# Finding and converting blocks
# ----------------------------------------------------------------------------------


def _drop_prob(block: nn.Module, block_name: str, attribute: str) -> float:
    """The drop probability of the module `block` holds as `attribute` (a drop path, a gate or nothing)."""
    module = getattr(block, attribute, None)
    if module is None or isinstance(module, nn.Identity):  # timm's choice for a rate of 0
        return 0.0
    if isinstance(module, StochasticDepth):  # converted already: keep its rate
        return 1.0 - module.survival_prob
    if isinstance(module, TorchvisionStochasticDepth):
        return float(module.p)
    if DropPath is not None and isinstance(module, DropPath):
        if not module.scale_by_keep:
            raise TypeError(
                f"{block_name}.{attribute} is a DropPath with scale_by_keep=False, which scales the kept "
                "branches neither while training nor at test time: the gates scale by 1 / (1 - p) while "
                "training (or by 1 - p at test time), so the converted model would not compute what this one "
                "does; build the model with scale_by_keep=True (timm's default)"
            )
        return float(module.drop_prob)
    if _is_hugging_face(module) and _is_drop_path(module):  # transformers' *DropPath: timm's code, per sample, inverted
        return float(module.drop_prob)
    raise TypeError(
        f"{block_name}.{attribute} is a {type(module).__name__}, not a drop-path module "
        "(torchvision.ops.StochasticDepth, timm.layers.DropPath, nn.Identity or None)"
    )


def _converted(block: nn.Module, kind: type[GatedBlock]) -> nn.Module:
    """A `kind` block holding the very same submodules, parameters and buffers as `block`.

    `block` itself is left unchanged; the drop-path attributes of the new block are
    removed and its gate attributes are None, in the drop paths' place among the children.
    """
    converted = kind.__new__(kind)
    # The very same attribute objects, the dicts of parameters, buffers and hooks included (a hook
    # handle the user holds still removes its hook), except the children, which change.
    converted.__dict__.update(block.__dict__)
    for old in kind.DROP_PATHS:
        converted.__dict__.pop(old, None)  # timm's ResNet stores a rate-0 drop path as a plain None
    # Each gate takes its drop path's place among the children (Swin: both gates take the
    # place of the one module), so that named_children keeps its order.
    takes_place_of = dict(zip(kind.DROP_PATHS, kind.GATES)) if len(kind.GATES) == len(kind.DROP_PATHS) else dict.fromkeys(kind.DROP_PATHS[:1])
    modules: dict[str, nn.Module | None] = {}
    for name, child in block._modules.items():
        if name not in kind.DROP_PATHS:
            modules[name] = child
        elif name in takes_place_of:
            gates = kind.GATES if takes_place_of[name] is None else (takes_place_of[name],)
            modules.update(dict.fromkeys(gates))
    modules.update({gate: None for gate in kind.GATES if gate not in modules})  # timm's ResNet: a plain None
    converted.__dict__["_modules"] = modules
    return converted


def block_conversions(model: nn.Module) -> list[BlockConversion]:
    """The residual blocks of `model` that stochastic depth can skip (any registered library block).

    Changes nothing: every check is made and every converted block is built first, so
    that an error leaves the model as it was. Installing the conversions (and the
    gates) is ``add_stochastic_depth``'s job.

    Parameters
    ----------
    model : torch.nn.Module
        Any network; its blocks are listed in ``model.modules()`` order (forward order
        for torchvision's and timm's networks).

    Returns
    -------
    list of BlockConversion
        One per supported block (see :func:`supported_blocks`); blocks converted
        already are listed again, as themselves, with their gates' rates. Empty when
        the model has none.

    Raises
    ------
    TypeError
        When a module that is not a supported block holds a drop-path module
        (``torchvision.ops.StochasticDepth``, ``timm.layers.DropPath``, or any class
        named like one, such as Hugging Face's ``ConvNextDropPath``), naming the drop
        paths by their qualified names and the supported blocks; for a timm
        ``DropPath(scale_by_keep=False)``.
    """
    names = {module: name or type(model).__name__ for name, module in model.named_modules()}
    unconvertible = [
        (module, f"{names[module]}.{child_name}", child)
        for module in names
        if converted_class(type(module)) is None
        for child_name, child in module.named_children()
        if _is_drop_path(child)
    ]
    if unconvertible:
        module, qualified_name, child = unconvertible[0]
        listed = ", ".join(f"{name} ({type(child).__name__})" for _, name, child in unconvertible[:3])
        more = f" and {len(unconvertible) - 3} more" if len(unconvertible) > 3 else ""
        if _is_hugging_face(module):
            why = REFUSED.get(type(module).__name__)
            hint = (
                f" It is not converted because {why}; convert the model without its drop paths (build it with "
                "drop_path_rate=0) or train it with transformers' own masking drop path." if why else
                f" {type(module).__name__} is not one of the transformers layers add_stochastic_depth knows (each needs "
                f"its forward written with gates; supported: {', '.join(f.rpartition('.')[2] for f in FAMILIES)}): "
                "build the model with drop_path_rate=0 to convert the rest, or train it with transformers' own "
                "masking drop path."
            )
        else:
            hint = f" Supported blocks: {', '.join(supported_blocks())}"
        raise TypeError(
            f"{type(model).__name__} holds drop-path modules in blocks that add_stochastic_depth cannot convert, "
            f"so their branches would still be computed and masked: {listed}{more}, e.g. in "
            f"{names[module]} ({type(module).__module__}.{type(module).__qualname__}).{hint}"
        )

    conversions = []
    layer_drop = set()  # the layers of stacks with LayerDrop, converted as their stack says
    for stack in layer_drop_stacks(model):
        for (parent, name, layer, kind), rate in zip(stack.layers, stack.rates):
            block = layer if type(layer) is kind else _converted(layer, kind)
            conversions.append(BlockConversion(parent, name, block, kind.GATES, (rate,), stack=stack))
            layer_drop.add(layer)
    first_slot: dict[nn.Module, BlockConversion] = {}  # a block used in several places converts once
    for parent in names:
        for name, child in parent._modules.items():
            if child in layer_drop:
                continue
            if child in first_slot:
                conversion = first_slot[child]
                conversions[conversions.index(conversion)] = first_slot[child] = conversion._replace(
                    also=(*conversion.also, (parent, name)))
                continue
            kind = converted_class(type(child))
            if kind is None:
                continue
            if isinstance(child, (tv_efficientnet.MBConv, tv_efficientnet.FusedMBConv)) and not child.use_res_connect:
                continue  # no residual connection: nothing to skip (torchvision does not drop it either)
            block_name = names[child]
            if type(child) is kind:  # converted already (or built gated): its gates' rates, where it has its own
                probs = tuple(_drop_prob(child, block_name, gate) for gate in kind.GATES) if kind.DROP_PATHS else None
                conversions.append(first_slot.setdefault(child, BlockConversion(parent, name, child, kind.GATES, probs)))
                continue
            probs = None
            if kind.DROP_PATHS:
                probs = [_drop_prob(child, block_name, attribute) for attribute in kind.DROP_PATHS]
                if len(kind.GATES) > len(probs):  # torchvision's Swin: one module for both branches
                    probs = probs * len(kind.GATES)
                probs = tuple(probs)
            conversions.append(first_slot.setdefault(child, BlockConversion(parent, name, _converted(child, kind), kind.GATES, probs)))
    return conversions


def _check_arguments(model: Any, survival_rule: Any, p_last: Any, inverted: Any) -> None:
    """TypeErrors that name the argument, its value and what to pass instead."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_stochastic_depth: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}")
    # A rule's name (checked later) or any sequence of probabilities (a list, an array, a tensor).
    if survival_rule is not None and (isinstance(survival_rule, (int, float, Mapping)) or not hasattr(survival_rule, "__iter__")
                                      or getattr(survival_rule, "ndim", 1) != 1):
        hint = f" (to set the last block's survival probability, pass p_last={survival_rule!r})" \
            if isinstance(survival_rule, (int, float)) and not isinstance(survival_rule, bool) else ""
        raise TypeError(
            f"add_stochastic_depth: survival_rule must be 'linear', 'uniform' or a sequence of probabilities, one per "
            f"block, got {survival_rule!r}{hint}"
        )
    if p_last is not None and (isinstance(p_last, (str, bytes, bool, complex)) or hasattr(p_last, "__len__")):
        raise TypeError(f"add_stochastic_depth: p_last must be a number in [0, 1], got {p_last!r}")
    if inverted is not None and not isinstance(inverted, bool):
        raise TypeError(f"add_stochastic_depth: inverted must be True, False or None (the default), got {inverted!r}")


def add_stochastic_depth(
    model: nn.Module,
    survival_rule: SurvivalRule | None = None,
    p_last: float | None = None,
    *,
    mode: DropMode | None = None,
    inverted: bool | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Give every residual block of a network a stochastic-depth gate, in place.

    Works on torchvision's ResNets (``BasicBlock`` and ``Bottleneck``, which become the
    blocks of ``resnet_with_stochastic_depth``), on that module's, and on the residual
    blocks of torchvision's ConvNeXt, Swin (V1, V2) and EfficientNet (V1, V2) and timm's
    ViT, ConvNeXt and ResNet (``stochastic_depth.library_blocks``):
    there the masking drop path (torchvision's ``StochasticDepth``, timm's ``DropPath``)
    is replaced by gates, one per residual branch, and a dropped branch is not computed.
    Weights, ``state_dict`` keys and the model's class stay as they were; blocks are
    swapped for equivalent ones that hold the very same submodules, parameters and hooks
    (a hook handle taken before still removes its hook; a reference to the old block object
    no longer reaches the model), and a block used in several places is converted once and
    stays shared. Nothing else is
    added: no submodule, no hook, so containers that call the model's layers
    (``IntermediateLayerGetter``, ``BackboneWithFPN``,
    ``nn.Sequential(*list(model.children())[:-2])``) see the same children and get drops,
    since each gate draws when its block runs. Calling it again on the same model
    replaces the gates; each gate starts in its block's mode (train or eval).

    Parameters
    ----------
    model : torch.nn.Module
        The network; its residual blocks are numbered in ``model.modules()`` order.
    survival_rule, p_last : optional
        As for ``StochasticResNet``, over blocks (both gates of a transformer block
        get the block's probability). When neither is given, a torchvision or timm
        model keeps its own rates (each gate survives with ``1 - p`` of the drop-path
        module it replaces) and a ResNet gets ``"linear"`` with ``p_last = 0.5``.
    mode : {"batch", "row", "row_subset"}, optional
        As for ``StochasticResNet``; by default ``"row_subset"`` for a torchvision or
        timm model with drop paths (per sample, as the libraries drop), ``"batch"``
        for a ResNet.
    inverted : bool, optional
        As for ``StochasticResNet``; by default True for the blocks with drop paths
        (the libraries' convention: eval output unchanged), False for the ResNets.
    seed
        As for ``StochasticResNet``. Give sub-networks of one model converted by separate
        calls different seeds (or None): gates are numbered from 0 in each call, so two
        conversions with one seed would drop alike.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Warns
    -----
    UserWarning
        When a torchvision or timm model keeps its own rates and they are all 0 (its
        default ``drop_path_rate`` or ``stochastic_depth_prob``): no gate would ever drop.

    Raises
    ------
    TypeError
        When the model is not a module, has no block to convert, or holds a drop-path module
        in a block that is not supported; for an argument of the wrong type (a number as
        `survival_rule`, a string as `inverted`). Before anything is changed.
    ValueError
        For a bad value (a mode, a probability outside [0, 1], a seed), before anything is changed.
    """
    # Check everything before changing the model, so that a bad argument leaves it as it was.
    _check_arguments(model, survival_rule, p_last, inverted)
    if mode is not None:
        check_mode(mode)
    conversions = block_conversions(model)
    if not conversions:
        hint = (f" (the transformers layers it converts: {', '.join(f.rpartition('.')[2] for f in FAMILIES)})"
                if _is_hugging_face(model) else "")
        raise TypeError(f"{type(model).__name__} has no residual blocks to add stochastic depth to{hint}")
    position = {module: i for i, module in enumerate(model.modules())}
    conversions.sort(key=lambda c: position[c.parent._modules[c.name]])
    own_rates = all(c.drop_probs is not None for c in conversions)
    if own_rates and survival_rule is None and p_last is None:
        probs = [[1.0 - q for q in c.drop_probs] for c in conversions]
        if all(p == 1.0 for block in probs for p in block):
            warnings.warn(
                f"{type(model).__name__} was built with a drop rate of 0 (timm's drop_path_rate, torchvision's "
                "stochastic_depth_prob, transformers' drop_path_rate or layerdrop), and its rates are kept, so no block will ever be dropped: build it with "
                "a rate, or pass p_last (and survival_rule) to add_stochastic_depth",
                stacklevel=2,
            )
    else:
        rule = "linear" if survival_rule is None else survival_rule
        block_probs = survival_probabilities(len(conversions), rule, 0.5 if p_last is None else p_last)
        probs = [[p] * len(c.gate_names) for c, p in zip(conversions, block_probs)]
    default_mode = "row_subset" if own_rates else "batch"

    seed, seed_given = seed_or_random(seed)
    index = 0  # the gates' numbers, in block order, which tell their draws apart
    for c, gate_probs in zip(conversions, probs):
        block_inverted = (c.drop_probs is not None) if inverted is None else inverted
        # LayerDrop's layers: one draw per layer and pass, as transformers draws; no scaling (see the gate).
        block_mode = mode if mode is not None else "batch" if c.stack is not None else default_mode
        for gate_name, p in zip(c.gate_names, gate_probs):
            gate = StochasticDepth(survival_prob=p, mode=block_mode, inverted=block_inverted, seed=seed, index=index)
            gate.seed_given = seed_given
            gate.train(c.block.training)  # a model converted in eval mode stays in eval mode
            setattr(c.block, gate_name, gate)
            index += 1
        for parent, name in ((c.parent, c.name), *c.also):
            setattr(parent, name, c.block)
    for stack in {id(c.stack): c.stack for c in conversions if c.stack is not None}.values():
        stop_stack_draws(stack)  # the gates draw instead
    return model
