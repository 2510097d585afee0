"""Gated blocks: what a block with stochastic-depth gates declares, and torchvision's and timm's blocks.

torchvision's ``StochasticDepth`` and timm's ``DropPath`` mask: a dropped branch is
computed and then multiplied by zero. This module holds gated classes of the residual
blocks of the networks trained with stochastic depth today, in which a
:class:`~stochastic_depth.gate.StochasticDepth` gate decides first and a dropped branch
is not computed: in ``"batch"`` mode not at all, in the row modes only on the samples that
keep it. ``stochastic_depth.add_stochastic_depth`` converts a model's blocks to them.

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

Not supported, with a ``TypeError`` from ``add_stochastic_depth`` before
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

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn
from torchvision.models import convnext as tv_convnext
from torchvision.models import efficientnet as tv_efficientnet
from torchvision.models import swin_transformer as tv_swin

try:  # timm is optional: without it, torchvision's blocks are still converted
    import timm.models.convnext as timm_convnext
    import timm.models.resnet as timm_resnet
    import timm.models.vision_transformer as timm_vit
except ImportError:
    timm_convnext = timm_resnet = timm_vit = None

from stochastic_depth.compilation import RegionHolder, eager_frame, not_a_frame
from stochastic_depth.gate import StochasticDepth

__all__ = [
    "GatedBlock",
    "StochasticCNBlock",
    "StochasticConvNeXtBlock",
    "StochasticFusedMBConv",
    "StochasticMBConv",
    "StochasticSwinTransformerBlock",
    "StochasticSwinTransformerBlockV2",
    "StochasticTimmBasicBlock",
    "StochasticTimmBottleneck",
    "StochasticVisionTransformerBlock",
    "converted_class",
    "register_class_maker",
    "supported_blocks",
]
if timm_vit is None:  # (timm's blocks are defined only where timm is installed)
    __all__ = [name for name in __all__ if name not in (
        "StochasticConvNeXtBlock", "StochasticTimmBasicBlock", "StochasticTimmBottleneck", "StochasticVisionTransformerBlock",
    )]


# ----------------------------------------------------------------------------------
# What a gated block is: declared once per class, read by the conversion, the FSDP2
# recipe (stochastic_depth.distributed), counting and the tests.
# ----------------------------------------------------------------------------------

# Each library class and the gated class that converts it, filled as the classes are defined
# (this module's, and the ResNet blocks of resnet_with_stochastic_depth for torchvision's).
_CONVERSIONS: dict[type[nn.Module], type[GatedBlock]] = {}


def _eager_in_training(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """A gated block's `forward`, which torch.compile runs eagerly in a training pass.

    The gates draw on the host and run their branches as compiled regions
    (``stochastic_depth.compilation``); were the block's own frame compiled, it would be
    compiled again for every shape of block. In eval mode it is traced as it is.
    """
    eager = eager_frame(forward)

    @not_a_frame
    def dispatch(self: GatedBlock, *args, **kwargs) -> Tensor:
        if self.training and self.gated and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
            return eager(self, *args, **kwargs)
        return forward(self, *args, **kwargs)

    dispatch.__wrapped__ = forward
    dispatch.__name__, dispatch.__qualname__, dispatch.__doc__ = forward.__name__, forward.__qualname__, forward.__doc__
    return dispatch


class GatedBlock(RegionHolder):
    """A residual block whose branches are called through stochastic-depth gates.

    A subclass declares, once:

    ``GATES``
        The attributes that hold its gates, one per residual branch, in forward order.
    ``BRANCHES``
        For each gate, the names of the children its branch runs (in forward order; a
        parameter of the block itself, such as a layer scale, is in no child).
    ``LIBRARY_CLASS``, ``DROP_PATHS``
        The library block it converts and that block's drop-path attributes (empty where
        the library block has none: torchvision's ResNets). Declaring ``LIBRARY_CLASS``
        registers the subclass as the conversion of that class.

    Its ``forward`` calls each gate as a module, ``gate(branch, x, shortcut)``, in training
    and in evaluation; under ``torch.compile`` a training pass runs it eagerly.
    """

    LIBRARY_CLASS: ClassVar[type[nn.Module]]
    DROP_PATHS: ClassVar[tuple[str, ...]] = ()
    GATES: ClassVar[tuple[str, ...]]
    BRANCHES: ClassVar[dict[str, tuple[str, ...]]]

    def __init_subclass__(cls, **kwargs) -> None:
        # Before the bases' hooks: transformers' GradientCheckpointingLayer wraps the forward it
        # finds and checkpoints only if that wrapper is the class's forward (the outermost).
        if "forward" in cls.__dict__:
            cls.forward = _eager_in_training(cls.__dict__["forward"])
        super().__init_subclass__(**kwargs)
        if "LIBRARY_CLASS" in cls.__dict__:
            _CONVERSIONS[cls.LIBRARY_CLASS] = cls

    @property
    def gated(self) -> bool:
        """Whether the block holds its gates (a block of a plain ``ResNet`` holds none)."""
        return isinstance(getattr(self, self.GATES[0], None), StochasticDepth)

    def runs_regions(self) -> bool:
        return self.compile_options is not None or (self.training and self.gated)

    def run_shortcut(self, module: nn.Module | None, x: Tensor) -> Tensor:
        """`module(x)` for a shortcut (None or ``nn.Identity``: `x`): a region, as the branches are."""
        if module is None or isinstance(module, nn.Identity):
            return x
        return self.run_region(module, x)


for _helper in (GatedBlock.run_shortcut, GatedBlock.runs_regions, GatedBlock.gated.fget):
    not_a_frame(_helper)


# Functions that make the gated class of a library class on demand (stochastic_depth.hugging_face's,
# for transformers' layers, which are not imported unless the user's model holds them).
_CLASS_MAKERS: list[Callable[[type[nn.Module]], type[GatedBlock] | None]] = []


def converted_class(library_class: type[nn.Module]) -> type[GatedBlock] | None:
    """The gated class that converts `library_class` (or that is it), or None."""
    if library_class in _CONVERSIONS.values():
        return library_class
    made = _CONVERSIONS.get(library_class)
    for make in _CLASS_MAKERS:
        made = made or make(library_class)
    return made


def register_class_maker(make: Callable[[type[nn.Module]], type[GatedBlock] | None]) -> None:
    """Have :func:`converted_class` ask `make` for the gated class of a library class it does not hold."""
    _CLASS_MAKERS.append(make)


def supported_blocks() -> list[str]:
    """The qualified names of the library blocks ``add_stochastic_depth`` converts."""
    return [f"{c.__module__}.{c.__qualname__}" for c in _CONVERSIONS]


# ----------------------------------------------------------------------------------
# Converted blocks. Each subclasses the library's block (isinstance checks, methods
# such as timm's zero_init_last keep working) and changes only forward; each gate
# computes ``shortcut + branch(x)``, running the branch only where it is kept.
# ----------------------------------------------------------------------------------


class StochasticCNBlock(GatedBlock, tv_convnext.CNBlock):
    """torchvision's ConvNeXt block: ``x + layer_scale * block(x)``, gated."""

    LIBRARY_CLASS, DROP_PATHS, GATES = tv_convnext.CNBlock, ("stochastic_depth",), ("stochastic_depth",)
    BRANCHES = {"stochastic_depth": ("block",)}
    stochastic_depth: StochasticDepth

    def branch(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``."""
        return self.layer_scale * self.block(x)

    def forward(self, input: Tensor) -> Tensor:
        return self.stochastic_depth(self.branch, input, input)


class StochasticSwinTransformerBlock(GatedBlock, tv_swin.SwinTransformerBlock):
    """torchvision's Swin block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``, each gated."""

    LIBRARY_CLASS = tv_swin.SwinTransformerBlock
    DROP_PATHS, GATES = ("stochastic_depth",), ("stochastic_depth_attn", "stochastic_depth_mlp")
    BRANCHES = {"stochastic_depth_attn": ("norm1", "attn"), "stochastic_depth_mlp": ("norm2", "mlp")}
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


class StochasticMBConv(GatedBlock, tv_efficientnet.MBConv):
    """torchvision's EfficientNet block with a residual connection: ``x + block(x)``, gated."""

    LIBRARY_CLASS, DROP_PATHS, GATES = tv_efficientnet.MBConv, ("stochastic_depth",), ("stochastic_depth",)
    BRANCHES = {"stochastic_depth": ("block",)}
    stochastic_depth: StochasticDepth

    def forward(self, input: Tensor) -> Tensor:
        return self.stochastic_depth(self.block, input, input)


class StochasticFusedMBConv(GatedBlock, tv_efficientnet.FusedMBConv):
    """torchvision's EfficientNet V2 fused block with a residual connection, gated."""

    LIBRARY_CLASS, DROP_PATHS, GATES = tv_efficientnet.FusedMBConv, ("stochastic_depth",), ("stochastic_depth",)
    BRANCHES = {"stochastic_depth": ("block",)}
    stochastic_depth: StochasticDepth

    def forward(self, input: Tensor) -> Tensor:
        return self.stochastic_depth(self.block, input, input)


def _activate(act: nn.Module, x: Tensor, out: Tensor) -> Tensor:
    # A branch dropped for the whole batch hands back the shortcut itself; when that is x
    # (an identity shortcut), the previous layer's output that autograd may still need,
    # an in-place activation (timm's act(inplace=True)) must not overwrite it.
    return act(out.clone() if out is x else out)


if timm_vit is not None:

    class StochasticVisionTransformerBlock(GatedBlock, timm_vit.Block):
        """timm's ViT block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``, each gated.

        ``x``: ``(N, tokens, C)``. ``attn_mask`` and ``is_causal`` go to the attention as in
        timm. Raises ``ValueError`` for a mask with a batch dimension (4-D, first size > 1)
        while training in a row mode: the branch then runs on the kept samples only, and
        their rows of the mask are not known to it.
        """

        LIBRARY_CLASS, DROP_PATHS, GATES = timm_vit.Block, ("drop_path1", "drop_path2"), ("drop_path1", "drop_path2")
        BRANCHES = {"drop_path1": ("norm1", "attn", "ls1"), "drop_path2": ("norm2", "mlp", "ls2")}
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


    class StochasticConvNeXtBlock(GatedBlock, timm_convnext.ConvNeXtBlock):
        """timm's ConvNeXt block: ``shortcut(x) + gamma * mlp(norm(conv_dw(x)))``, gated."""

        LIBRARY_CLASS, DROP_PATHS, GATES = timm_convnext.ConvNeXtBlock, ("drop_path",), ("drop_path",)
        BRANCHES = {"drop_path": ("conv_dw", "norm", "mlp")}
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
            return self.drop_path(self.branch, x, self.run_shortcut(self.shortcut, x))


    class _StochasticTimmResNetBlock(GatedBlock):
        """timm's ResNet blocks: ``act(shortcut + branch(x))``, the branch gated.

        ``branch(x)`` is ``after_conv1(conv1(x))``. With ReLU as the activation, the block's input
        is a ReLU output that autograd keeps anyway, so the gate is handed ``conv1`` as ``first``
        (in the row modes it gathers the kept samples itself; see ``StochasticDepth``). Other
        activations save their input, not their output: there the gathered copy is the smaller
        thing to save, and the branch is passed whole.
        """

        DROP_PATHS = GATES = ("drop_path",)
        FINAL_ACTIVATION: ClassVar[str]  # the attribute of the activation after the addition
        drop_path: StochasticDepth

        def branch(self, x: Tensor) -> Tensor:
            """``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""
            return self.after_conv1(self.conv1(x))

        def forward(self, x: Tensor) -> Tensor:
            shortcut = self.run_shortcut(self.downsample, x)
            act = getattr(self, self.FINAL_ACTIVATION)
            if isinstance(act, nn.ReLU):
                out = self.drop_path(self.after_conv1, x, shortcut, first=self.conv1)
            else:
                out = self.drop_path(self.branch, x, shortcut)
            return _activate(act, x, out)


    class StochasticTimmBasicBlock(_StochasticTimmResNetBlock, timm_resnet.BasicBlock):
        """timm's ResNet basic block: ``act2(shortcut + bn2(conv2(...)))``, the branch gated."""

        LIBRARY_CLASS, FINAL_ACTIVATION = timm_resnet.BasicBlock, "act2"
        BRANCHES = {"drop_path": ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se")}

        def after_conv1(self, x: Tensor) -> Tensor:
            x = self.aa(self.act1(self.drop_block(self.bn1(x))))
            x = self.bn2(self.conv2(x))
            return x if self.se is None else self.se(x)


    class StochasticTimmBottleneck(_StochasticTimmResNetBlock, timm_resnet.Bottleneck):
        """timm's ResNet bottleneck block: ``act3(shortcut + bn3(conv3(...)))``, the branch gated."""

        LIBRARY_CLASS, FINAL_ACTIVATION = timm_resnet.Bottleneck, "act3"
        BRANCHES = {"drop_path": ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se")}

        def after_conv1(self, x: Tensor) -> Tensor:
            x = self.act1(self.bn1(x))
            x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
            x = self.bn3(self.conv3(x))
            return x if self.se is None else self.se(x)


not_a_frame(_activate)
