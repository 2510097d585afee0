"""Hugging Face ``transformers`` vision layers with drop paths, gated: a dropped branch is not computed.

transformers' vision models drop paths as timm does (about 40 modeling files each define a
``*DropPath`` class, all the same code: per sample, inverted, masking), so a branch runs on
the whole batch and dropped samples are multiplied by zero. ``add_stochastic_depth`` converts
their layers to the gated classes made here, as it converts torchvision's and timm's blocks
(``stochastic_depth.library_blocks``): the same submodules, parameters, ``state_dict`` keys and
hooks, each drop path replaced by one gate per residual branch that keeps its rate, in mode
``"row_subset"`` and inverted by default (transformers' semantics).

One class per *shape* of layer (the code of its forward; ``PreNormShape`` and ``ConvNextShape``
are described by attribute names), and a family whose layer has a shape already listed is one
line of :data:`FAMILIES`:

=============================  ======================================================  ==============
shape                          transformers layers                                     gates
=============================  ======================================================  ==============
:class:`Dinov2Shape`           ``Dinov2Layer``, ``Dinov2WithRegistersLayer``,          ``drop_path1``,
                               ``DINOv3ViTLayer``, ``EomtLayer`` (layer scales)        ``drop_path2``
:class:`PixioShape`            ``PixioLayer``                                          same
:class:`SegformerShape`        ``SegformerLayer``                                      same
:class:`PvtV2Shape`            ``PvtV2BlockLayer``, ``GLPNLayer``                      same
:class:`BeitShape`             ``BeitLayer`` (relative position bias in the mask)      same
:class:`Data2VecShape`         ``Data2VecVisionLayer``                                 same
:class:`SwinShape`             ``SwinLayer``: the attention branch only, as            ``drop_path``
                               transformers drops it
:class:`Swinv2Shape`           ``Swinv2Layer``, ``Swin2SRLayer`` (res-post-norm)       ``drop_path1``,
                                                                                       ``drop_path2``
:class:`FocalNetShape`         ``FocalNetLayer``                                       same
:class:`ConvNextShape`         ``ConvNextLayer``, ``ConvNextV2Layer`` (GRN)            ``drop_path``
:class:`DINOv3ConvNextShape`   ``DINOv3ConvNextLayer``                                 ``drop_path``
=============================  ======================================================  ==============

A converted layer's class has the **name** of the transformers class it converts (a subclass
of it, made once per class by :func:`converted_hugging_face_class`), because transformers and
accelerate find layers by class name: ``_no_split_modules`` for device maps, the Trainer's
FSDP auto-wrap (``get_module_class_from_name``). transformers' ``GradientCheckpointingLayer``
wraps ``forward`` when a subclass is made and checkpoints only in the outermost wrapper: the
converted class's ``forward`` is that wrapper, so ``gradient_checkpointing_enable()`` still
checkpoints every layer it did (and the recomputation draws what the pass drew).

In training, a dropped branch's modules do not run: ``attentions`` (``output_attentions=True``)
then hold, for a gated attention branch, the attention of the samples that kept it (the row
modes; a smaller first dimension) or nothing for that layer where no sample kept it (where
transformers' layer returns a tuple, ``None`` in its place). Hidden states are the layers'
outputs and keep their shape. In eval mode every branch runs: outputs equal the unconverted
model's.

Refused with a ``TypeError`` from ``add_stochastic_depth`` (before anything is changed): the
layers in :data:`REFUSED`, whose drop path is not a drop of a residual branch per image, and any
other transformers layer with a drop path that is not in :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from stochastic_depth.compilation import not_a_frame
from stochastic_depth.gate import StochasticDepth
from stochastic_depth.library_blocks import GatedBlock, register_class_maker

__all__ = [
    "FAMILIES",
    "REFUSED",
    "BeitShape",
    "ConvNextShape",
    "DINOv3ConvNextShape",
    "Data2VecShape",
    "Dinov2Shape",
    "FocalNetShape",
    "HuggingFaceLayer",
    "PixioShape",
    "PreNormShape",
    "PvtV2Shape",
    "SegformerShape",
    "SwinShape",
    "Swinv2Shape",
    "converted_hugging_face_class",
    "family_name",
]


class HuggingFaceLayer(GatedBlock):
    """A transformers layer whose residual branches run through gates (the base of the shapes).

    The transformers class it converts holds one drop-path module, ``drop_path``, for all its
    branches (an ``nn.Identity`` where the rate is 0); each branch gets a gate of its own with
    that rate, drawing on its own, as transformers' module draws anew at each call.
    """

    DROP_PATHS: ClassVar[tuple[str, ...]] = ("drop_path",)
    GATES: ClassVar[tuple[str, ...]] = ("drop_path1", "drop_path2")

    def library_function(self, name: str) -> Callable[..., Any]:
        """A function of the converted class's own modeling file (``window_partition``, ...)."""
        return getattr(sys.modules[type(self).LIBRARY_CLASS.__module__], name)


