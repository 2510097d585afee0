"""The stochastic-depth gate: which residual branches run in a training pass.

The base of the library: it imports torch only. The model file
(``resnet_with_stochastic_depth``) builds its blocks on it, and ``library_blocks``
converts torchvision's and timm's blocks to it.

``survival_probabilities``
    The paper's linear-decay rule (Huang et al., ECCV 2016, eq. 4), the uniform rule
    or an explicit sequence.
``StochasticDepth``
    The gate of one residual branch; ``draw_decision`` and ``key_seed`` are its random
    draw, ``gate_in_layout`` runs it in a convolutional block's memory layout.
``set_step``
    Keys a model's drops by the training step: every process at a step drops the same
    blocks (DDP), whatever passes each ran before.
``StochasticDepthState``, ``stochastic_depth_state``, ``stochastic_depth_gates``
    What a model's gates hold between passes (seed, step, pass counts, drop scale), to
    save with a checkpoint.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
import operator
import struct
import types
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._dynamo.eval_frame import skip_code

__all__ = [
    "DROP_MODES",
    "Decision",
    "StochasticDepth",
    "CompileOptions",
    "StochasticDepthState",
    "compiled_region",
    "draw_decision",
    "gate_in_layout",
    "key_seed",
    "set_step",
    "stochastic_depth_gates",
    "stochastic_depth_state",
    "survival_probabilities",
]

SurvivalRule = Literal["linear", "uniform"] | Sequence[float]
DropMode = Literal["batch", "row", "row_subset"]
DROP_MODES = ("batch", "row", "row_subset")


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
# The gate
#
# The rule of the design, to check new code against:
# - Who draws: each gate, when it is called in training mode. Nothing else draws: no hook on
#   the model, no module added to it, so whatever runs the blocks (the model, a wrapper that
#   calls its layers, one block on its own) gets drops.
# - A decision is a pure function of its key (seed, gate index, step, pass, and in the row
#   modes the process's rank): a gate keeps counters, never a random stream to synchronise.
# - A pass: every training call of a gate that is not a recomputation is the gate's next
#   pass. `set_step` starts a step (passes numbered from 0 again).
# - A recomputation is a call made while autograd runs a backward pass, which is where
#   PyTorch's checkpointing, reentrant or not, runs a forward again after restoring torch's
#   global RNG state. Each pass draws one number from that state, its tag, and files its key
#   under it; a recomputation draws the same number again and so finds its pass's key (its
#   step included), however many passes, backwards or steps came in between.
# - Processes: with `set_step`, batch mode's key holds only the seed, the gate and the step,
#   so processes at the same step drop the same blocks whatever passes they ran before. The
#   row modes' key holds the rank: each process draws its own samples.
# ----------------------------------------------------------------------------------


class Decision(NamedTuple):
    """One gate's draw for one training pass.

    ``active``: a bool scalar (``"batch"``) or one bool per sample (the row modes), on the
    CPU. ``survival_prob``: the survival probability it was drawn with (``p_l``, or more
    during a drop warm-up), which the training-time scaling uses. ``kept``: the row modes'
    ascending indices of the samples that keep the branch, on the CPU; None in ``"batch"``.
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


# ----------------------------------------------------------------------------------
# torch.compile around the gates
#
# A gate draws on the host, from counters that change at every pass: no graph can hold that.
# So a gate's training pass runs eagerly (a graph break where it is called) and hands its branch
# to `compiled_region`, which runs it as a frame of its own, one per kind of branch. Under
# `torch.compile(model)` dynamo compiles that frame with the user's backend and options; with
# `compile_branches` (regional compilation) the gate holds the options and compiles it itself.
# Nothing of a gate (its probability, index, step or passes) reaches a traced frame, so nothing
# of it is guarded on: the blocks of one kind share one compiled variant, whatever the depth.
# ----------------------------------------------------------------------------------


