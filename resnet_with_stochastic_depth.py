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
``StochasticDepth``
    The gate that wraps one residual block's branch.
``StochasticDepthState``, ``stochastic_depth_state``
    What drives a model's gates: its generator, the drop warm-up scale, and the
    decisions drawn once per forward pass (so that activation checkpointing
    recomputes a block with the same decision).
``survival_probabilities``
    The paper's linear-decay rule, the uniform rule or an explicit sequence.
``add_stochastic_depth``
    Turns a torchvision ResNet (or a ``ResNet`` from here) into a stochastic one,
    keeping its weights; also torchvision's ConvNeXt, Swin and EfficientNet and timm's
    ViT, ConvNeXt and ResNet, whose blocks ``library_blocks`` converts.
``compile_branches``
    Regional compilation: ``torch.compile`` the residual branches, gates left eager.
``linear_drop_warmup``
    The drop warm-up schedule of ``StochasticDepthState.drop_scale``.
``training_flop_floor``
    The fraction of a plain training step's FLOPs that stochastic depth still computes.
``training_operator_count``
    The operators of a training step on the device (GPU kernel launches) and on the
    host, which bound a small network's step on a GPU.
``draw_decisions``
    The gates' random draws for one training pass, all gates of a mode at once.
"""

from __future__ import annotations

import copy
import functools
import math
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Self

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode  # what FlopCounterMode is built on
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet as tv_resnet

__all__ = [
    "AvgPoolZeroPad",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "StochasticDepth",
    "Decision",
    "StochasticDepthState",
    "StochasticResNet",
    "add_stochastic_depth",
    "compile_branches",
    "draw_decisions",
    "linear_drop_warmup",
    "stochastic_depth_gates",
    "stochastic_depth_state",
    "training_flop_floor",
    "training_operator_count",
    "survival_probabilities",
]

SurvivalRule = Literal["linear", "uniform"] | Sequence[float]
DropMode = Literal["batch", "row", "row_subset"]
DROP_MODES = ("batch", "row", "row_subset")
ShortcutKind = Literal["projection", "A"]


# ----------------------------------------------------------------------------------
# Survival probabilities
# ----------------------------------------------------------------------------------


def _check_probability(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return value


def _check_mode(mode: str) -> str:
    if mode not in DROP_MODES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {DROP_MODES}")
    return mode


def survival_probabilities(
    num_blocks: int, rule: SurvivalRule = "linear", p_last: float = 0.5
) -> list[float]:
    """Survival probability of each residual block.

    Parameters
    ----------
    num_blocks : int
        Number of residual blocks ``L``.
    rule : {"linear", "uniform"} or sequence of float
        ``"linear"``: the paper's linear decay ``p_l = 1 - (l / L) (1 - p_L)`` for
        ``l = 1..L``, so the first block almost always survives and the last one
        survives with ``p_L``. ``"uniform"``: ``p_l = p_L`` for every block. A sequence:
        the probabilities themselves, one per block.
    p_last : float
        ``p_L``, the survival probability of the last block (the paper uses 0.5).
        Ignored when ``rule`` is a sequence.

    Returns
    -------
    list of float
        ``L`` probabilities in [0, 1].

    Raises
    ------
    ValueError
        For a probability outside [0, 1], a sequence of the wrong length or an
        unknown rule; the message names the bad value.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    if isinstance(rule, str):
        p_last = _check_probability(p_last, "p_last")
        if rule == "linear":
            return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]
        if rule == "uniform":
            return [p_last] * num_blocks
        raise ValueError(
            f"unknown survival rule {rule!r}: expected 'linear', 'uniform' "
            "or a sequence of probabilities"
        )
    probs = [float(p) for p in rule]
    if len(probs) != num_blocks:
        raise ValueError(
            f"expected {num_blocks} survival probabilities (one per residual block), "
            f"got {len(probs)}"
        )
    return [_check_probability(p, f"survival probability of block {i}") for i, p in enumerate(probs)]


# ----------------------------------------------------------------------------------
# The gate, and the state a model's gates share
# ----------------------------------------------------------------------------------