def _first(outputs: Any) -> Tensor:
    """A transformers module's output: a tensor, or a tuple whose first item is one."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _rest(outputs: Any) -> tuple:
    """What a module returned beside its first output (attention weights)."""
    return outputs[1:] if isinstance(outputs, tuple) else ()


@not_a_frame
def _with_attentions(hidden_states: Tensor, recorded: list[tuple], wanted: bool) -> tuple:
    """A layer's tuple out: the hidden states and what the gated attention branch recorded, or
    ``None`` in its place where the branch ran on no sample and attention outputs are `wanted`."""
    if recorded:
        return (hidden_states, *recorded[0])
    return (hidden_states, None) if wanted else (hidden_states,)


class PreNormShape(HuggingFaceLayer):
    """``x + s1(d1(attention(norm1(x), *args)))``, then ``x + s2(d2(mlp(norm2(x)[, *args])))``, gated.

    A shape described by attribute names: ``NORMS``, ``ATTENTION`` and ``MLP`` the modules;
    ``LAYER_SCALES`` and ``DROPOUTS`` the modules applied after each branch (None: none);
    ``MLP_ARGS`` how many of the layer's arguments after the hidden states the MLP gets too
    (Segformer's ``height, width``). ``x``: ``(N, tokens, C)``; returns the hidden states.
    """

    NORMS: ClassVar[tuple[str, str]] = ("norm1", "norm2")
    ATTENTION: ClassVar[str] = "attention"
    MLP: ClassVar[str] = "mlp"
    LAYER_SCALES: ClassVar[tuple[str | None, str | None]] = (None, None)
    DROPOUTS: ClassVar[tuple[str | None, str | None]] = (None, None)
    MLP_ARGS: ClassVar[int] = 0
    drop_path1: StochasticDepth
    drop_path2: StochasticDepth

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "BRANCHES" not in cls.__dict__:  # the children each branch runs, from the names above
            cls.BRANCHES = {
                gate: tuple(n for n in (cls.NORMS[i], (cls.ATTENTION, cls.MLP)[i], cls.DROPOUTS[i], cls.LAYER_SCALES[i]) if n)
                for i, gate in enumerate(cls.GATES)
            }

    def _after(self, h: Tensor, i: int) -> Tensor:
        for name in (self.DROPOUTS[i], self.LAYER_SCALES[i]):
            if name is not None:
                h = getattr(self, name)(h)
        return h

    @not_a_frame
    def gated_branches(self, hidden_states: Tensor, args: tuple, kwargs: dict[str, Any], recorded: list[tuple]) -> Tensor:
        """Both branches through their gates; the attention branch's other outputs go to `recorded`."""

        batch, gate1 = hidden_states.shape[0], self.drop_path1

        def attention(x: Tensor) -> Tensor:
            # (in a row mode x holds the kept samples: so must a per-sample attention mask, EoMT's)
            outputs = getattr(self, self.ATTENTION)(getattr(self, self.NORMS[0])(x), *gate1.kept_inputs(args, batch),
                                                    **gate1.kept_inputs(kwargs, batch))  # fmt: skip
            recorded.append(_rest(outputs))
            return self._after(_first(outputs), 0)

        def mlp(x: Tensor) -> Tensor:
            return self._after(getattr(self, self.MLP)(getattr(self, self.NORMS[1])(x), *args[: self.MLP_ARGS]), 1)

        hidden_states = self.drop_path1(attention, hidden_states, hidden_states)
        return self.drop_path2(mlp, hidden_states, hidden_states)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.gated_branches(hidden_states, args, kwargs, [])


class BeitShape(HuggingFaceLayer):
    """BEiT's layer: ``x + drop_path(lambda_1 * dropout(attention(layernorm_before(x))))``, then the MLP.

    The relative position bias is added into the attention mask before the branches, as
    transformers does; it has no batch dimension, so the kept samples' attention gets it whole.
    """

    BRANCHES = {"drop_path1": ("layernorm_before", "attention"), "drop_path2": ("layernorm_after", "mlp")}
    drop_path1: StochasticDepth
    drop_path2: StochasticDepth

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        if self.relative_position_bias is not None:
            height, width = resolution
            window_size = (height // self.patch_size, width // self.patch_size)
            bias = self.relative_position_bias(window_size, interpolate_pos_encoding, dim_size=hidden_states.shape[1])
            attention_mask = bias if attention_mask is None else bias + attention_mask

        def attention(x: Tensor) -> Tensor:
            h, _ = self.attention(self.layernorm_before(x), attention_mask=attention_mask, **kwargs)
            return self.lambda_1 * self.dropout(h)

        def mlp(x: Tensor) -> Tensor:
            return self.lambda_2 * self.dropout(self.mlp(self.layernorm_after(x)))

        hidden_states = self.drop_path1(attention, hidden_states, hidden_states)
        return self.drop_path2(mlp, hidden_states, hidden_states)


class Data2VecShape(HuggingFaceLayer):
    """Data2Vec-Vision's layer: BEiT's, with the bias passed in, ``intermediate``/``output`` as the MLP, a tuple out."""

    BRANCHES = {"drop_path1": ("layernorm_before", "attention"), "drop_path2": ("layernorm_after", "intermediate", "output")}
    drop_path1: StochasticDepth
    drop_path2: StochasticDepth

    def forward(
        self,
        hidden_states: Tensor,
        output_attentions: bool = False,
        relative_position_bias: Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        resolution: tuple[int, int] | None = None,
    ) -> tuple:
        recorded: list[tuple] = []

        def attention(x: Tensor) -> Tensor:
            outputs = self.attention(
                self.layernorm_before(x), output_attentions=output_attentions, relative_position_bias=relative_position_bias,
                interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution,
            )  # fmt: skip
            recorded.append(outputs[1:])
            return outputs[0] if self.lambda_1 is None else self.lambda_1 * outputs[0]

        def mlp(x: Tensor) -> Tensor:
            h = self.output(self.intermediate(self.layernorm_after(x)))
            return h if self.lambda_2 is None else self.lambda_2 * h

        hidden_states = self.drop_path1(attention, hidden_states, hidden_states)
        hidden_states = self.drop_path2(mlp, hidden_states, hidden_states)
        return _with_attentions(hidden_states, recorded, output_attentions)


class _WindowAttentionShape(HuggingFaceLayer):
    """Shifted-window attention of a Swin layer, on any batch: ``(N, H * W, C) -> (N, H * W, C)``."""

    def window_attention(self, x: Tensor, height: int, width: int, recorded: list[tuple], *args: Any, **kwargs: Any) -> Tensor:
        batch_size, _, channels = x.shape
        window_partition, window_reverse = self.library_function("window_partition"), self.library_function("window_reverse")
        x, pad_values = self.maybe_pad(x.view(batch_size, height, width, channels), height, width)
        _, height_pad, width_pad, _ = x.shape
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        windows = window_partition(x, self.window_size).view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=x.dtype, device=windows.device)
        outputs = self.attention(windows, attn_mask, *args, **kwargs)
        recorded.append(_rest(outputs))
        h = window_reverse(_first(outputs).view(-1, self.window_size, self.window_size, channels), self.window_size,
                           height_pad, width_pad)  # fmt: skip
        if self.shift_size > 0:
            h = torch.roll(h, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        if pad_values[3] > 0 or pad_values[5] > 0:
            h = h[:, :height, :width, :].contiguous()
        return h.reshape(batch_size, height * width, channels)


class SwinShape(_WindowAttentionShape):
    """Swin's layer: ``x + drop_path(attention(layernorm_before(x)))``, then ``x + mlp(layernorm_after(x))``.

    transformers drops the attention branch only (the MLP branch has no drop path), and so does
    the converted layer: one gate.
    """

    GATES = ("drop_path",)
    BRANCHES = {"drop_path": ("layernorm_before", "attention")}
    drop_path: StochasticDepth

    def forward(
        self, hidden_states: Tensor, input_dimensions: tuple[int, int], always_partition: bool = False, **kwargs: Any
    ) -> tuple[Tensor, Tensor | None]:
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        height, width = input_dimensions
        recorded: list[tuple] = []

        def attention(x: Tensor) -> Tensor:
            h = self.window_attention(self.layernorm_before(x), height, width, recorded, **kwargs)
            return self.dropout(h)  # (transformers' order: dropout, then the windows reversed; elementwise)

        hidden_states = self.drop_path(attention, hidden_states, hidden_states)
        hidden_states = hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states)))
        return hidden_states, recorded[0][0] if recorded and recorded[0] else None