def _eager_frame(function: Callable) -> Callable:
    """`function`, whose own frame torch.compile runs eagerly (a graph break where a traced
    caller calls it), compiling the frames it calls (``torch.compiler.disable(recursive=False)``).

    Called from eager code it is a frame that dynamo skips by a flag on its code (see
    `_not_a_frame`): a function disabled with ``recursive=False`` is converted again at every
    call (dynamo disassembles it to find that it must skip it, about 1 ms on a CPU, at every
    gate and block of every training pass), which cost the idiom 7% of a ViT-S step.
    """
    disabled = torch.compiler.disable(function, recursive=False, reason=_GRAPH_BREAK_REASON)

    @_not_a_frame
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # a traced caller: the graph break
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    _not_a_frame(function)
    return call


_GRAPH_BREAK_REASON = (
    "a stochastic-depth gate draws which residual branches run on the host, at every training pass: "
    "torch.compile runs the gate's training pass eagerly (this graph break) and compiles each kind of "
    "branch as a region of its own. Compile the model without fullgraph=True (torch.compile(model)), or "
    "use stochastic_depth.compilation.compile_branches(model); in eval mode the model is one graph "
    "(fullgraph=True works there)"
)


def _not_a_frame(function: Callable) -> Callable:
    """`function`, which torch.compile never compiles as a frame of its own (called from eager
    code it runs eagerly) but still inlines where it traces a caller: for the dispatchers and
    helpers of the eager training pass, which would otherwise be compiled, and recompiled, for
    every shape of their arguments. (What ``torch._dynamo.skip`` does, without its graph break.)"""
    skip_code(function.__code__)
    return function


def _region(function: Callable[..., Tensor], *args: Any) -> Tensor:
    return function(*args)


# One copy of _region, with a code object of its own, per kind of branch (and compile options):
# dynamo keeps compiled variants, and counts its recompile limit, per code object.
_REGIONS: dict[Any, Callable[..., Tensor]] = {}
# Each module's kind, computed once (a module's layers do not change shape).
_MODULE_KINDS: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


@_not_a_frame
def _module_kind(module: nn.Module) -> tuple:
    """A module's class and settings (``extra_repr``) and the names, shapes and dtypes of its tensors."""
    kind = _MODULE_KINDS.get(module)
    if kind is None:
        tensors = [*module.named_parameters(), *module.named_buffers()]
        shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in tensors)
        kind = _MODULE_KINDS[module] = (type(module), module.extra_repr(), shapes)
    return kind


@_not_a_frame
def _callable_kind(function: Any) -> Any:
    """What tells one kind of branch from another: its code, and the kind of the modules it runs."""
    if isinstance(function, types.MethodType):
        owner = function.__self__
        return function.__func__.__code__, _module_kind(owner) if isinstance(owner, nn.Module) else type(owner)
    if isinstance(function, nn.Module):
        return _module_kind(function)
    if isinstance(function, functools.partial):
        return (_callable_kind(function.func), *(_callable_kind(a) for a in function.args if callable(a)))
    if isinstance(function, types.FunctionType):  # a closure: the kinds of the callables it holds
        cells = []
        for cell in function.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if isinstance(value, (types.MethodType, types.FunctionType, nn.Module, functools.partial)):
                cells.append(_callable_kind(value))
        return (function.__code__, *cells)
    return type(function)