class Decision(NamedTuple):
    """One gate's draw for one forward pass of its model.

    ``active``: a bool scalar (``"batch"``) or one bool per sample (the row modes), on
    the CPU.
    ``survival_prob``: the survival probability it was drawn with (``p_l``, or less
    during a drop warm-up), which the training-time scaling uses.
    ``kept``: the row modes' indices of the samples that keep the branch, ascending,
    already on the device of the model's input when the model drew them; None in
    ``"batch"`` mode.
    """

    active: Tensor
    survival_prob: float
    kept: Tensor | None = None


def _subset_size(batch_size: int, survival_prob: float) -> int:
    """``k = round(B p)`` samples, at least one unless ``p == 0`` (DINOv2's rule)."""
    if survival_prob == 0.0:
        return 0
    return min(batch_size, max(1, math.floor(batch_size * survival_prob + 0.5)))


def _warmed_up(survival_prob: float, drop_scale: float) -> float:
    """The survival probability when only `drop_scale` of the drop probability applies."""
    return 1.0 - drop_scale * (1.0 - survival_prob)


def _indices_to(indices: Tensor, device: torch.device | None) -> Tensor:
    """`indices` (on the CPU) on `device`, without making the host wait for a GPU."""
    if device is None or indices.device == device:
        return indices
    if device.type == "cuda":
        # A copy from pageable memory waits for the GPU to finish all queued work;
        # from pinned memory it does not.
        indices = indices.pin_memory()
    return indices.to(device, non_blocking=True)