class Swinv2Shape(_WindowAttentionShape):
    """Swin V2's layer: ``x + layernorm_before(attention(x))``, then ``x + layernorm_after(mlp(x))``, each gated."""

    BRANCHES = {"drop_path1": ("attention", "layernorm_before"), "drop_path2": ("intermediate", "output", "layernorm_after")}
    drop_path1: StochasticDepth
    drop_path2: StochasticDepth

    def forward(self, hidden_states: Tensor, input_dimensions: tuple[int, int], output_attentions: bool | None = False) -> tuple:
        height, width = input_dimensions
        recorded: list[tuple] = []

        def attention(x: Tensor) -> Tensor:
            return self.layernorm_before(self.window_attention(x, height, width, recorded, output_attentions=output_attentions))

        def mlp(x: Tensor) -> Tensor:
            return self.layernorm_after(self.output(self.intermediate(x)))

        hidden_states = self.drop_path1(attention, hidden_states, hidden_states)
        hidden_states = self.drop_path2(mlp, hidden_states, hidden_states)
        return _with_attentions(hidden_states, recorded, bool(output_attentions))


class FocalNetShape(HuggingFaceLayer):
    """FocalNet's layer: ``x + gamma_1 * modulation(norm1(x))``, then ``x + gamma_2 * mlp(norm2(x))`` (or post-norm), gated."""

    BRANCHES = {"drop_path1": ("norm1", "modulation"), "drop_path2": ("norm2", "mlp")}
    drop_path1: StochasticDepth
    drop_path2: StochasticDepth

    def forward(self, hidden_state: Tensor, input_dimensions: tuple[int, int]) -> Tensor:
        height, width = input_dimensions

        def modulation(x: Tensor) -> Tensor:
            batch_size, _, channels = x.shape
            h = x if self.use_post_layernorm else self.norm1(x)
            h = self.modulation(h.view(batch_size, height, width, channels)).view(batch_size, height * width, channels)
            return self.gamma_1 * (self.norm1(h) if self.use_post_layernorm else h)

        def mlp(x: Tensor) -> Tensor:
            return self.gamma_2 * (self.norm2(self.mlp(x)) if self.use_post_layernorm else self.mlp(self.norm2(x)))

        hidden_state = self.drop_path1(modulation, hidden_state, hidden_state)
        return self.drop_path2(mlp, hidden_state, hidden_state)


