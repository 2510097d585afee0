"""Stochastic depth that skips the work, for torchvision's and timm's residual blocks.

torchvision's ``StochasticDepth`` and timm's ``DropPath`` mask: a dropped branch is
computed and then multiplied by zero. This module converts the residual blocks of the
networks trained with stochastic depth today so that a :class:`StochasticDepth` gate
(``resnet_with_stochastic_depth``) decides first and a dropped branch is not computed:
in ``"batch"`` mode not at all, in the row modes only on the samples that keep it.
:func:`resnet_with_stochastic_depth.add_stochastic_depth` calls
:func:`library_block_conversions` to find them; use that function, not this module.

Supported blocks (converted in place, keeping every submodule, parameter, buffer and
``state_dict`` key; each drop-path module is replaced by one gate per residual branch):

====================================  =========================  ======================
block                                 gates (attribute names)    normalisation
====================================  =========================  ======================
torchvision ``CNBlock`` (ConvNeXt)    ``stochastic_depth``       LayerNorm
torchvision ``SwinTransformerBlock``  ``stochastic_depth_attn``, LayerNorm
and ``SwinTransformerBlockV2``        ``stochastic_depth_mlp``
torchvision ``MBConv``,               ``stochastic_depth``       BatchNorm
``FusedMBConv`` (EfficientNet, V2)
timm ``vision_transformer.Block``     ``drop_path1``,            LayerNorm
(ViT, DeiT, DINOv2-style; LayerScale)  ``drop_path2``
timm ``convnext.ConvNeXtBlock``       ``drop_path``              LayerNorm
timm ``resnet.BasicBlock``,           ``drop_path``              BatchNorm
``resnet.Bottleneck``
====================================  =========================  ======================

torchvision's Swin blocks use one ``StochasticDepth`` module for both branches, but it
draws anew at each call: each branch gets its own gate with its own draw, as timm's
blocks have. An ``MBConv``/``FusedMBConv`` without a residual connection (a stride or
a change of width) has no branch to drop and is left as it is: torchvision never
applies its ``StochasticDepth`` there either.

Rates and scaling: a gate's survival probability is ``1 - p`` of the drop-path module
it replaces (``StochasticDepth.p``, ``DropPath.drop_prob``; 0 for the ``nn.Identity``
or ``None`` timm puts where the rate is 0), so the rates the library spread over the
blocks (``stochastic_depth_prob``, ``drop_path_rate``) are kept. Both libraries use the
inverted convention (``1 / (1 - p)`` while training, nothing at test), which is what
the gates get (``inverted=True``): in eval mode a converted block computes exactly what
the unconverted one computes (same operations; ``shortcut + branch`` instead of
``branch + shortcut``, the same floats).

Running a branch on the kept samples only: where the branch normalises per sample
(LayerNorm: ViT, ConvNeXt, Swin; Swin's window-attention mask depends on positions, not
on the batch), the kept samples get what masking gives them, up to the float rounding
of matrix products on a different batch size. Where it uses BatchNorm (EfficientNet,
timm ResNet), the statistics, and the running statistics, come from the kept samples
only, as for the ResNets of ``resnet_with_stochastic_depth``. Memory layout: the
convolutional blocks give their outputs the layout the library's block gives them
(ConvNeXt's are channels_last; a model moved to channels_last stays so), also in the
row modes, whose gather and scatter would otherwise return NCHW tensors.

``stochastic_depth.counting.gate_flop_floor`` counts the expected fraction of a
converted model's training-step FLOPs still computed.

Not supported, with a ``TypeError`` from :func:`library_block_conversions` before
anything is changed: any other module that holds a ``StochasticDepth`` or ``DropPath``
(a custom block, timm's other families such as its Swin, EVA or EfficientNet), whose
forward this module cannot know; timm's ``DropPath(scale_by_keep=False)``, which
scales neither while training nor at test, a convention the gates do not have. At
run time: a per-sample attention mask (``attn_mask`` with a batch dimension) in a timm
ViT block trained in a row mode, where the gate would need the kept samples' rows of
the mask (a ``ValueError``). torchvision's drop probability 1 (survival 0) leaves the
branch out at test time, as the gates do for ``survival_prob == 0``, where torchvision
keeps it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet as tv_efficientnet
from torchvision.models import swin_transformer as tv_swin
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

try:  # timm is optional: without it, torchvision's blocks are still converted
    import timm.models.convnext as timm_convnext
    import timm.models.resnet as timm_resnet
    import timm.models.vision_transformer as timm_vit
    from timm.layers import DropPath
except ImportError:
    timm_convnext = timm_resnet = timm_vit = DropPath = None

from stochastic_depth.gate import StochasticDepth, _eager_frame, _not_a_frame, compiled_region
from stochastic_depth.gate import gate_in_layout as _gate_in_layout

__all__ = [
    "BlockConversion",
    "StochasticCNBlock",
    "StochasticConvNeXtBlock",
    "StochasticFusedMBConv",
    "StochasticMBConv",
    "StochasticSwinTransformerBlock",
    "StochasticSwinTransformerBlockV2",
    "StochasticTimmBasicBlock",
    "StochasticTimmBottleneck",
    "StochasticVisionTransformerBlock",
    "library_block_conversions",
    "supported_blocks",
]
if timm_vit is None:  # (timm's blocks are defined only where timm is installed)
    __all__ = [name for name in __all__ if name not in (
        "StochasticConvNeXtBlock", "StochasticTimmBasicBlock", "StochasticTimmBottleneck", "StochasticVisionTransformerBlock",
    )]


class BlockConversion(NamedTuple):
    """One residual block that ``add_stochastic_depth`` converts.

    ``parent`` holds the block as its child ``name``; ``block`` is the converted block
    to put there (the same object when it is converted already), holding the very
    same submodules, with ``None`` in place of each gate named in ``gate_names`` (in
    forward order) until the caller sets the gates. ``drop_probs``: the drop
    probability of each gate's branch in the unconverted model, one per gate, or None
    when the block has none of its own (the ResNets of ``resnet_with_stochastic_depth``
    and torchvision's).
    """

    parent: nn.Module
    name: str
    block: nn.Module
    gate_names: tuple[str, ...]
    drop_probs: tuple[float, ...] | None


# ----------------------------------------------------------------------------------
# Converted blocks. Each subclasses the library's block (isinstance checks, methods
# such as timm's zero_init_last keep working) and changes only forward; the gate
# computes ``shortcut + branch(x)``, running the branch only where it is kept.
# ----------------------------------------------------------------------------------


def _eager_in_training(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A converted block's `forward`, which torch.compile runs eagerly in a training pass.

    The gates draw on the host and run their branches as compiled regions
    (``stochastic_depth.gate.compiled_region``); were the block's own frame compiled, it
    would be compiled again for every shape of block. In eval mode it is traced as it is.
    """
    eager = _eager_frame(forward)

    @_not_a_frame
    @functools.wraps(forward)
    def dispatch(self: nn.Module, *args, **kwargs) -> Tensor:
        if self.training and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            return eager(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    return dispatch


@_not_a_frame
def _shortcut(module: nn.Module, x: Tensor, gate: StochasticDepth) -> Tensor:
    """`module(x)` for a block's shortcut: in a training pass a compiled region, as the branches are."""
    if isinstance(module, nn.Identity):
        return x
    if torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy) or not (gate.training or gate.compile_options):
        return module(x)
    return compiled_region(module, x, options=gate.compile_options)


class _Converted:
    """What the converted classes share: the library class, its drop-path attributes, our gates."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" in cls.__dict__:
            cls.forward = _eager_in_training(cls.__dict__["forward"])

    LIBRARY_CLASS: ClassVar[type[nn.Module]]
    # The library block's drop-path attribute(s), and the gate that takes each branch's place.
    DROP_PATHS: ClassVar[tuple[str, ...]]
    GATES: ClassVar[tuple[str, ...]]


class StochasticCNBlock(_Converted, tv_convnext.CNBlock):
    """torchvision's ConvNeXt block: ``x + layer_scale * block(x)``, gated."""

    LIBRARY_CLASS, DROP_PATHS, GATES = tv_convnext.CNBlock, ("stochastic_depth",), ("stochastic_depth",)
    stochastic_depth: StochasticDepth

    def branch(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``."""
        return self.layer_scale * self.block(x)

    def forward(self, input: Tensor) -> Tensor:
        return _gate_in_layout(self.stochastic_depth, self.branch, input, input)


class StochasticSwinTransformerBlock(_Converted, tv_swin.SwinTransformerBlock):
    """torchvision's Swin block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each gated."""

    LIBRARY_CLASS = tv_swin.SwinTransformerBlock
    DROP_PATHS, GATES = ("stochastic_depth",), ("stochastic_depth_attn", "stochastic_depth_mlp")
    stochastic_depth_attn: StochasticDepth
    stochastic_depth_mlp: StochasticDepth

    def attention_branch(self, x: Tensor) -> Tensor:
        """``(N, H, W, C) -> (N, H, W, C)``: shifted-window attention of the normalised input."""
        return self.attn(self.norm1(x))

    def mlp_branch(self, x: Tensor) -> Tensor:
        """``(N, H, W, C) -> (N, H, W, C)``."""
        return self.mlp(self.norm2(x))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stochastic_depth_attn(self.attention_branch, x, x)
        return self.stochastic_depth_mlp(self.mlp_branch, x, x)


class StochasticSwinTransformerBlockV2(StochasticSwinTransformerBlock, tv_swin.SwinTransformerBlockV2):
    """torchvision's Swin V2 block: the norms come after attention and MLP (res-post-norm)."""

    LIBRARY_CLASS = tv_swin.SwinTransformerBlockV2

    def attention_branch(self, x: Tensor) -> Tensor:
        """``(N, H, W, C) -> (N, H, W, C)``."""
        return self.norm1(self.attn(x))

    def mlp_branch(self, x: Tensor) -> Tensor:
        """``(N, H, W, C) -> (N, H, W, C)``."""
        return self.norm2(self.mlp(x))


class StochasticMBConv(_Converted, tv_efficientnet.MBConv):
    """torchvision's EfficientNet block with a residual connection: ``x + block(x)``, gated."""

    LIBRARY_CLASS, DROP_PATHS, GATES = tv_efficientnet.MBConv, ("stochastic_depth",), ("stochastic_depth",)
    stochastic_depth: StochasticDepth

    def forward(self, input: Tensor) -> Tensor:
        return _gate_in_layout(self.stochastic_depth, self.block, input, input)


class StochasticFusedMBConv(_Converted, tv_efficientnet.FusedMBConv):
    """torchvision's EfficientNet V2 fused block with a residual connection, gated."""

    LIBRARY_CLASS, DROP_PATHS, GATES = tv_efficientnet.FusedMBConv, ("stochastic_depth",), ("stochastic_depth",)
    stochastic_depth: StochasticDepth

    def forward(self, input: Tensor) -> Tensor:
        return _gate_in_layout(self.stochastic_depth, self.block, input, input)


@_not_a_frame
def _activate(act: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    # A branch dropped for the whole batch hands back the shortcut itself; when that is x
    # (an identity shortcut), the previous layer's output that autograd may still need,
    # an in-place activation (timm's act(inplace=True)) must not overwrite it.
    return act(out.clone() if out is x else out)


if timm_vit is not None:

    class StochasticVisionTransformerBlock(_Converted, timm_vit.Block):
        """timm's ViT block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``, each gated.

        ``x``: ``(N, tokens, C)``. ``attn_mask`` and ``is_causal`` go to the attention as in
        timm. Raises ``ValueError`` for a mask with a batch dimension (4-D, first size > 1)
        while training in a row mode: the branch then runs on the kept samples only, and
        their rows of the mask are not known to it.
        """

        LIBRARY_CLASS, DROP_PATHS, GATES = timm_vit.Block, ("drop_path1", "drop_path2"), ("drop_path1", "drop_path2")
        drop_path1: StochasticDepth
        drop_path2: StochasticDepth

        def attention_branch(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            """``(N, tokens, C) -> (N, tokens, C)``."""
            return self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))

        def mlp_branch(self, x: Tensor) -> Tensor:
            """``(N, tokens, C) -> (N, tokens, C)``."""
            return self.ls2(self.mlp(self.norm2(x)))

        def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
            if attn_mask is None and not is_causal:
                attention: Callable[[Tensor], Tensor] = self.attention_branch
            else:
                if (
                    self.training
                    and self.drop_path1.mode != "batch"
                    and attn_mask is not None
                    and attn_mask.dim() == 4
                    and attn_mask.shape[0] > 1
                ):
                    raise ValueError(
                        f"a per-sample attention mask (shape {tuple(attn_mask.shape)}) cannot be used while "
                        f"training with mode={self.drop_path1.mode!r}, where the attention runs on the kept "
                        "samples only: pass a mask that broadcasts over the batch (first size 1), or convert "
                        "the model with mode='batch'"
                    )

                def attention(t: Tensor) -> Tensor:
                    return self.attention_branch(t, attn_mask, is_causal)

            x = self.drop_path1(attention, x, x)
            return self.drop_path2(self.mlp_branch, x, x)


    class StochasticConvNeXtBlock(_Converted, timm_convnext.ConvNeXtBlock):
        """timm's ConvNeXt block: ``shortcut(x) + gamma * mlp(norm(conv_dw(x)))``, gated."""

        LIBRARY_CLASS, DROP_PATHS, GATES = timm_convnext.ConvNeXtBlock, ("drop_path",), ("drop_path",)
        drop_path: StochasticDepth

        def branch(self, x: Tensor) -> Tensor:
            """``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
            x = self.conv_dw(x)
            if self.use_conv_mlp:
                x = self.mlp(self.norm(x))
            else:
                x = self.mlp(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            if self.gamma is not None:
                x = x.mul(self.gamma.reshape(1, -1, 1, 1))
            return x

        def forward(self, x: Tensor) -> Tensor:
            return _gate_in_layout(self.drop_path, self.branch, x, _shortcut(self.shortcut, x, self.drop_path))


    class _StochasticTimmResNetBlock(_Converted):
        """timm's ResNet blocks: ``act(shortcut + branch(x))``, the branch gated."""

        DROP_PATHS = GATES = ("drop_path",)
        FINAL_ACTIVATION: ClassVar[str]  # the attribute of the activation after the addition
        drop_path: StochasticDepth

        def forward(self, x: Tensor) -> Tensor:
            shortcut = x if self.downsample is None else _shortcut(self.downsample, x, self.drop_path)
            out = _gate_in_layout(self.drop_path, self.branch, x, shortcut)
            return _activate(getattr(self, self.FINAL_ACTIVATION), x, out)


    class StochasticTimmBasicBlock(_StochasticTimmResNetBlock, timm_resnet.BasicBlock):
        """timm's ResNet basic block: ``act2(shortcut + bn2(conv2(...)))``, the branch gated."""

        LIBRARY_CLASS, FINAL_ACTIVATION = timm_resnet.BasicBlock, "act2"

        def branch(self, x: Tensor) -> Tensor:
            """``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
            x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
            x = self.bn2(self.conv2(x))
            return x if self.se is None else self.se(x)


    class StochasticTimmBottleneck(_StochasticTimmResNetBlock, timm_resnet.Bottleneck):
        """timm's ResNet bottleneck block: ``act3(shortcut + bn3(conv3(...)))``, the branch gated."""

        LIBRARY_CLASS, FINAL_ACTIVATION = timm_resnet.Bottleneck, "act3"

        def branch(self, x: Tensor) -> Tensor:
            """``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
            x = self.act1(self.bn1(self.conv1(x)))
            x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
            x = self.bn3(self.conv3(x))
            return x if self.se is None else self.se(x)


_CONVERTED: tuple[type[_Converted], ...] = (
    StochasticCNBlock,
    StochasticSwinTransformerBlock,
    StochasticSwinTransformerBlockV2,
    StochasticMBConv,
    StochasticFusedMBConv,
)
_DROP_PATH_TYPES: tuple[type[nn.Module], ...] = (TorchvisionStochasticDepth,)
if timm_vit is not None:
    _CONVERTED += (
        StochasticVisionTransformerBlock,
        StochasticConvNeXtBlock,
        StochasticTimmBasicBlock,
        StochasticTimmBottleneck,
    )
    _DROP_PATH_TYPES += (DropPath,)
_BY_LIBRARY_CLASS: dict[type[nn.Module], type[_Converted]] = {kind.LIBRARY_CLASS: kind for kind in _CONVERTED}


# Drop-path classes of other libraries, known by name (Hugging Face's ConvNextDropPath,
# Dinov2DropPath, BeitDropPath, ...; fairseq's LayerDrop is a list, not a path).
_DROP_PATH_NAME = re.compile(r"drop_?path|stochastic_?depth", re.IGNORECASE)


def _is_drop_path(module: nn.Module) -> bool:
    """Whether `module` masks a residual branch: torchvision's or timm's class, or a class named like one."""
    if isinstance(module, StochasticDepth):  # a gate: already converted
        return False
    return isinstance(module, _DROP_PATH_TYPES) or any(_DROP_PATH_NAME.search(c.__name__) for c in type(module).__mro__)


def supported_blocks() -> list[str]:
    """The qualified names of the library blocks :func:`library_block_conversions` converts."""
    return [f"{c.LIBRARY_CLASS.__module__}.{c.LIBRARY_CLASS.__qualname__}" for c in _CONVERTED]


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
    raise TypeError(
        f"{block_name}.{attribute} is a {type(module).__name__}, not a drop-path module "
        "(torchvision.ops.StochasticDepth, timm.layers.DropPath, nn.Identity or None)"
    )


def _converted(block: nn.Module, kind: type[_Converted]) -> nn.Module:
    """A `kind` block holding the very same submodules, parameters and buffers as `block`.

    `block` itself is left unchanged; the drop-path attributes of the new block are
    removed and its gate attributes are None, in the drop paths' place among the children.
    """
    converted = kind.__new__(kind)
    # Own copies of the dicts (parameters, buffers, hooks), holding the same objects, so that
    # `block` is left as it was.
    converted.__dict__.update({k: type(v)(v) if isinstance(v, dict) else v for k, v in block.__dict__.items()})
    for old in kind.DROP_PATHS:
        converted.__dict__.pop(old, None)  # timm's ResNet stores a rate-0 drop path as a plain None
    # Each gate takes its drop path's place among the children (Swin: both gates take the
    # place of the one module), so that named_children keeps its order.
    takes_place_of = dict(zip(kind.DROP_PATHS, kind.GATES)) if len(kind.GATES) == len(kind.DROP_PATHS) else {kind.DROP_PATHS[0]: None}
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


def library_block_conversions(model: nn.Module) -> list[BlockConversion]:
    """The torchvision and timm residual blocks of `model` that stochastic depth can skip.

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
    supported = (*_BY_LIBRARY_CLASS, *_CONVERTED)
    unconvertible = [
        (module, f"{names[module]}.{child_name}", child)
        for module in names
        if type(module) not in supported
        for child_name, child in module.named_children()
        if _is_drop_path(child)
    ]
    if unconvertible:
        module, qualified_name, child = unconvertible[0]
        listed = ", ".join(f"{name} ({type(child).__name__})" for _, name, child in unconvertible[:3])
        more = f" and {len(unconvertible) - 3} more" if len(unconvertible) > 3 else ""
        hugging_face = (
            " Hugging Face transformers models are not converted yet."
            if type(module).__module__.startswith("transformers.") else ""
        )
        raise TypeError(
            f"{type(model).__name__} holds drop-path modules in blocks that add_stochastic_depth cannot convert, "
            f"so their branches would still be computed and masked: {listed}{more}, e.g. in "
            f"{names[module]} ({type(module).__module__}.{type(module).__qualname__}).{hugging_face} Supported "
            f"blocks: {', '.join(supported_blocks())}, and torchvision's ResNet BasicBlock and Bottleneck"
        )

    conversions = []
    for parent in names:
        for name, child in parent.named_children():
            kind = _BY_LIBRARY_CLASS.get(type(child))
            if kind is None and type(child) in _CONVERTED:
                kind = type(child)
            if kind is None:
                continue
            if isinstance(child, (tv_efficientnet.MBConv, tv_efficientnet.FusedMBConv)) and not child.use_res_connect:
                continue  # no residual connection: nothing to skip (torchvision does not drop it either)
            block_name = names[child]
            if type(child) is kind:  # converted already
                probs = tuple(_drop_prob(child, block_name, gate) for gate in kind.GATES)
                conversions.append(BlockConversion(parent, name, child, kind.GATES, probs))
                continue
            probs = [_drop_prob(child, block_name, attribute) for attribute in kind.DROP_PATHS]
            if len(kind.GATES) > len(probs):  # torchvision's Swin: one module for both branches
                probs = probs * len(kind.GATES)
            conversions.append(BlockConversion(parent, name, _converted(child, kind), kind.GATES, tuple(probs)))
    return conversions