def draw_decisions(
    mode: DropMode,
    survival_probs: Sequence[float],
    batch_size: int,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> list[Decision]:
    """Draw one training pass's decisions for several gates of one mode, all at once.

    A handful of operators per pass instead of several per gate, and in the row
    modes one copy of every gate's kept indices to `device`: the host work that
    bounds a GPU step of a small network. ``"batch"`` and ``"row"`` take the same
    numbers from `generator` as one draw per gate in turn would.

    Parameters
    ----------
    mode : {"batch", "row", "row_subset"}
        As for :class:`StochasticDepth`.
    survival_probs : sequence of float
        Each gate's survival probability in this pass.
    batch_size : int
        Samples in the pass (unused in ``"batch"`` mode).
    generator : torch.Generator, optional
        CPU generator to draw from.
    device : torch.device, optional
        Where the row modes' ``kept`` indices go (the device of the model's input);
        the CPU if None.

    Returns
    -------
    list of Decision
        One per survival probability, in order.
    """
    gates = len(survival_probs)
    if mode == "batch":
        active = torch.rand(gates, generator=generator) < torch.tensor(survival_probs)
        return [Decision(a, p) for a, p in zip(active.unbind(), survival_probs)]
    if mode == "row":
        active = torch.rand(gates, batch_size, generator=generator) < torch.tensor(survival_probs)[:, None]
    else:
        # The k smallest of B uniform keys are a uniformly chosen k-subset; float64 keys
        # make a tie (which would bias the choice towards lower indices) practically impossible.
        keys = torch.rand(gates, batch_size, generator=generator, dtype=torch.float64)
        subset_sizes = torch.tensor([_subset_size(batch_size, p) for p in survival_probs])
        active = keys.argsort(dim=1).argsort(dim=1) < subset_sizes[:, None]
    kept = _indices_to(active.nonzero()[:, 1], device).split(active.sum(dim=1).tolist())
    return [Decision(a, p, k) for a, p, k in zip(active.unbind(), survival_probs, kept)]


def _stochastic_depth_cannot_train_traced(shortcut: Tensor) -> Tensor:
    raise RuntimeError(
        "this model was traced by torch.fx in training mode, where a trace would freeze one draw "
        "of which residual blocks run. Trace it in eval mode (model.eval()), where every block "
        "runs, and use the traced model for inference or feature extraction; train the original "
        "model (torch.compile it with compile_branches to compile it)."
    )


# A call to this function becomes a node of an fx graph instead of being run while tracing, so
# that tracing in training mode succeeds (torchvision's create_feature_extractor traces both
# modes) and running that graph raises the error above.
torch.fx.wrap("_stochastic_depth_cannot_train_traced")


class StochasticDepth(nn.Module):
    """Randomly bypasses one residual branch: ``shortcut + gate(branch(x))``.

    Training modes (``survival_prob`` is the probability of *keeping* the branch; the
    argument is keyword-only because torchvision's ``StochasticDepth(p, mode)`` takes
    the probability of *dropping* it):

    ``"batch"`` (the paper)
        One Bernoulli(``survival_prob``) draw per forward pass decides for the whole
        mini-batch. A dropped branch is not called: it costs nothing and its
        parameters get no gradient.
    ``"row"`` (torchvision's ``mode="row"``, timm's ``DropPath``)
        An independent Bernoulli(``survival_prob``) draw per sample; the branch runs
        only on the samples that keep it, so its batch size changes every step.
    ``"row_subset"`` (DINOv2's sample drop)
        Exactly ``k = round(B * survival_prob)`` samples (at least one, unless the
        probability is 0), chosen without replacement, keep the branch, which runs on
        those ``k``: the same shape every step, so it saves work on a GPU too. The
        kept residuals are scaled by ``survival_prob * B / k`` (``B / k`` when
        ``inverted``), so the expected output is the same as in the other modes.
        Samples are not independent (exactly ``k`` survive).

    Evaluation: the branch always runs, scaled by ``survival_prob`` (the paper's test
    rule), or unscaled when ``inverted=True``, in which case a surviving branch is
    scaled by ``1 / survival_prob`` while training instead. Both conventions give
    the same expected output. A branch with ``survival_prob == 0`` is left out.

    Inside a model built by ``StochasticResNet`` or ``add_stochastic_depth`` the
    model draws every gate's decision once at the start of its forward pass and the
    gate holds it (``decision``) until the next pass, so a block recomputed within
    the pass (activation checkpointing) makes the same choice. A gate used on its
    own draws at each call.

    The gate has no parameters or buffers, so it leaves ``state_dict`` unchanged.

    Parameters
    ----------
    survival_prob : float
        Keyword-only. Probability in [0, 1] that the branch is computed in a
        training pass (``p_l``; ``1 - p`` in torchvision's terms).
    mode : {"batch", "row", "row_subset"}
        See above.
    inverted : bool
        Use the inverted scaling (``1 / p`` while training, none at test).
    generator : torch.Generator, optional
        CPU generator for the draws; shared by all gates of a model so that one
        seed fixes the whole drop sequence. Drawing on the CPU also means the
        decision never waits for the GPU.
    """

    def __init__(
        self,
        *,
        survival_prob: float,
        mode: DropMode = "batch",
        inverted: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.survival_prob = _check_probability(survival_prob, "survival_prob")
        self.mode = _check_mode(mode)
        self.inverted = bool(inverted)
        self.generator = generator
        # Set by the model that draws for this gate (add_stochastic_depth): the decision
        # held for the current forward pass. None: the gate draws at each call.
        self.decision: Decision | None = None
        self.drawn_by_model = False
        # What the last forward pass computed: a bool scalar ("batch") or one bool per
        # sample (row modes). All True in evaluation, except for a block with p = 0.
        self.last_active: Tensor | None = None

    def draw(self, batch_size: int, drop_scale: float = 1.0) -> Decision:
        """Draw which samples keep the branch in one training pass.

        Parameters
        ----------
        batch_size : int
            Samples in the pass (unused in ``"batch"`` mode).
        drop_scale : float
            Fraction of the drop probability ``1 - survival_prob`` to apply: 0 keeps
            every branch, 1 (the default) is the target rate; a drop warm-up ramps it.
        """
        p = _warmed_up(self.survival_prob, drop_scale)
        return draw_decisions(self.mode, [p], batch_size, self.generator)[0]

    def forward(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor) -> Tensor:
        p = self.survival_prob
        if not self.training:
            self.last_active = torch.tensor(p > 0.0)
            if p == 0.0:  # never trained with this branch: leave it out at test time too
                return shortcut
            return shortcut.add(branch(x), alpha=1.0 if self.inverted else p)
        if isinstance(x, torch.fx.Proxy):
            return _stochastic_depth_cannot_train_traced(shortcut)

        decision = self._decision_for(x.shape[0])
        self.last_active = decision.active
        if self.mode == "batch":
            if not decision.active:
                return shortcut
            return shortcut.add(branch(x), alpha=self._train_scale(decision.survival_prob, decision.survival_prob))

        kept = decision.kept
        if len(kept) == 0:
            return shortcut
        # Each sample keeps the branch with probability p ("row") or k / B ("row_subset").
        inclusion = decision.survival_prob if self.mode == "row" else len(kept) / x.shape[0]
        scale = self._train_scale(decision.survival_prob, inclusion)
        if len(kept) == x.shape[0]:
            return shortcut.add(branch(x), alpha=scale)
        kept = _indices_to(kept, x.device)  # a no-op when the model drew them for this device
        if len(kept) > 1:
            residual = branch(x.index_select(0, kept))
        else:
            # BatchNorm cannot normalise one sample on 1x1 feature maps: for this rare
            # case the branch runs on the whole batch and we keep the one row.
            residual = branch(x).index_select(0, kept)
        return shortcut.index_add(0, kept, residual.to(shortcut.dtype), alpha=scale)

    def _decision_for(self, batch_size: int) -> Decision:
        if not self.drawn_by_model:
            return self.draw(batch_size)
        if self.decision is None:
            raise RuntimeError(
                "this StochasticDepth gate belongs to a model that draws its decisions at the start "
                "of its forward pass, and none was drawn: call the model, not the block on its own"
            )
        if self.mode != "batch" and len(self.decision.active) != batch_size:
            raise RuntimeError(
                f"this gate's decision was drawn for a batch of {len(self.decision.active)} samples, "
                f"but its block got {batch_size}: call the model, not the block on its own"
            )
        return self.decision

    def _train_scale(self, survival_prob: float, inclusion: float) -> float:
        """The factor of a kept residual while training, so that its expectation is ``p * residual``.

        (``residual`` itself when ``inverted``.) `inclusion` is the probability that a
        sample kept the branch: `survival_prob` in "batch" and "row", ``k / B`` in
        "row_subset". Applied as ``alpha`` of the add, which saves a multiplication.
        """
        return (1.0 if self.inverted else survival_prob) / inclusion

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, mode={self.mode}, inverted={self.inverted}"


class StochasticDepthState(nn.Module):
    """What drives a model's gates: the generator, the drop warm-up scale, the pass's decisions.

    ``add_stochastic_depth`` (and so ``StochasticResNet``) gives a model one, as its
    ``stochastic_depth_state`` submodule, and a forward pre-hook that calls
    :meth:`draw` at the start of every training forward pass: every gate's decision
    for that pass is drawn at once, in block order, and held until the next pass.
    Get it with :func:`stochastic_depth_state`.

    It has no parameters or buffers, so the model's ``state_dict`` keeps torchvision's
    keys; :meth:`get_state` and :meth:`set_state` save and restore what it holds (the
    generator's state and ``drop_scale``), as a trainer's checkpoint should.

    Distributed training: with DDP every process must drop the same blocks, or the
    gradients of a block dropped on some processes and not on others are averaged with
    zeros. So in the first training pass after ``torch.distributed`` is initialised
    (with more than one process) the state takes process 0's generator state on every
    process, with a warning on those whose generator differed (seeded per process, as
    timm's ``train.py`` seeds with ``seed + rank``); in ``"batch"`` mode every pass
    draws the same numbers of the generator, so the processes agree from then on. This
    is one collective call, made by every process in the same pass, as in DDP, where
    every process runs each forward pass. Set ``sync_across_processes = False`` where
    processes train different models or only some of them run this one. Restore a
    checkpoint's state on every process alike (no collective call is made again).

    Parameters
    ----------
    generator : torch.Generator
        The CPU generator every gate of the model draws from.

    Attributes
    ----------
    drop_scale : float
        Fraction of each gate's drop probability ``1 - p_l`` applied in training, in
        [0, 1]: 1 (the default) is the target rate, 0 drops nothing. A drop warm-up
        (``train_lockstep(drop_warmup_steps=...)``) raises it from 0 to 1; see
        :func:`linear_drop_warmup`.
    sync_across_processes : bool
        Take process 0's generator state in the first distributed training pass (True
        by default, see above).
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator
        self._drop_scale = 1.0
        self.sync_across_processes = True
        self._synced = False

    @property
    def drop_scale(self) -> float:
        return self._drop_scale

    @drop_scale.setter
    def drop_scale(self, value: float) -> None:
        self._drop_scale = _check_probability(value, "drop_scale")

    @torch.compiler.disable  # random draws on a CPU generator: eager, also under torch.compile
    def draw(self, gates: Sequence[StochasticDepth], batch_size: int, device: torch.device | None = None) -> None:
        """Draw every training gate's decision for one forward pass, and hand each its own.

        The gates of each mode are drawn together (:func:`draw_decisions`); in the row
        modes their kept indices are moved to `device`, the input's, in one copy.
        """
        training = [gate for gate in gates if gate.training]
        if self.sync_across_processes and not self._synced and training:
            self._take_generator_of_process_0()
        for mode in DROP_MODES:
            group = [gate for gate in training if gate.mode == mode]
            if not group:
                continue
            probs = [_warmed_up(gate.survival_prob, self._drop_scale) for gate in group]
            for gate, decision in zip(group, draw_decisions(mode, probs, batch_size, self.generator, device)):
                gate.decision = decision

    def _take_generator_of_process_0(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return  # not distributed (yet): look again at the next training pass
        own = self.generator.get_state()
        # NCCL moves CUDA tensors only; the other backends move CPU tensors.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        received = own.to(device, copy=True)  # (to() without copy would receive into own itself)
        dist.broadcast(received, src=0)
        received = received.cpu()
        if not torch.equal(received, own):
            warnings.warn(
                f"process {dist.get_rank()}: the stochastic-depth generator differs from process 0's "
                "(seeded differently on each process?); taking process 0's, so that every process drops "
                "the same blocks. Set stochastic_depth_state(model).sync_across_processes = False where "
                "processes should draw on their own.",
                stacklevel=2,
            )
            self.generator.set_state(received)
        self._synced = True

    def get_state(self) -> dict[str, Any]:
        """``{"generator": its state, "drop_scale": float}``: all it needs to continue exactly."""
        return {"generator": self.generator.get_state(), "drop_scale": self._drop_scale}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`get_state` returned."""
        self.generator.set_state(state["generator"])
        self.drop_scale = state["drop_scale"]

    def extra_repr(self) -> str:
        return f"drop_scale={self._drop_scale:g}"


def _draw_decisions(model: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> None:
    """Forward pre-hook of a model with stochastic depth: one draw per gate per pass.

    The batch is the first tensor passed, by position or (``model(x=images)``) by name.
    """
    # add_stochastic_depth puts the state right under the model it hooks: no walk of the model.
    state = model._modules.get("stochastic_depth_state")
    if state is None:
        return
    images = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, Tensor)), None)
    if images is None:
        state.draw(stochastic_depth_gates(model), 0)
    else:
        state.draw(stochastic_depth_gates(model), images.shape[0], images.device)