class ConvNextShape(HuggingFaceLayer):
    """ConvNeXt's layer: ``x + scale * pointwise(norm(depthwise(x)))``, gated; ``(N, C, H, W)``.

    ``CHAIN`` names the modules after the depthwise convolution, applied channels-last
    (a ``grn`` that is absent, as in ConvNeXt V1, is skipped); ``LAYER_SCALE`` the parameter
    (None where the config has no layer scale).
    """

    GATES = ("drop_path",)
    DEPTHWISE: ClassVar[str] = "dwconv"
    CHAIN: ClassVar[tuple[str, ...]] = ("layernorm", "pwconv1", "act", "grn", "pwconv2")
    LAYER_SCALE: ClassVar[str] = "layer_scale_parameter"
    drop_path: StochasticDepth

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "BRANCHES" not in cls.__dict__:
            cls.BRANCHES = {"drop_path": (cls.DEPTHWISE, *cls.CHAIN)}

    def branch(self, x: Tensor) -> Tensor:
        """``(N, C, H, W) -> (N, C, H, W)``."""
        h = getattr(self, self.DEPTHWISE)(x).permute(0, 2, 3, 1)
        for name in self.CHAIN:
            module = getattr(self, name, None)
            if module is not None:
                h = module(h)
        scale = getattr(self, self.LAYER_SCALE, None)
        if scale is not None:
            h = scale * h
        return h.permute(0, 3, 1, 2)

    def forward(self, features: Tensor) -> Tensor:
        return self.drop_path(self.branch, features, features)


