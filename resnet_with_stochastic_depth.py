"""Residual networks with stochastic depth (Huang et al., ECCV 2016).

During training, residual block ``l`` survives a mini-batch with probability ``p_l``.
A dropped block is replaced by its shortcut: its residual branch is not computed at
all (no forward, no backward, no BatchNorm update), which is where the paper's
training-time saving comes from. At test time every block runs and its residual is
scaled by ``p_l``.

Public API
----------
``ResNet``, ``StochasticResNet``
    The plain and the stochastic network, built from the same blocks: same weights
    for the same seed, same ``state_dict`` keys (also the same as torchvision's
    ResNets). Named constructors: ``ResNet.imagenet(depth)`` (18, 34, 50, 101, 152)
    and ``ResNet.cifar(depth)`` (20, 32, 44, 56, 110, 1202), likewise on
    ``StochasticResNet``.
``BasicBlock``, ``Bottleneck``
    The blocks, gated classes (``stochastic_depth.library_blocks.GatedBlock``) that are also
    the conversions of torchvision's ``BasicBlock`` and ``Bottleneck``.
``add_stochastic_depth``, ``StochasticDepth``, ``set_step``, ``StochasticDepthState``,
``stochastic_depth_state``, ``stochastic_depth_gates``, ``survival_probabilities``,
``draw_decision``, ``key_seed``, ``linear_drop_warmup``, ``early_drops``, ``late_drops``
    The library's, defined in the package ``stochastic_depth`` and importable from here too
    (notebooks import them from here).

How drops are drawn
-------------------
Each gate draws for itself when its block runs in training mode, as a fixed function of
``(seed, gate index, step, pass)`` (and the rank, in the row modes); a recomputation by
activation checkpointing gets its pass's decision again. Processes agree because they share
the seed and, with ``set_step``, the step: nothing is communicated. The rules open
``stochastic_depth/gate.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from stochastic_depth.conversion import add_stochastic_depth
from stochastic_depth.gate import (
    DROP_MODES,
    Decision,
    DropMode,
    StochasticDepth,
    StochasticDepthState,
    SurvivalRule,
    draw_decision,
    key_seed,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
    survival_probabilities,
)
from stochastic_depth.library_blocks import GatedBlock
from stochastic_depth.schedules import early_drops, late_drops, linear_drop_warmup

__all__ = [
    "DROP_MODES",
    "AvgPoolZeroPad",
    "BasicBlock",
    "Bottleneck",
    "Decision",
    "ResNet",
    "StochasticDepth",
    "StochasticDepthState",
    "StochasticResNet",
    "add_stochastic_depth",
    "draw_decision",
    "key_seed",
    "early_drops",
    "late_drops",
    "linear_drop_warmup",
    "set_step",
    "stochastic_depth_gates",
    "stochastic_depth_state",
    "survival_probabilities",
]

ShortcutKind = Literal["projection", "A"]


# ----------------------------------------------------------------------------------
# Blocks. Attribute names follow torchvision (conv1, bn1, ..., downsample) so that
# state_dicts are interchangeable and torchvision blocks can be converted in place.
# ----------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class AvgPoolZeroPad(nn.Module):
    """He et al.'s "option A" shortcut: subsample, then append zero channels. No parameters.

    The shortcut of the paper's CIFAR networks where a block changes resolution and width:
    ``stride x stride`` average pooling with stride ``stride`` (as the official Lua code,
    ``SpatialAveragePooling(2, 2, 2, 2)``), then ``out_planes - in_planes`` channels of zeros
    after the input's channels.

    Parameters
    ----------
    in_planes, out_planes : int
        Channels in and out; ``out_planes >= in_planes``.
    stride : int
        Pooling window and stride; 1 pads only.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1) -> None:
        super().__init__()
        if out_planes < in_planes or stride < 1:
            raise ValueError(
                f"an option-A shortcut can only add channels and subsample: got {in_planes} -> {out_planes} "
                f"channels with stride {stride}"
            )
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, self.stride)
        # F.pad's last pair is the channel dimension of an NCHW tensor: zeros after the channels.
        return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - self.in_planes))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


