"""Stochastic depth (Huang et al., ECCV 2016) for PyTorch: dropped residual branches are not computed.

The package's public face::

    from stochastic_depth import add_stochastic_depth, set_step, stochastic_depth_state

Modules, the base first:

``gate``
    The ``StochasticDepth`` gate, survival rules, ``set_step`` and the gates' state.
``compilation``
    ``compile_branches``: regional ``torch.compile`` of the residual branches, and everything
    else about ``torch.compile`` (the only module that uses dynamo's private API).
``autograd_ops``
    What the gate needs from autograd: a row scatter-add that saves only its indices, and
    whether a call is a recomputation.
``schedules``
    Schedules of the gates' ``drop_scale``: ``linear_drop_warmup``, ``early_drops``,
    ``late_drops``.
``library_blocks``
    ``GatedBlock``, what a gated block declares, and the gated classes of torchvision's
    ConvNeXt, Swin and EfficientNet blocks and timm's ViT, ConvNeXt and ResNet blocks.
``hugging_face``
    The gated classes of Hugging Face ``transformers``' vision layers with drop paths (DINOv2,
    BEiT, Swin, ConvNeXt, Segformer, PVTv2, FocalNet, ...), made from the user's transformers
    classes when a model holds them (importing it does not import transformers).
``conversion``
    ``add_stochastic_depth``: converts a network's blocks in place.
``distributed``, ``counting``, ``evaluation_network``
    FSDP2 and DDP (``fully_shard_stochastic_depth``, ``data_parallel``); FLOP floors;
    evaluating with a subset of the blocks. Import these on their own.
``trainer_callback``
    ``StochasticDepthCallback`` for Hugging Face's ``transformers.Trainer``: keys the drops by
    the optimizer step and saves the gates' state in the Trainer's checkpoints. Needs
    ``transformers`` and ``accelerate``, which ``import stochastic_depth`` does not import:
    ``from stochastic_depth.trainer_callback import StochasticDepthCallback``.

The ResNets (``ResNet``, ``StochasticResNet`` and their blocks) are in the model file,
``resnet_with_stochastic_depth``, imported here because its blocks are the gated classes of
torchvision's ResNet blocks: ``add_stochastic_depth`` converts a torchvision ResNet once it
is loaded.
"""

import resnet_with_stochastic_depth  # noqa: E402, F401, I001  (registers torchvision's ResNet blocks; see above)
from stochastic_depth.compilation import compile_branches
from stochastic_depth.conversion import add_stochastic_depth
from stochastic_depth.gate import (
    DROP_MODES,
    Decision,
    StochasticDepth,
    StochasticDepthState,
    draw_decision,
    key_seed,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
    survival_probabilities,
)
from stochastic_depth.schedules import early_drops, late_drops, linear_drop_warmup

__all__ = [
    "DROP_MODES",
    "Decision",
    "StochasticDepth",
    "StochasticDepthState",
    "add_stochastic_depth",
    "compile_branches",
    "draw_decision",
    "early_drops",
    "key_seed",
    "late_drops",
    "linear_drop_warmup",
    "set_step",
    "stochastic_depth_gates",
    "stochastic_depth_state",
    "survival_probabilities",
]