def linear_drop_warmup(step: int, warmup_steps: int) -> float:
    """``drop_scale`` after `step` training steps of a linear drop warm-up over `warmup_steps`.

    0 at step 0 (no block dropped), rising linearly to 1 (the target drop rates) at
    `warmup_steps` and staying there; 1 throughout when `warmup_steps` is 0.
    """
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"step and warmup_steps must be non-negative, got {step} and {warmup_steps}")
    return 1.0 if step >= warmup_steps else step / warmup_steps


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


class _ResidualBlock(nn.Module):
    """``relu(shortcut(x) + branch(x))``, with an optional stochastic-depth gate."""

    downsample: nn.Module | None
    stochastic_depth: StochasticDepth | None
    # Set by compile_branches: torch.compile of the class's `branch`, called with the block.
    compiled_branch: Callable[[_ResidualBlock, Tensor], Tensor] | None = None

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        branch = self.branch if self.compiled_branch is None else functools.partial(self.compiled_branch, self)
        if self.stochastic_depth is None:
            out = shortcut + branch(x)
        else:
            out = self.stochastic_depth(branch, x, shortcut)
        # A dropped block with an identity shortcut hands back x itself, which autograd
        # still needs: that one must not be overwritten by the in-place ReLU.
        return torch.relu(out) if out is x else self.relu(out)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

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

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand."""

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

    def branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


# ----------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------

_IMAGENET_LAYOUTS: dict[int, tuple[type[_ResidualBlock], list[int]]] = {
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
        block: type[_ResidualBlock],
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

    def _make_layer(self, block: type[_ResidualBlock], planes: int, num_blocks: int, stride: int) -> nn.Sequential:
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
    def blocks(self) -> list[_ResidualBlock]:
        """The residual blocks in forward order."""
        return [m for m in self.modules() if isinstance(m, _ResidualBlock)]

    def forward(self, x: Tensor) -> Tensor:
        # (torch.fx traces with a Proxy, whose shape is unknown: no check then.)
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                f"expected a 4-D input of shape (batch, {self.in_channels}, height, width), "
                f"got shape {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


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
        Seed of the generator that draws the gates. By default it is drawn from
        torch's global generator after the weights are initialised, so
        ``torch.manual_seed`` makes the whole model reproducible.

    Notes
    -----
    Every training forward pass starts by drawing all gates' decisions at once
    (``stochastic_depth_state``, a submodule), and each block uses its decision for the
    whole pass: a block recomputed by activation checkpointing makes the same choice.

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
    def generator(self) -> torch.Generator:
        """The CPU generator the gates draw from (``stochastic_depth_state.generator``)."""
        return self.stochastic_depth_state.generator

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

        A bool tensor of shape ``(L,)`` in ``"batch"`` mode, ``(L, batch)`` in the row
        modes, or None before the first forward pass.
        """
        active = [gate.last_active for gate in stochastic_depth_gates(self)]
        return None if any(a is None for a in active) else torch.stack(active)