class DINOv3ConvNextShape(ConvNextShape):
    """DINOv3's ConvNeXt layer: ConvNeXt's, with other names."""

    DEPTHWISE, LAYER_SCALE = "depthwise_conv", "gamma"
    CHAIN = ("layer_norm", "pointwise_conv1", "activation_fn", "pointwise_conv2")


class Dinov2Shape(PreNormShape):
    """DINOv2's layer (and DINOv3's, EoMT's): layer scales after both branches."""

    LAYER_SCALES = ("layer_scale1", "layer_scale2")


class PixioShape(PreNormShape):
    """Pixio's layer: ``layernorm_before``/``layernorm_after``, dropout after both branches, no layer scale."""

    NORMS, DROPOUTS = ("layernorm_before", "layernorm_after"), ("dropout", "dropout")


class SegformerShape(PreNormShape):
    """Segformer's layer: dropout after the attention, ``height, width`` to both branches."""

    NORMS, DROPOUTS, MLP_ARGS = ("layernorm_before", "layernorm_after"), ("hidden_dropout", None), 2


class PvtV2Shape(PreNormShape):
    """PVTv2's layer (and GLPN's): ``layer_norm_1``/``layer_norm_2``, ``height, width`` to both branches, a tuple out."""

    NORMS, MLP_ARGS = ("layer_norm_1", "layer_norm_2"), 2

    def forward(self, hidden_states: Tensor, height: int, width: int, output_attentions: bool = False) -> tuple:
        recorded: list[tuple] = []
        hidden_states = self.gated_branches(hidden_states, (height, width, output_attentions), {}, recorded)
        return _with_attentions(hidden_states, recorded, output_attentions)