@_eager_frame
def compiled_region(function: Callable[..., Tensor], *args: Any, options: Mapping[str, Any] | None = None) -> Tensor:
    """``function(*args)`` as a compiled region shared by every branch of its kind.

    The gates call their branches (and the ResNet blocks their downsampling shortcuts)
    through it. Callables of one kind (the same code, and modules of the same class and
    parameter shapes: one branch of the blocks of one stage) go through one copy of a
    two-line function with a code object of its own:

    - under ``torch.compile(model)``, which runs the gates eagerly, dynamo compiles that copy
      as a frame of its own with the model's backend and options: once per kind of branch,
      however deep the network, and its recompile limit (per code object) counts the variants
      of one kind only;
    - with `options` (``compile_branches``), it is ``torch.compile(copy, **options)``, compiled
      once per process and kind;
    - otherwise it is a plain call.

    Parameters
    ----------
    function : callable
        The branch: a bound method of a block, a module, or a closure over either.
    *args
        Its arguments.
    options : mapping, optional
        ``torch.compile`` options, to compile the region without compiling the model.
    """
    key = _callable_kind(function)
    if options is not None:
        key = (key, repr(sorted(options.items())))
    region = _REGIONS.get(key)
    if region is None:
        code = _region.__code__.replace(co_name=f"stochastic_depth_region_{len(_REGIONS)}")
        region = types.FunctionType(code, _region.__globals__, code.co_name)
        _REGIONS[key] = region = region if options is None else torch.compile(region, **options)
    return region(function, *args)


class CompileOptions(dict):
    """The ``torch.compile`` options a gate compiles its branch with (``compile_branches``).

    A deep copy of a model (an EMA copy) shares them, and so the compiled regions, instead of
    copying a backend object into a new one (which would compile everything again).
    """

    def __deepcopy__(self, memo: dict) -> CompileOptions:
        return self


@_not_a_frame
def _in_layout_of(out: Tensor, residual: Tensor) -> Tensor:
    """`out`, channels_last when `residual` is and `out` is not: an NCHW input whose branch returns
    channels_last (ConvNeXt's first block after a downsampling layer), as ``branch + shortcut`` is."""
    if _channels_last(residual) and not _channels_last(out):
        return out.contiguous(memory_format=torch.channels_last)
    return out


@_not_a_frame
def _indices_to(indices: Tensor, device: torch.device) -> Tensor:
    """`indices` (on the CPU) on `device`, without making the host wait for a GPU."""
    if indices.device == device:
        return indices
    if device.type == "cuda":
        # A copy from pageable memory waits for the GPU to finish all queued work;
        # from pinned memory it does not.
        indices = indices.pin_memory()
    return indices.to(device, non_blocking=True)