# ----------------------------------------------------------------------------------
# Converting existing models
# ----------------------------------------------------------------------------------


def _as_residual_block(block: nn.Module) -> _ResidualBlock:
    """Our block class holding the very same submodules as a torchvision block."""
    if isinstance(block, _ResidualBlock):
        return block
    kind = {tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck}.get(type(block))
    if kind is None:
        raise TypeError(f"cannot add stochastic depth to a {type(block).__name__}")
    converted = kind.__new__(kind)
    nn.Module.__init__(converted)
    for name, child in block.named_children():
        setattr(converted, name, child)
    converted.downsample = block.downsample  # also when None, which is no child
    converted.stochastic_depth = None
    converted.train(block.training)
    return converted


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

    Works on torchvision's ResNets (``BasicBlock`` and ``Bottleneck``), on this
    module's, and on the residual blocks of torchvision's ConvNeXt, Swin (V1, V2) and
    EfficientNet (V1, V2) and timm's ViT, ConvNeXt and ResNet (see ``library_blocks``):
    there the masking drop path (torchvision's ``StochasticDepth``, timm's ``DropPath``)
    is replaced by gates, one per residual branch, and a dropped branch is not computed.
    Weights, ``state_dict`` keys and the model's class stay as they were; blocks are
    swapped for equivalent ones that hold the very same submodules. The model gets a
    ``stochastic_depth_state`` submodule (:class:`StochasticDepthState`: the generator,
    the drop warm-up scale) and a forward pre-hook that draws all gates' decisions at
    the start of each training pass, exactly as a ``StochasticResNet``. Calling it
    again on the same model replaces the gates and the state.

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
        As for ``StochasticResNet``.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        When the model has no block to convert, or holds a drop-path module in a block
        that is not supported (before anything is changed).
    """
    from library_blocks import BlockConversion, library_block_conversions  # (it imports this module)

    # Check everything before changing the model, so that a bad argument leaves it as it was.
    if mode is not None:
        _check_mode(mode)
    block_types = (_ResidualBlock, tv_resnet.BasicBlock, tv_resnet.Bottleneck)
    conversions = [
        BlockConversion(parent, name, _as_residual_block(child), ("stochastic_depth",), None)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, block_types)
    ] + library_block_conversions(model)
    if not conversions:
        raise TypeError(f"{type(model).__name__} has no residual blocks to add stochastic depth to")
    position = {module: i for i, module in enumerate(model.modules())}
    conversions.sort(key=lambda c: position[c.parent._modules[c.name]])
    own_rates = all(c.drop_probs is not None for c in conversions)
    if own_rates and survival_rule is None and p_last is None:
        probs = [[1.0 - q for q in c.drop_probs] for c in conversions]
    else:
        rule = "linear" if survival_rule is None else survival_rule
        block_probs = survival_probabilities(len(conversions), rule, 0.5 if p_last is None else p_last)
        probs = [[p] * len(c.gate_names) for c, p in zip(conversions, block_probs)]
    if mode is None:
        mode = "row_subset" if own_rates else "batch"

    if seed is None:
        seed = int(torch.randint(2**62, ()).item())
    generator = torch.Generator().manual_seed(seed)
    model.stochastic_depth_state = StochasticDepthState(generator)
    for c, gate_probs in zip(conversions, probs):
        block_inverted = (c.drop_probs is not None) if inverted is None else inverted
        for gate_name, p in zip(c.gate_names, gate_probs):
            gate = StochasticDepth(survival_prob=p, mode=mode, inverted=block_inverted, generator=generator)
            gate.drawn_by_model = True
            gate.train(c.block.training)  # a model converted in eval mode stays in eval mode
            setattr(c.block, gate_name, gate)
        setattr(c.parent, c.name, c.block)
    if _draw_decisions not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_draw_decisions, with_kwargs=True)
    return model


def stochastic_depth_gates(model: nn.Module) -> list[StochasticDepth]:
    """The ``StochasticDepth`` gates of a model, in forward (block) order."""
    return [m for m in model.modules() if isinstance(m, StochasticDepth)]


def stochastic_depth_state(model: nn.Module) -> StochasticDepthState | None:
    """The :class:`StochasticDepthState` that drives `model`'s gates, or None if it has none."""
    return next((m for m in model.modules() if isinstance(m, StochasticDepthState)), None)