# The transformers layers that add_stochastic_depth converts (module under transformers.models, and
# class name), and their shapes.
FAMILIES: dict[str, type[HuggingFaceLayer]] = {
    "dinov2.modeling_dinov2.Dinov2Layer": Dinov2Shape,
    "dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersLayer": Dinov2Shape,
    "dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayer": Dinov2Shape,
    "eomt.modeling_eomt.EomtLayer": Dinov2Shape,
    "pixio.modeling_pixio.PixioLayer": PixioShape,
    "beit.modeling_beit.BeitLayer": BeitShape,
    "data2vec.modeling_data2vec_vision.Data2VecVisionLayer": Data2VecShape,
    "swin.modeling_swin.SwinLayer": SwinShape,
    "swinv2.modeling_swinv2.Swinv2Layer": Swinv2Shape,
    "swin2sr.modeling_swin2sr.Swin2SRLayer": Swinv2Shape,
    "focalnet.modeling_focalnet.FocalNetLayer": FocalNetShape,
    "convnext.modeling_convnext.ConvNextLayer": ConvNextShape,
    "convnextv2.modeling_convnextv2.ConvNextV2Layer": ConvNextShape,
    "dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayer": DINOv3ConvNextShape,
    "segformer.modeling_segformer.SegformerLayer": SegformerShape,
    "glpn.modeling_glpn.GLPNLayer": PvtV2Shape,
    "pvt_v2.modeling_pvt_v2.PvtV2BlockLayer": PvtV2Shape,
}

# transformers layers with a drop path that is not a drop of a residual branch per image, and why.
REFUSED: dict[str, str] = {
    "CvtLayer": "its drop path drops the whole layer output, the residual included, so a dropped sample would lose its "
                "features rather than skip a branch",
    "TimesformerLayer": "its batch dimension holds the frames or patches of the videos, not the videos, so a per-sample "
                        "drop would drop parts of a video",
    "SegGptLayer": "its branch mixes the samples of the batch (the prompt and the input), so it cannot run on the kept "
                   "samples alone",
    "RfDetrDinov2Layer": "its windowed layers hold the windows of an image in the batch dimension",
    "HieraLayer": "its shortcut is computed from the branch's normalised input, so the branch and the shortcut cannot "
                  "be told apart",
    "PoolFormerLayer": "it has a second drop path inside its MLP output",
    "PoolFormerOutput": "it is a drop path inside PoolFormer's MLP, not on a residual branch",
}  # fmt: skip

_MADE: dict[type[nn.Module], type[HuggingFaceLayer]] = {}


def family_name(library_class: type) -> str:
    """``"dinov2.modeling_dinov2.Dinov2Layer"`` for transformers' ``Dinov2Layer`` (a key of :data:`FAMILIES` and of ``layer_drop.STACKS``); "" outside transformers."""
    module = library_class.__module__
    return f"{module.removeprefix('transformers.models.')}.{library_class.__name__}" if module.startswith("transformers.") else ""


def converted_hugging_face_class(library_class: type[nn.Module]) -> type[HuggingFaceLayer] | None:
    """The gated class that converts the transformers class `library_class`, or None.

    Made at the first call, as ``type(name, (shape, library_class), ...)`` with ``name`` the
    transformers class's own (see the module's docstring); the same class at every call.
    """
    made = _MADE.get(library_class)
    if made is not None:
        return made
    shape = FAMILIES.get(family_name(library_class))
    if shape is None:
        return None
    made = type(library_class.__name__, (shape, library_class), {
        "LIBRARY_CLASS": library_class,
        "__module__": __name__,
        "__qualname__": library_class.__qualname__,
        "__doc__": f"transformers' ``{library_class.__name__}``, gated: {(shape.__doc__ or '').splitlines()[0]}",
    })  # fmt: skip
    _MADE[library_class] = made
    return made


register_class_maker(converted_hugging_face_class)


def __getattr__(name: str) -> type[HuggingFaceLayer]:
    # A pickled converted model names its layers' classes as this module's (``torch.save(model)``,
    # ``copy`` through pickling): they are made again from transformers on loading.
    for family in FAMILIES:
        module, _, class_name = family.rpartition(".")
        if class_name == name:  # (imported only here: importing this module does not import transformers)
            return converted_hugging_face_class(getattr(importlib.import_module(f"transformers.models.{module}"), name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
