"""LayerDrop in Hugging Face ``transformers``' encoders and decoders, with the gates' guarantees.

LayerDrop (Fan et al., 2019, "Reducing Transformer Depth on Demand with Structured Dropout")
is stochastic depth over whole transformer layers: in training each layer is skipped with
probability ``p`` (its output is its input), nothing is rescaled, and every layer runs at test
time. transformers' stacks draw it themselves, in their layer loop, from each process's own
``torch.rand([])``: processes drop different layers under DDP, and under DeepSpeed ZeRO-3 or
FSDP the speech encoders run a dropped layer anyway and keep its output (LayerDrop is then off).

``add_stochastic_depth`` converts every layer of a stack in :data:`STACKS`: the layer gets one
gate, ``layerdrop``, that skips it whole (``gate(layer, x, None)``, see
:class:`~stochastic_depth.gate.StochasticDepth`), with the stack's rate (the same ``p`` for
every layer, as transformers has it) and ``mode="batch"`` (one draw per layer and pass, as
transformers draws) by default. The stack's own draw is turned off without touching the
user's config, which ``save_pretrained`` writes as it was:

- a stack that reads its rate from an attribute (``BartEncoder.layerdrop``, set from the config
  when it is built) gets ``layerdrop = 0.0`` on the stack;
- a stack that reads ``self.config.layerdrop`` (the wav2vec2 family) gets, as ``config``, a
  view of the model's config: the very same attributes (one ``__dict__``: a change to the
  model's config shows there too), except the rate, which reads 0; a copy of the model
  (``copy.deepcopy``, pickling) gets a view of its own config.

After converting, the gates hold the rates: changing ``layerdrop`` in the config changes what
``save_pretrained`` writes, not what the model drops (convert again, or set the gates'
``survival_prob``).

A converted layer's class has the transformers class's name (see ``stochastic_depth.hugging_face``):
``_no_split_modules``, FSDP auto-wrap and ``GradientCheckpointingLayer`` keep working, and a
recomputed layer drops as its forward did. Every layer is called in training too, so the
hooks that collect ``output_hidden_states`` record one hidden state per layer (a dropped layer's
is its input); a dropped layer records no ``attentions`` (the attention module does not run).
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from stochastic_depth.gate import StochasticDepth
from stochastic_depth.hugging_face import family_name
from stochastic_depth.library_blocks import GatedBlock

__all__ = ["REFUSED_STACKS", "STACKS", "LayerDropLayer", "LayerDropStack", "layer_drop_stacks", "stop_stack_draws"]


@dataclass(frozen=True)
class LayerDropStack:
    """Where a transformers stack keeps its layers and its LayerDrop rate.

    ``rate``: the attribute its forward compares its draw with, on the stack (``"layerdrop"``)
    or on its config (``"config.layerdrop"``). ``layers``: the ``nn.ModuleList`` of its layers.
    ``passes_through``: the keyword arguments a layer returns after the hidden states (WavLM's
    ``position_bias``), which a dropped layer passes through unchanged. ``first_kept``: the
    first layer is never dropped (WavLM's computes the position bias the others read).
    """

    rate: str = "layerdrop"
    layers: str = "layers"
    passes_through: tuple[str, ...] = ()
    first_kept: bool = False

    def rate_owner(self, stack: nn.Module) -> tuple[Any, str]:
        """The object that holds `stack`'s rate (the stack or its config) and the attribute's name."""
        if self.rate.startswith("config."):
            return stack.config, self.rate.removeprefix("config.")
        return stack, self.rate


_CONFIG = LayerDropStack(rate="config.layerdrop")
_WAVLM = LayerDropStack(rate="config.layerdrop", passes_through=("position_bias",), first_kept=True)

# The stacks converted (module under transformers.models, and class name).
STACKS: dict[str, LayerDropStack] = {
    "wav2vec2.modeling_wav2vec2.Wav2Vec2Encoder": _CONFIG,
    "wav2vec2.modeling_wav2vec2.Wav2Vec2EncoderStableLayerNorm": _CONFIG,
    "hubert.modeling_hubert.HubertEncoder": _CONFIG,
    "hubert.modeling_hubert.HubertEncoderStableLayerNorm": _CONFIG,
    "wavlm.modeling_wavlm.WavLMEncoder": _WAVLM,
    "wavlm.modeling_wavlm.WavLMEncoderStableLayerNorm": _WAVLM,
    "data2vec.modeling_data2vec_audio.Data2VecAudioEncoder": _CONFIG,
    "sew.modeling_sew.SEWEncoder": _CONFIG,
    "unispeech.modeling_unispeech.UniSpeechEncoder": _CONFIG,
    "unispeech.modeling_unispeech.UniSpeechEncoderStableLayerNorm": _CONFIG,
    "unispeech_sat.modeling_unispeech_sat.UniSpeechSatEncoder": _CONFIG,
    "unispeech_sat.modeling_unispeech_sat.UniSpeechSatEncoderStableLayerNorm": _CONFIG,
    "bart.modeling_bart.BartEncoder": LayerDropStack(),
    "bart.modeling_bart.BartDecoder": LayerDropStack(),
    "mbart.modeling_mbart.MBartEncoder": LayerDropStack(),
    "mbart.modeling_mbart.MBartDecoder": LayerDropStack(),
    "marian.modeling_marian.MarianEncoder": LayerDropStack(),
    "marian.modeling_marian.MarianDecoder": LayerDropStack(),
    "pegasus.modeling_pegasus.PegasusEncoder": LayerDropStack(),
    "pegasus.modeling_pegasus.PegasusDecoder": LayerDropStack(),
    "m2m_100.modeling_m2m_100.M2M100Encoder": LayerDropStack(),
    "m2m_100.modeling_m2m_100.M2M100Decoder": LayerDropStack(),
    "whisper.modeling_whisper.WhisperEncoder": LayerDropStack(),
    "whisper.modeling_whisper.WhisperDecoder": LayerDropStack(),
    "speech_to_text.modeling_speech_to_text.Speech2TextEncoder": LayerDropStack(),
    "speech_to_text.modeling_speech_to_text.Speech2TextDecoder": LayerDropStack(),
    "opt.modeling_opt.OPTDecoder": LayerDropStack(),
}

# Stacks with LayerDrop that are not stacks of residual layers, and why.
REFUSED_STACKS: dict[str, str] = {
    "Wav2Vec2Adapter": "its LayerDrop drops stride-2 convolutions that shorten the sequence, not residual layers",
    "Data2VecAudioAdapter": "its LayerDrop drops stride-2 convolutions that shorten the sequence, not residual layers",
    "WavLMAdapter": "its LayerDrop drops stride-2 convolutions that shorten the sequence, not residual layers",
    "Mask2FormerMaskedAttentionDecoder": "a skipped layer also skips its mask prediction, which the next layer reads",
}


@functools.cache
def _draws_layer_drop(cls: type) -> bool:
    """Whether a transformers class's forward reads a LayerDrop rate (its source says ``layerdrop``)."""
    try:
        return "layerdrop" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _rate_is_zero(stack: nn.Module) -> bool:
    """Whether a stack's LayerDrop rate, read where transformers' stacks keep it (``layerdrop`` on the
    stack, or on its config), is 0."""
    for owner in (stack, getattr(stack, "config", None)):
        rate = getattr(owner, "layerdrop", None)
        if isinstance(rate, (int, float)):
            return rate == 0
    return False


class LayerDropLayer(GatedBlock):
    """A transformers layer that its gate, ``layerdrop``, skips whole (LayerDrop).

    Made by :func:`layer_drop_stacks` per transformers layer class, with that class's name;
    ``forward`` takes what the layer takes and returns what it returns: the layer's output
    where it runs, its input where it is dropped (and the arguments in ``PASSES_THROUGH``
    after it, where the layer returns a tuple).
    """

    GATES: ClassVar[tuple[str, ...]] = ("layerdrop",)
    LAYER_CLASS: ClassVar[type[nn.Module]]
    PASSES_THROUGH: ClassVar[tuple[str, ...]] = ()
    layerdrop: StochasticDepth

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        others: list[tuple] = []

        def layer(x: Tensor) -> Tensor:
            batch = hidden_states.shape[0]  # (row modes: x holds the kept samples; so must an attention mask)
            gate = self.layerdrop
            out = self.LAYER_CLASS.forward(self, x, *gate.kept_inputs(args, batch), **gate.kept_inputs(kwargs, batch))
            if isinstance(out, tuple):
                others.append(out[1:])
                return out[0]
            return out

        if self.PASSES_THROUGH and self.training and self.layerdrop.mode != "batch":
            raise ValueError(
                f"{type(self).__name__} returns {', '.join(self.PASSES_THROUGH)} beside its hidden states, computed "
                f"for the samples it runs on, so it cannot be skipped per sample (mode={self.layerdrop.mode!r}): "
                "convert the model with mode='batch' (LayerDrop's own)"
            )
        hidden_states = self.layerdrop(layer, hidden_states, None)
        if not self.PASSES_THROUGH:
            return hidden_states
        return (hidden_states, *(others[0] if others else (kwargs.get(name) for name in self.PASSES_THROUGH)))


_MADE: dict[type[nn.Module], type[LayerDropLayer]] = {}


def _layer_class(layer: nn.Module, stack: LayerDropStack) -> type[LayerDropLayer]:
    """The LayerDrop class of `layer`'s transformers class (made once, with its name)."""
    library_class = type(layer)
    made = _MADE.get(library_class)
    if made is None:
        made = _MADE[library_class] = type(library_class.__name__, (LayerDropLayer, library_class), {
            "LAYER_CLASS": library_class,
            "PASSES_THROUGH": stack.passes_through,
            "BRANCHES": {"layerdrop": ()},
            "__module__": __name__,
            "__qualname__": library_class.__qualname__,
            "__doc__": f"transformers' ``{library_class.__name__}``, skipped whole by its gate ``layerdrop`` (LayerDrop).",
        })  # fmt: skip
    # The branch is the whole layer: every child (the class's BRANCHES, for FSDP2's recipe).
    children = tuple(name for name in layer.__dict__.get("_modules", ()) if name != "layerdrop")
    made.BRANCHES = {"layerdrop": tuple(dict.fromkeys(made.BRANCHES["layerdrop"] + children))}
    return made


@dataclass
class StackConversion:
    """One stack with LayerDrop: its layers as ``(parent list, index, layer, made class)`` and their rates."""

    stack: nn.Module
    layers: list[tuple[nn.ModuleList, str, nn.Module, type[LayerDropLayer]]]
    rates: list[float]
    description: LayerDropStack


def layer_drop_stacks(model: nn.Module) -> list[StackConversion]:
    """The transformers stacks with LayerDrop in `model`, in ``model.modules()`` order; changes nothing.

    Raises
    ------
    TypeError
        For a stack in :data:`REFUSED_STACKS`, or another transformers module whose forward
        draws LayerDrop and that is not in :data:`STACKS`, naming it and why.
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LayerDropLayer) or not type(module).__module__.startswith("transformers."):
            continue
        description = STACKS.get(family_name(type(module)))
        if description is None:
            if not _draws_layer_drop(type(module)) or _rate_is_zero(module):
                continue  # (a stack whose LayerDrop rate is 0 draws nothing: nothing to convert)
            why = REFUSED_STACKS.get(type(module).__name__)
            raise TypeError(
                f"{name or type(model).__name__} ({type(module).__name__}) draws LayerDrop, and add_stochastic_depth "
                + (f"does not convert it: {why}. " if why else "does not know this stack (each needs its rate and layers "
                   f"described in stochastic_depth.layer_drop.STACKS; known: {', '.join(s.rpartition('.')[2] for s in STACKS)}). ")
                + (f"To convert the rest, turn this stack's LayerDrop off on the built model ({name}.layerdrop = 0.0, "
                   "the attribute it reads; changing the config after building changes nothing there)."
                   if isinstance(getattr(module, "layerdrop", None), (int, float)) else
                   "Build the model with a LayerDrop rate of 0 for this stack to convert the rest.")
            )
        layers = getattr(module, description.layers)
        if all(isinstance(layer, LayerDropLayer) for layer in layers):  # converted before: the gates hold the rates
            rates = [1.0 - layer.layerdrop.survival_prob for layer in layers]
        else:
            rate = float(getattr(*description.rate_owner(module)))
            rates = [0.0 if i == 0 and description.first_kept else rate for i in range(len(layers))]
        made = [(layers, str(i), layer, type(layer) if isinstance(layer, LayerDropLayer) else _layer_class(layer, description))
                for i, layer in enumerate(layers)]  # fmt: skip
        found.append(StackConversion(module, made, rates, description))
    return found


def _without(config: Any, attribute: str) -> Any:
    """A view of `config`: the same attributes (one ``__dict__``), except `attribute`, which reads 0.

    Its class (one per view) holds `config`, so that a copy of the model (``copy.deepcopy``, pickling)
    gets a view of the copy of the model's config, sharing its attributes as this one does.
    """
    view_class = type(type(config).__name__, (type(config),), {
        attribute: property(lambda self: 0.0),
        "layer_drop_view": True,
        "source": config,
        "__deepcopy__": lambda self, memo: _without(copy.deepcopy(config, memo), attribute),
        "__reduce__": lambda self: (_without, (config, attribute)),
        "__module__": __name__,
    })  # fmt: skip
    view = object.__new__(view_class)
    view.__dict__ = config.__dict__
    return view


def stop_stack_draws(conversion: StackConversion) -> None:
    """Turn off the stack's own LayerDrop draw, leaving the model's config as the user set it."""
    stack = conversion.stack
    owner, attribute = conversion.description.rate_owner(stack)
    if owner is stack:
        setattr(stack, attribute, 0.0)
    elif not getattr(type(owner), "layer_drop_view", False):
        stack.config = _without(owner, attribute)


def __getattr__(name: str) -> type:
    # A pickled converted model names its layers' classes (and its config views) as this module's:
    # they are made again from transformers on loading.
    import importlib  # (only here: importing this module does not import transformers)

    if name.startswith("_"):  # (Python's own probes, __path__ and the like: no class of transformers)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for family, description in STACKS.items():
        module = importlib.import_module(f"transformers.models.{family.rpartition('.')[0]}")
        library_class = getattr(module, name, None)
        if isinstance(library_class, type) and issubclass(library_class, nn.Module):
            return _layer_class(library_class.__new__(library_class), description)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