def key_seed(*key: int) -> int:
    """A 63-bit seed that is a fixed hash of integers: the same on every machine and process."""
    digest = hashlib.blake2b(struct.pack(f"<{len(key)}q", *key), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_decision(mode: DropMode, survival_prob: float, batch_size: int, seed: int) -> Decision:
    """The decision of one gate in one training pass, a deterministic function of `seed`.

    Parameters
    ----------
    mode : {"batch", "row", "row_subset"}
        As for :class:`StochasticDepth`.
    survival_prob : float
        Probability of keeping the branch in this pass.
    batch_size : int
        Samples in the pass (unused in ``"batch"`` mode).
    seed : int
        In [0, 2**63); a gate passes :func:`key_seed` of its pass's key.

    Returns
    -------
    Decision
        ``"batch"``: kept with probability `survival_prob`. ``"row"``: each sample kept
        independently with probability `survival_prob`. ``"row_subset"``: a uniformly
        chosen subset of exactly ``round(batch_size * survival_prob)`` samples (at least
        one unless the probability is 0).
    """
    if mode == "batch":
        # The seed is already a uniform hash: its top 53 bits are a uniform double in [0, 1).
        return Decision(torch.tensor((seed >> 10) / 2.0**53 < survival_prob), survival_prob)
    generator = torch.Generator().manual_seed(seed)
    if mode == "row":
        active = torch.rand(batch_size, generator=generator) < survival_prob
        return Decision(active, survival_prob, active.nonzero().squeeze(1))
    # The k smallest of B uniform keys are a uniformly chosen k-subset; float64 keys make a
    # tie (which would favour lower indices) practically impossible.
    keys = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    kept = keys.argsort()[: _subset_size(batch_size, survival_prob)].sort().values
    active = torch.zeros(batch_size, dtype=torch.bool).index_fill_(0, kept, True)
    return Decision(active, survival_prob, kept)


def _process_rank() -> int:
    """This process's rank in torch.distributed's default group, 0 outside it (no communication)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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

# How many of a gate's latest passes it remembers for recomputations: more than the forward
# passes anyone runs before one backward (two views, a dozen crops).
_REMEMBERED_PASSES = 64


def _pass_tag() -> int:
    """One draw from torch's global CPU generator, which activation checkpointing saves before
    a region's forward and restores before recomputing it: a recomputed call draws the tag its
    original call drew, and a new pass draws a new one (as dropout draws from that generator)."""
    return int(torch.randint(2**62, (), dtype=torch.int64))


class StochasticDepth(nn.Module):
    """Randomly bypasses one residual branch: ``shortcut + gate(branch(x))``.

    Training modes (``survival_prob`` is the probability of *keeping* the branch; the
    argument is keyword-only because torchvision's ``StochasticDepth(p, mode)`` takes
    the probability of *dropping* it):

    ``"batch"`` (the paper)
        One Bernoulli(``survival_prob``) draw per training pass decides for the whole
        mini-batch. A dropped branch is not called: it costs nothing and its
        parameters get no gradient.
    ``"row"`` (torchvision's ``mode="row"``, timm's ``DropPath``)
        An independent Bernoulli(``survival_prob``) draw per sample; the branch runs
        only on the samples that keep it, so its batch size changes every step.
    ``"row_subset"`` (DINOv2's sample drop)
        Exactly ``k = round(B * survival_prob)`` samples (at least one, unless the
        probability is 0), chosen without replacement, keep the branch, which runs on
        those ``k``: the same shape every step (no new cuDNN plans, as ``"row"`` needs). The
        kept residuals are scaled by ``survival_prob * B / k`` (``B / k`` when
        ``inverted``), so the expected output is the same as in the other modes.
        Samples are not independent (exactly ``k`` survive).

    Evaluation: the branch always runs, scaled by ``survival_prob`` (the paper's test
    rule), or unscaled when ``inverted=True``, in which case a surviving branch is
    scaled by ``1 / survival_prob`` while training instead. Both conventions give
    the same expected output. A branch with ``survival_prob == 0`` is left out. With
    ``drop_scale < 1`` both use the survival probability in force,
    ``1 - drop_scale * (1 - survival_prob)``, so that evaluation matches the training
    passes of that moment (a drop warm-up, or a schedule that stops dropping).
    Nothing is drawn in evaluation, so an eval-mode model compiles as one graph.

    Drawing (the rule at the top of this section): each training call draws the
    decision of a new pass from the key ``(seed, index, step, pass)``, plus the
    process's rank in the row modes; a recomputation by activation checkpointing
    gets its pass's decision again. :func:`set_step` keys the passes by the training
    step, which DDP needs in batch mode (see there).

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
    seed : int, optional
        The seed of this gate's draws, in [0, 2**62]; drawn from torch's global
        generator if None. The gates of a model share one.
    index : int
        The gate's number in its model, which tells its draws from the others'.

    Attributes
    ----------
    drop_scale : float
        Fraction of the drop probability ``1 - survival_prob`` applied in training,
        in [0, 1]: 1 (the default) is the target rate, 0 drops nothing; a drop
        warm-up (:func:`stochastic_depth.schedules.linear_drop_warmup`) raises it.
    step : tuple of int or None
        The step set by :func:`set_step`, None before.
    passes : int
        Training passes since the step was set (since construction without one).
    compile_options : dict or None
        ``torch.compile`` options for the branch, set by
        ``stochastic_depth.compilation.compile_branches``; None runs it as it is.
    last_active : Tensor or None
        What the last forward pass computed: a bool scalar (``"batch"``) or one
        bool per sample (row modes); all True in evaluation, except for ``p = 0``.
    """

    # ``torch.compile`` options of the branch (``compile_branches``: regional compilation),
    # or None: the branch runs as it is, compiled only where the whole model is.
    compile_options: dict[str, Any] | None = None

    def __init__(
        self,
        *,
        survival_prob: float,
        mode: DropMode = "batch",
        inverted: bool = False,
        seed: int | None = None,
        index: int = 0,
    ) -> None:
        super().__init__()
        self.survival_prob = _check_probability(survival_prob, "survival_prob")
        self.mode = _check_mode(mode)
        self.inverted = bool(inverted)
        self.seed, self.seed_given = _seed_or_random(seed)
        self.index = int(index)
        self._drop_scale = 1.0
        self.step: tuple[int, ...] | None = None
        self.passes = 0
        self.last_active: Tensor | None = None
        self._forget_passes()

    @property
    def drop_scale(self) -> float:
        return self._drop_scale

    @drop_scale.setter
    def drop_scale(self, value: float) -> None:
        self._drop_scale = _check_probability(value, "drop_scale")

    def _forget_passes(self) -> None:
        # The keys of the latest passes by their tags (see _pass_tag), for recomputations.
        self._recent: collections.OrderedDict[int, tuple[int, tuple[int, ...] | None]] = collections.OrderedDict()

    @_not_a_frame
    def forward(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor) -> Tensor:
        if not self.training:
            # The survival probability in force (p_l, or more while drop_scale < 1): after a
            # schedule that ends with fewer drops, evaluation is the network training ended with.
            p = _warmed_up(self.survival_prob, self._drop_scale)
            # torch.compile replays this write after its graph (still one graph, no guard on
            # it); torch.export allows no attribute writes.
            if not torch.compiler.is_exporting():
                self.last_active = torch.tensor(p > 0.0)
            if p == 0.0:  # never trained with this branch: leave it out at test time too
                return shortcut
            if self.compile_options is not None and not torch.compiler.is_compiling():
                return shortcut.add(compiled_region(branch, x, options=self.compile_options), alpha=1.0 if self.inverted else p)
            return shortcut.add(branch(x), alpha=1.0 if self.inverted else p)
        if isinstance(x, torch.fx.Proxy):
            return _stochastic_depth_cannot_train_traced(shortcut)
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(
                "a model with stochastic depth is traced (torch.jit.trace) or exported (torch.export) in "
                "training mode, where the graph would freeze one draw of which residual blocks run. Trace "
                "or export it in eval mode (model.eval()), where every block runs; train the original model."
            )

        return self._train(branch, x, shortcut, False)

    @_eager_frame
    def _train(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor, in_layout: bool) -> Tensor:
        """A training pass: decide, then run the branch on what is kept (`in_layout`: see gate_in_layout).

        Eager also under torch.compile (a graph break where the gate is called): the branch
        runs as a compiled region of its kind (:func:`compiled_region`).
        """
        decision = self._decide(x)
        if torch._C._current_graph_task_id() == -1:  # (a recomputation does not change what the last pass was)
            self.last_active = decision.active
        options = self.compile_options
        if self.mode == "batch":
            if not decision.active:
                return shortcut
            residual = compiled_region(branch, x, options=options)
            out = shortcut.add(residual, alpha=self._train_scale(decision.survival_prob, decision.survival_prob))
            return _in_layout_of(out, residual) if in_layout else out

        kept = decision.kept
        if len(kept) == 0:
            return shortcut
        # Each sample keeps the branch with probability p ("row") or k / B ("row_subset").
        inclusion = decision.survival_prob if self.mode == "row" else len(kept) / x.shape[0]
        scale = self._train_scale(decision.survival_prob, inclusion)
        if len(kept) == x.shape[0]:
            residual = compiled_region(branch, x, options=options)
            out = shortcut.add(residual, alpha=scale)
            return _in_layout_of(out, residual) if in_layout else out
        kept = _indices_to(kept, x.device)
        # A channels_last input is gathered and scattered as (N, H, W, C) views, in which it is
        # plainly contiguous (see gate_in_layout); the branch still sees (N, C, H, W).
        nhwc = in_layout and _channels_last(x)
        rows, shortcut_rows = (x.permute(0, 2, 3, 1), shortcut.permute(0, 2, 3, 1)) if nhwc else (x, shortcut)
        if len(kept) > 1:
            inputs = rows.index_select(0, kept)
            # A new batch size at every gate and step: compile the region for any.
            torch._dynamo.maybe_mark_dynamic(inputs, 0)
            residual = compiled_region(branch, inputs.permute(0, 3, 1, 2) if nhwc else inputs, options=options)
        else:
            # BatchNorm cannot normalise one sample on 1x1 feature maps: for this rare
            # case the branch runs on the whole batch and we keep the one row.
            residual = compiled_region(branch, x, options=options).index_select(0, kept)
        residual_rows = residual.permute(0, 2, 3, 1) if nhwc else residual
        out = shortcut_rows.index_add(0, kept, residual_rows.to(shortcut.dtype), alpha=scale)
        if nhwc:
            return out.permute(0, 3, 1, 2)
        return _in_layout_of(out, residual) if in_layout else out

    @torch.compiler.disable  # host-side bookkeeping and draws: eager, also under torch.compile
    def _decide(self, x: Tensor) -> Decision:
        """The decision of a new pass, or of the pass that this call recomputes."""
        tag = _pass_tag()
        if torch._C._current_graph_task_id() != -1:  # inside a backward pass: a recomputation
            if tag not in self._recent:
                raise RuntimeError(
                    "a StochasticDepth gate runs inside a backward pass, but not as the recomputation of one "
                    "of its last training passes: activation checkpointing must restore torch's RNG state "
                    "(preserve_rng_state=True, the default) for a recomputed gate to find its pass"
                )
            pass_index, step = self._recent[tag]
        else:
            pass_index, step, self.passes = self.passes, self.step, self.passes + 1
            self._recent[tag] = (pass_index, step)
            if len(self._recent) > _REMEMBERED_PASSES:
                self._recent.popitem(last=False)
        if self.mode == "batch":
            if step is not None:
                pass_index = -1  # every pass of a step drops the same blocks, on every process
            if not (step is not None and self.seed_given) and dist.is_available() and dist.is_initialized() \
                    and dist.get_world_size() > 1:
                warnings.warn(_UNSTEPPED_DDP_WARNING, stacklevel=6)
            key = (self.seed, self.index, pass_index)
        else:
            key = (self.seed, self.index, pass_index, _process_rank())
        step = () if step is None else step
        p = _warmed_up(self.survival_prob, self._drop_scale)
        return draw_decision(self.mode, p, x.shape[0], key_seed(len(step), *key, *step))

    @_not_a_frame
    def _train_scale(self, survival_prob: float, inclusion: float) -> float:
        """The factor of a kept residual while training, so that its expectation is ``p * residual``.

        (``residual`` itself when ``inverted``.) `inclusion` is the probability that a
        sample kept the branch: `survival_prob` in "batch" and "row", ``k / B`` in
        "row_subset". Applied as ``alpha`` of the add, which saves a multiplication.
        """
        return (1.0 if self.inverted else survival_prob) / inclusion

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, mode={self.mode}, inverted={self.inverted}"


@_not_a_frame
def _channels_last(t: Tensor) -> bool:
    """Whether `t` is laid out channels_last, not (also) plainly contiguous: (N, C, H, W) with C fastest."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@_not_a_frame
def gate_in_layout(gate: StochasticDepth, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor) -> Tensor:
    """``gate(branch, x, shortcut)`` for a convolutional block, in the memory layout of its input and branch.

    In the row modes the gate gathers the kept samples (``index_select``) and adds their
    residuals into a copy of the shortcut (``index_add``), both of which return plainly
    contiguous (NCHW) tensors. A channels_last network (ConvNeXt's blocks return
    channels_last tensors, from their last permutation; any model after
    ``.to(memory_format=torch.channels_last)``) would switch to NCHW without a word, and
    a depthwise convolution runs about 3 times slower in NCHW on the CPU (ConvNeXt-T,
    torch 2.14). So for a channels_last input the gate works on ``(N, H, W, C)`` views,
    in which channels_last tensors are plainly contiguous: its gather and scatter-add
    then return tensors that are channels_last again once permuted back, without a copy
    of their own. For an NCHW input whose branch returns channels_last (the first
    ConvNeXt block after a downsampling layer), the output is made channels_last, as the
    library's ``branch + shortcut`` is. Layouts change no value: the same floats.
    """
    if isinstance(x, torch.fx.Proxy):  # traced (eval mode): layouts are not known
        return gate(branch, x, shortcut)
    if isinstance(gate, StochasticDepth) and gate.training and not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        return gate._train(branch, x, shortcut, True)
    if _channels_last(x):

        def run_nhwc(t: Tensor) -> Tensor:
            return branch(t.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

        shortcut_nhwc = shortcut.permute(0, 2, 3, 1)
        out = gate(run_nhwc, x.permute(0, 2, 3, 1), shortcut_nhwc)
        # A dropped branch hands back the shortcut itself, which the block must be able to
        # recognise (it may be the block's input, which an in-place activation must not touch).
        return shortcut if out is shortcut_nhwc else out.permute(0, 3, 1, 2)

    residual_channels_last: list[bool] = []

    def run(t: Tensor) -> Tensor:
        residual = branch(t)
        residual_channels_last.append(_channels_last(residual))
        return residual

    out = gate(run, x, shortcut)
    if residual_channels_last and residual_channels_last[-1] and not _channels_last(out):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


_UNSTEPPED_DDP_WARNING = (
    "StochasticDepth in batch mode under torch.distributed without set_step(model, step) or without "
    "an explicit seed: processes drop the same blocks only if their seeds are equal and they run the "
    "same number of training passes (not after uneven inputs under join(), or an extra forward pass "
    "on one process). Build the model with the same seed= on every process and call "
    "set_step(model, step) on every process before each step, with a step that names the same batch "
    "everywhere (e.g. epoch and batch index)."
)


def _check_int(value: Any, name: str, low: int, high: int) -> int:
    """`value` as an int in [low, high] (any integer type: int, numpy's, a 0-d integer tensor)."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or not low <= number <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return number


def _check_seed(seed: Any) -> int:
    return _check_int(seed, "seed", 0, 2**62)


def _seed_or_random(seed: Any) -> tuple[int, bool]:
    """(seed, whether one was given): a given seed checked, else one drawn from torch's global generator."""
    if seed is None:
        return int(torch.randint(2**62, ()).item()), False
    return _check_seed(seed), True


def _check_step(step: Sequence[Any]) -> tuple[int, ...]:
    if not step:
        raise ValueError("step must be one or more integers, got none")
    return tuple(_check_int(s, "each step value", -(2**63), 2**63 - 1) for s in step)


def set_step(model: nn.Module, *step: int) -> None:
    """Key the next training passes of `model`'s gates by the training step.

    Decisions are then drawn from ``(seed, gate, step)`` in batch mode, so that every pass
    of a step (two views, a recomputation, an extra forward on one process) drops the same
    blocks, and every process at that step drops the same blocks as the others, whatever
    passes each ran before: what DDP needs, also after uneven inputs under ``join()``. In the
    row modes the passes of a step are numbered from 0 and each process draws its own
    samples. Call it on every process before each optimizer step, with a step that names
    the same batch on all of them (``set_step(model, epoch, batch_index)``); called once
    per epoch instead, every batch of the epoch would drop the same blocks. With gradient
    accumulation the micro-batches of one step share the step's sub-network, as one
    mini-batch does in the paper; add the micro-batch's index to the step to draw for each.

    Parameters
    ----------
    model : torch.nn.Module
        A model with stochastic-depth gates, or one gate.
    *step : int
        One or more integers (e.g. the optimizer step, or epoch and batch index).

    Raises
    ------
    ValueError
        For no step, or a value that is not an integer; TypeError for a model without gates.
    """
    step = _check_step(step)
    gates = stochastic_depth_gates(model)
    if not gates:
        raise TypeError(f"{type(model).__name__} has no StochasticDepth gates")
    for gate in gates:
        gate.step, gate.passes = step, 0


class StochasticDepthState:
    """What a model's gates hold between training passes, to save with a checkpoint.

    A view of the gates (:func:`stochastic_depth_state` makes one), not a module: the
    model's structure and ``state_dict`` stay as they were. :meth:`get_state` and
    :meth:`set_state` save and restore each gate's seed, step, pass count and
    ``drop_scale``: all a resumed run needs to draw what the run would have drawn.

    Parameters
    ----------
    gates : sequence of StochasticDepth
        The model's gates, in block order.
    """

    def __init__(self, gates: Sequence[StochasticDepth]) -> None:
        self.gates = list(gates)

    @property
    def drop_scale(self) -> float:
        """The gates' ``drop_scale`` (the same for all); setting it sets every gate's."""
        return self.gates[0].drop_scale

    @drop_scale.setter
    def drop_scale(self, value: float) -> None:
        value = _check_probability(value, "drop_scale")
        for gate in self.gates:
            gate.drop_scale = value

    def get_state(self) -> dict[str, Any]:
        """Each gate's ``seed``, ``seed_given``, ``step``, ``passes`` and ``drop_scale``, as lists
        in gate order: all the gates need to continue exactly (also where several sub-networks
        were converted with seeds of their own)."""
        return {name: [getattr(gate, name) for gate in self.gates] for name in _GATE_STATE}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`get_state` returned, for a model with as many gates.

        Raises
        ------
        ValueError
            For a state of another number of gates, a bad value (named), or a mapping with
            other keys than :meth:`get_state` gives (another object, or a state saved by
            another version of this module); the gates are left as they were.
        """
        if set(state) != set(_GATE_STATE):
            raise ValueError(
                f"expected a stochastic-depth state with the keys {sorted(_GATE_STATE)}, got {sorted(state)}: "
                "pass what get_state() returned (not a whole checkpoint); a state saved by another version "
                "of this module cannot continue these gates' draws"
            )
        if any(len(state[name]) != len(self.gates) for name in _GATE_STATE):
            raise ValueError(f"the state is of {len(state['passes'])} gates, this model has {len(self.gates)}")
        values = list(zip(
            [_check_seed(seed) for seed in state["seed"]],
            [bool(given) for given in state["seed_given"]],
            [None if step is None else _check_step(step) for step in state["step"]],
            [_check_int(passes, "passes", 0, 2**63 - 1) for passes in state["passes"]],
            [_check_probability(scale, "drop_scale") for scale in state["drop_scale"]],
        ))
        for gate, gate_values in zip(self.gates, values):
            for name, value in zip(_GATE_STATE, gate_values):
                setattr(gate, name, value)


_GATE_STATE = ("seed", "seed_given", "step", "passes", "drop_scale")


def stochastic_depth_gates(model: nn.Module) -> list[StochasticDepth]:
    """The ``StochasticDepth`` gates of a model, in forward (block) order."""
    return [m for m in model.modules() if isinstance(m, StochasticDepth)]


def stochastic_depth_state(model: nn.Module) -> StochasticDepthState | None:
    """The :class:`StochasticDepthState` of `model`'s gates, or None if it has none."""
    gates = stochastic_depth_gates(model)
    return StochasticDepthState(gates) if gates else None