class ResidualBlock(GatedBlock):
    """``relu(shortcut(x) + branch(x))``, the branch gated by ``stochastic_depth`` (None: not gated).

    ``branch(x)`` is ``after_conv1(conv1(x))``: the gate is handed the two parts, so that in the
    row modes ``conv1`` can gather the kept samples itself (see ``StochasticDepth``'s ``first``).
    """

    GATES = ("stochastic_depth",)
    conv1: nn.Conv2d

    def branch(self, x: Tensor) -> Tensor:
        """``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``: the residual branch."""
        return self.after_conv1(self.conv1(x))

    def after_conv1(self, out: Tensor) -> Tensor:
        raise NotImplementedError

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on every submodule before compiling it.
        raise TypeError(
            f"{type(self).__name__} (a residual block of resnet_with_stochastic_depth) cannot be compiled "
            "by TorchScript, which cannot call a branch passed as a function. Export the eval-mode model "
            "with torch.export.export(model.eval(), (images,)) instead, or torch.compile it."
        )

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.run_shortcut(self.downsample, x)
        if self.stochastic_depth is None:
            out = shortcut + self.run_region(self.after_conv1, self.conv1(x))
        else:
            out = self.stochastic_depth(self.after_conv1, x, shortcut, first=self.conv1)
        # A dropped block with an identity shortcut hands back x itself, which autograd
        # still needs: that one must not be overwritten by the in-place ReLU.
        return torch.relu(out) if out is x else self.relu(out)


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets); converts torchvision's ``BasicBlock``."""

    LIBRARY_CLASS = tv_resnet.BasicBlock
    BRANCHES = {"stochastic_depth": ("conv1", "bn1", "relu", "conv2", "bn2")}
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stochastic_depth = None

    def after_conv1(self, out: Tensor) -> Tensor:
        out = self.relu(self.bn1(out))
        return self.bn2(self.conv2(out))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand.

    Converts torchvision's ``Bottleneck``.
    """

    LIBRARY_CLASS = tv_resnet.Bottleneck
    BRANCHES = {"stochastic_depth": ("conv1", "bn1", "relu", "conv2", "bn2", "conv3", "bn3")}
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stochastic_depth = None

    def after_conv1(self, out: Tensor) -> Tensor:
        out = self.relu(self.bn1(out))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


# ----------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------

_IMAGENET_LAYOUTS: dict[int, tuple[type[ResidualBlock], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
_CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


class ResNet(nn.Module):
    """A residual network (He et al., 2016) for any number of channels and classes.

    Parameters
    ----------
    block : BasicBlock or Bottleneck
        Block class used in every stage.
    layers : sequence of int
        Number of blocks in each stage; each stage after the first halves the
        resolution with a stride-2 block.
    widths : sequence of int
        Base width of each stage (the block's output has ``width * block.expansion``
        channels).
    in_channels : int
        Channels of the input images (1 for MNIST).
    num_classes : int
        Size of the output.
    stem : {"imagenet", "cifar"}
        ``"imagenet"``: 7x7 stride-2 convolution and 3x3 stride-2 max-pool (divides the
        resolution by 4). ``"cifar"``: one 3x3 convolution at full resolution.
    zero_init_residual : bool
        Start each branch's last BatchNorm at zero, so every block starts as the
        identity (as torchvision offers).
    shortcut : {"projection", "A"}
        Shortcut of a block that changes resolution or width: ``"projection"``, a 1x1
        convolution and BatchNorm (He et al.'s option B, torchvision's); ``"A"``, the
        parameter-free ``AvgPoolZeroPad`` (He et al.'s CIFAR networks, the paper's).

    Notes
    -----
    Attribute and ``state_dict`` names are torchvision's (``conv1``, ``bn1``,
    ``layer1``..., ``fc``): ``ResNet.imagenet(50)`` loads a torchvision ``resnet50``
    state_dict as it is.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 3,
        num_classes: int = 1000,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        zero_init_residual: bool = False,
        shortcut: ShortcutKind = "projection",
    ) -> None:
        super().__init__()
        if shortcut not in ("projection", "A"):
            raise ValueError(f"unknown shortcut {shortcut!r}: expected 'projection' or 'A'")
        self.shortcut = shortcut
        if len(layers) != len(widths):
            raise ValueError(f"layers and widths must have one entry per stage, got {list(layers)} and {list(widths)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}: expected 'imagenet' or 'cifar'")
        self.in_channels = in_channels
        self.in_planes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.in_planes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, self.in_planes)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.in_planes)
        self.relu = nn.ReLU(inplace=True)

        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (name, num_blocks, width) in enumerate(zip(self.stage_names, layers, widths)):
            setattr(self, name, self._make_layer(block, width, num_blocks, stride=1 if i == 0 else 2))

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.blocks:
                nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def _make_layer(self, block: type[ResidualBlock], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.in_planes != planes * block.expansion:
            if self.shortcut == "A":
                downsample = AvgPoolZeroPad(self.in_planes, planes * block.expansion, stride)
            else:
                downsample = nn.Sequential(
                    conv1x1(self.in_planes, planes * block.expansion, stride),
                    nn.BatchNorm2d(planes * block.expansion),
                )
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    @classmethod
    def imagenet(cls, depth: int = 50, **kwargs) -> Self:
        """ResNet-18/34/50/101/152 in He et al.'s ImageNet layout (torchvision's).

        Parameters
        ----------
        depth : {18, 34, 50, 101, 152}
            Network depth; 50 and up use bottleneck blocks.
        **kwargs
            Passed to the class (``in_channels``, ``num_classes``, and for
            ``StochasticResNet`` the survival rule, ...).
        """
        if depth not in _IMAGENET_LAYOUTS:
            raise ValueError(f"no ImageNet ResNet of depth {depth}: choose one of {sorted(_IMAGENET_LAYOUTS)}")
        block, layers = _IMAGENET_LAYOUTS[depth]
        return cls(block, layers, **kwargs)

    @classmethod
    def cifar(cls, depth: int = 110, shortcut: ShortcutKind = "A", **kwargs) -> Self:
        """He et al.'s CIFAR ResNets, as used by Huang et al.: depth = 6n + 2.

        Three stages of ``n`` basic blocks with 16, 32 and 64 filters on a 3x3 stem at
        full resolution (ResNet-110: n = 18, L = 54 blocks; ResNet-1202: n = 200). By
        default the two blocks that halve the resolution and double the width have
        option-A shortcuts (``AvgPoolZeroPad``), as in the paper's code, so that for 10
        classes ResNet-20 has 269,722 parameters and ResNet-110 1,727,962 (He et al.'s
        0.27M and 1.7M). Convolutions have no bias: each is followed by a BatchNorm, whose
        shift makes a bias redundant (the official Lua code keeps one, which adds 16, 32
        or 64 parameters per convolution and changes nothing the network can compute).
        Every block, the downsampling ones included, can be dropped by stochastic depth;
        a dropped downsampling block outputs ``relu(shortcut(x))``.

        Parameters
        ----------
        depth : int
            ``6n + 2``: 20, 32, 44, 56, 110, 1202 or any other such number.
        shortcut : {"A", "projection"}
            ``"A"`` (the paper's) or ``"projection"``: 1x1 convolution and BatchNorm.
        **kwargs
            Passed to the class; ``in_channels`` defaults to 3, ``num_classes`` to 10.
        """
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (e.g. {_CIFAR_DEPTHS}), got {depth}")
        n = (depth - 2) // 6
        kwargs.setdefault("num_classes", 10)
        return cls(BasicBlock, [n, n, n], widths=(16, 32, 64), stem="cifar", shortcut=shortcut, **kwargs)

    @property
    def blocks(self) -> list[ResidualBlock]:
        """The residual blocks in forward order."""
        return [m for m in self.modules() if isinstance(m, ResidualBlock)]

    def forward(self, x: Tensor) -> Tensor:
        # (torch.fx traces with a Proxy, whose shape is unknown: no check then.)
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"expected a 4-D input of shape (batch, {self.in_channels}, height, width), "
                f"got shape {tuple(x.shape)}"
            )
        x = self._stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self._head(x)

    # The stem and the head are functions of their own: under torch.compile in training, where
    # each gate is a graph break inside the loop above, dynamo runs this frame eagerly (it cannot
    # resume inside a loop) and compiles these two as frames of their own.
    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