def compile_branches(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation: ``torch.compile`` each residual branch, leaving the gates eager.

    Compiling the whole model makes every gate a graph break and gives dynamo one frame
    per block, which reaches its recompile limit in a deep network and runs the rest
    eagerly. Here only the branches (convolutions, BatchNorms, ReLUs) are compiled, and
    blocks whose branches have the same layers (same class, channels and stride) share
    one compiled function, also across models (a ``ResNet`` and its stochastic twin): a ResNet-110 compiles 5 branches, a ResNet-152 8, each with
    its own dynamo cache, so no recompile limit is reached (dynamo's limit counts the
    variants of one function, and parameter shapes are always specialised). The
    decisions, the gathering of kept samples and the shortcut addition run eagerly in
    between; dropped blocks are still skipped.

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
    """
    blocks = [m for m in model.modules() if isinstance(m, _ResidualBlock)]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no residual blocks of this module to compile")
    for block in blocks:
        layers = tuple(repr(m) for name, m in block.named_children() if name not in ("downsample", "stochastic_depth"))
        key = (type(block).__qualname__, *layers, repr(sorted(options.items())))
        if key not in _COMPILED_BRANCHES:
            _COMPILED_BRANCHES[key] = torch.compile(_branch_function(type(block), len(_COMPILED_BRANCHES)), **options)
        block.compiled_branch = _COMPILED_BRANCHES[key]
    return model


# Compiled branches by block class, layers and options: models of the same shapes (a ResNet
# and its stochastic twin, a deepcopy) share them, and each is compiled once per process.
_COMPILED_BRANCHES: dict[tuple[str, ...], Callable[[_ResidualBlock, Tensor], Tensor]] = {}


def _branch_function(kind: type[_ResidualBlock], index: int) -> Callable[[_ResidualBlock, Tensor], Tensor]:
    """``kind.branch`` as a new function with its own code object, hence its own dynamo cache."""
    function = kind.branch
    code = function.__code__.replace(co_name=f"{function.__name__}_{index}")
    return types.FunctionType(code, function.__globals__, code.co_name, function.__defaults__, function.__closure__)


def training_flop_floor(model: ResNet, images: Tensor, labels: Tensor, probabilities: Sequence[float]) -> dict[str, float]:
    """Expected fraction of a plain training step's FLOPs that stochastic depth still computes.

    Counts the forward and backward FLOPs of one cross-entropy training step of `model`
    (a plain ``ResNet``, or a stochastic one in eval mode) with ``torch.utils.flop_counter``.
    A block's skippable work is its branch, everything but its projection shortcut; the
    stem, the shortcuts and the classifier always run. The floor is
    ``(fixed + sum p_l work_l) / (fixed + sum work_l)``: the step-time ratio that skipping
    dropped blocks can reach when time follows FLOPs.

    Parameters
    ----------
    model : ResNet
        The network to count; its gradients are left set by the counted step.
    images, labels : torch.Tensor
        One batch, on the model's device.
    probabilities : sequence of float
        ``p_l`` for each residual block of `model`, in forward order.

    Returns
    -------
    dict
        ``total_gflop`` (a plain step), ``fixed_gflop`` (work no block can skip) and
        ``floor`` (the expected fraction).
    """
    blocks = model.blocks
    if len(probabilities) != len(blocks):
        raise ValueError(f"expected {len(blocks)} survival probabilities, one per block, got {len(probabilities)}")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    total = counter.get_total_flops()
    root = type(model).__name__
    names = [f"{root}.{name}" for name, m in model.named_modules() if m in blocks]
    block_work = [counts.get(n, 0) - counts.get(n + ".downsample", 0) for n in names]
    fixed = total - sum(block_work)
    expected = fixed + sum(p * w for p, w in zip(probabilities, block_work))
    return {"total_gflop": total / 1e9, "fixed_gflop": fixed / 1e9, "floor": expected / total}


class _OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators run under it, views left out (they launch no kernel):
    those that touch a tensor on the meta device, and the others."""

    def __init__(self) -> None:
        super().__init__()
        self.on_device = self.on_host = 0

    def __torch_dispatch__(self, func, _types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            if any(isinstance(t, Tensor) and t.is_meta for t in tree_leaves((args, kwargs, out))):
                self.on_device += 1
            else:
                self.on_host += 1
        return out


def training_operator_count(model: nn.Module, images: Tensor, labels: Tensor) -> dict[str, int]:
    """Operators of one cross-entropy training step of `model`, on its device and on the host.

    Counted on a copy of `model` on PyTorch's meta device, which computes shapes and no
    arithmetic: an operator on a meta tensor stands for one on the model's device (at
    least one kernel launch on a GPU); the others run on the CPU whatever the device (the
    gates' random draws, reading a decision). Where a GPU step is bound by kernel launches
    rather than arithmetic (ResNet-50 on 28x28 images on an H100 is), its time follows
    these counts, not the FLOPs. The step starts without gradients, as after
    ``zero_grad()``; views are not counted; the optimizer step is left out. `model`
    itself, its generator and gradients included, is left as it was.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in the mode to count (training, for drops).
    images, labels : torch.Tensor
        One batch (only their shapes and dtypes are used).

    Returns
    -------
    dict
        ``device``: operators on the model's device; ``host``: operators on the CPU.
    """
    twin, images, labels = copy.deepcopy(model).to("meta"), images.to("meta"), labels.to("meta")
    twin.zero_grad(set_to_none=True)  # as a training loop does: no accumulation into old gradients
    with _OperatorCounter() as counter:
        F.cross_entropy(twin(images), labels).backward()
    return {"device": counter.on_device, "host": counter.on_host}