class StochasticResNet(ResNet):
    """A ``ResNet`` trained with stochastic depth (Huang et al., 2016).

    Same parameters, initialisation and ``state_dict`` keys as ``ResNet``: with the same
    ``torch.manual_seed`` both start from identical weights. Every residual block gets
    a ``StochasticDepth`` gate (see there for the training and test rules).

    Parameters
    ----------
    *args, **kwargs
        As for ``ResNet``.
    survival_rule : {"linear", "uniform"} or sequence of float
        See ``survival_probabilities``; blocks are numbered in forward order.
    p_last : float
        ``p_L``, the survival probability of the last block (paper: 0.5).
    mode : {"batch", "row", "row_subset"}
        One draw per mini-batch (the paper), one Bernoulli draw per sample, or a
        fixed-size random subset of the samples; see ``StochasticDepth``.
    inverted : bool
        Scale by ``1 / p_l`` while training instead of by ``p_l`` at test time.
    seed : int, optional
        Seed of the gates' draws, in [0, 2**62]. By default it is drawn from torch's
        global generator after the weights are initialised, so ``torch.manual_seed``
        makes the whole model reproducible. Under DDP give every process the same
        one (and see :func:`set_step`).

    Notes
    -----
    Each gate draws its decision when its block runs in training mode, and a block
    recomputed by activation checkpointing gets the same decision again; see the
    module's docstring for the rule.

    Examples
    --------
    >>> model = StochasticResNet.imagenet(50, in_channels=1, num_classes=10)
    >>> model.expected_active_blocks  # of its 16 blocks
    11.75
    """

    def __init__(
        self,
        *args,
        survival_rule: SurvivalRule = "linear",
        p_last: float = 0.5,
        mode: DropMode = "batch",
        inverted: bool = False,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        add_stochastic_depth(self, survival_rule, p_last, mode=mode, inverted=inverted, seed=seed)

    @property
    def seed(self) -> int:
        """The seed of the gates' draws."""
        return stochastic_depth_gates(self)[0].seed

    @property
    def survival_probabilities(self) -> list[float]:
        """``p_l`` of each residual block, in forward order."""
        return [gate.survival_prob for gate in stochastic_depth_gates(self)]

    @property
    def expected_active_blocks(self) -> float:
        """Expected number of blocks computed in a training pass, ``sum(p_l)``."""
        return math.fsum(self.survival_probabilities)

    @property
    def active_blocks(self) -> Tensor | None:
        """Which blocks ran in the last forward pass.

        A bool tensor of shape ``(L, batch)`` after a training pass in a row mode, ``(L,)``
        after one in ``"batch"`` mode or after an eval pass (all True: every block runs),
        or None before the first forward pass.
        """
        active = [gate.last_active for gate in stochastic_depth_gates(self)]
        return None if any(a is None for a in active) else torch.stack(active)
