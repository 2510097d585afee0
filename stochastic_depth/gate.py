"""The stochastic-depth gate: which residual branches run in a training pass, and how.

``survival_probabilities``
    The paper's linear-decay rule (Huang et al., ECCV 2016, eq. 4), the uniform rule
    or an explicit sequence.
``draw_decision``, ``key_seed``
    One gate's draw for one training pass, a pure function of its key.
``StochasticDepth``
    The gate of one residual branch: a block calls ``gate(branch, x, shortcut)`` in
    training and in evaluation.
``set_step``
    Keys a model's drops by the training step: every process at a step drops the same
    blocks (DDP), whatever passes each ran before.
``StochasticDepthState``, ``stochastic_depth_state``, ``stochastic_depth_gates``
    What a model's gates hold between passes (seed, step, pass counts, drop scale), to
    save with a checkpoint.

The rules of the design, to check new code against:

- Who draws: each gate, when it is called in training mode. Nothing else draws: no hook on
  the model, no module added to it, so whatever runs the blocks (the model, a wrapper that
  calls its layers, one block on its own) gets drops.
- A decision is a pure function of its key (seed, gate index, step, pass, and in the row
  modes the process's rank): a gate keeps counters, never a random stream to synchronise.
- A pass: every training call of a gate that is not a recomputation is the gate's next
  pass. ``set_step`` starts a step (passes numbered from 0 again).
- A recomputation is a call made while autograd runs a backward pass, which is where
  PyTorch's checkpointing, reentrant or not, runs a forward again after restoring torch's
  global RNG state. Each pass draws one number from that state, its tag, and files its key
  under it; a recomputation draws the same number again and so finds its pass's key (its
  step included), however many passes, backwards or steps came in between.
- Processes: with ``set_step``, batch mode's key holds only the seed, the gate and the step,
  so processes at the same step drop the same blocks whatever passes they ran before. The
  row modes' key holds the rank: each process draws its own samples.

``torch.compile`` is ``stochastic_depth.compilation``'s concern: the gate's training pass
runs eagerly and its branch as a region there.
"""

from __future__ import annotations

import collections
import hashlib
import math
import operator
import struct
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stochastic_depth.autograd_ops import add_rows, conv_on_rows, in_backward_pass, is_channels_last, select_rows
from stochastic_depth.compilation import RegionHolder, eager_frame, mark_batch_dynamic, not_a_frame

__all__ = [
    "DROP_MODES",
    "Decision",
    "StochasticDepth",
    "StochasticDepthState",
    "draw_decision",
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
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a probability in [0, 1], got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return value


def check_mode(mode: str) -> str:
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
    probs = list(rule)
    if len(probs) != num_blocks:
        raise ValueError(
            f"expected {num_blocks} survival probabilities (one per residual block), "
            f"got {len(probs)}"
        )
    return [_check_probability(p, f"survival probability of block {i}") for i, p in enumerate(probs)]


# ----------------------------------------------------------------------------------
# The decision
# ----------------------------------------------------------------------------------


class Decision(NamedTuple):
    """One gate's draw for one training pass.

    ``active``: a Python bool (``"batch"``) or one bool per sample (the row modes), on the
    CPU. ``survival_prob``: the survival probability it was drawn with (``p_l``, or more
    during a drop warm-up), which the training-time scaling uses. ``kept``: the row modes'
    ascending indices of the samples that keep the branch, on the CPU; None in ``"batch"``.
    """

    active: bool | Tensor
    survival_prob: float
    kept: Tensor | None = None


def subset_size(batch_size: int, survival_prob: float) -> int:
    """``k = round(B p)`` samples (to nearest), at least one unless ``p == 0``.

    DINOv2's sample drop rounds down instead (``max(int(B * (1 - rate)), 1)``); rounding to
    nearest keeps ``k / B`` closest to ``p``.
    """
    if survival_prob == 0.0:
        return 0
    return min(batch_size, max(1, math.floor(batch_size * survival_prob + 0.5)))


def _warmed_up(survival_prob: float, drop_scale: float) -> float:
    """The survival probability when only `drop_scale` of the drop probability applies."""
    return 1.0 - drop_scale * (1.0 - survival_prob)


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
        return Decision((seed >> 10) / 2.0**53 < survival_prob, survival_prob)
    generator = _generator().manual_seed(seed)
    if mode == "row":
        active = torch.rand(batch_size, generator=generator) < survival_prob
        return Decision(active, survival_prob, active.nonzero().squeeze(1))
    # The k smallest of B uniform keys are a uniformly chosen k-subset; float64 keys make a
    # tie (which would favour lower indices) practically impossible.
    keys = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    kept = keys.argsort()[: subset_size(batch_size, survival_prob)].sort().values
    active = torch.zeros(batch_size, dtype=torch.bool).index_fill_(0, kept, True)
    return Decision(active, survival_prob, kept)


_THREAD = threading.local()


def _generator() -> torch.Generator:
    """This thread's CPU generator for the row modes' draws, made once (each draw seeds it)."""
    generator = getattr(_THREAD, "generator", None)
    if generator is None:
        generator = _THREAD.generator = torch.Generator()
    return generator


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


class StochasticDepth(RegionHolder):
    """Randomly bypasses one residual branch: ``gate(branch, x, shortcut)`` is ``shortcut + branch(x)``, gated.

    ``gate(layer, x, None)`` gates a whole layer instead, as LayerDrop (Fan et al., 2019) does:
    its output replaces ``x`` where it is kept, ``x`` passes through where it is dropped, and
    nothing is scaled, in training or at test (``inverted`` does not apply).

    ``gate(branch, x, shortcut, first=conv)`` is ``shortcut + branch(conv(x))``: a ResNet block
    names its first convolution, whose input (the previous block's ReLU output) the network
    keeps for backward anyway. In the row modes that convolution then gathers the kept samples
    itself (:func:`stochastic_depth.autograd_ops.conv_on_rows`) and saves ``x``, not a copy of
    the kept rows: without it, a ResNet-50 in ``"row_subset"`` saves more for backward than the
    unconverted model. Leave it out where nothing else keeps ``x`` (a transformer's block
    input): there the copy of the kept rows is the smaller thing to save.

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
        Exactly ``k = round(B * survival_prob)`` samples (rounded to nearest, at least one
        unless the probability is 0; DINOv2 rounds down), chosen without replacement, keep
        the branch, which runs on those ``k``: the same shape every step (no new cuDNN plans,
        as ``"row"`` needs). The kept residuals are scaled by ``survival_prob * B / k``
        (``B / k`` when ``inverted``), so the expected output is the same as in the other
        modes. Samples are not independent (exactly ``k`` survive).

    Evaluation: the branch always runs, scaled by ``survival_prob`` (the paper's test
    rule), or unscaled when ``inverted=True``, in which case a surviving branch is
    scaled by ``1 / survival_prob`` while training instead. Both conventions give
    the same expected output. A branch with ``survival_prob == 0`` is left out. With
    ``drop_scale < 1`` both use the survival probability in force,
    ``1 - drop_scale * (1 - survival_prob)``, so that evaluation matches the training
    passes of that moment (a drop warm-up, or a schedule that stops dropping).
    Nothing is drawn in evaluation, so an eval-mode model compiles as one graph.

    Memory layout: the output has the layout ``branch(x) + shortcut`` would have. A
    channels_last input is gathered and scattered as ``(N, H, W, C)`` views, in which it is
    plainly contiguous, so that the row modes do not turn a channels_last network NCHW (a
    depthwise convolution runs about 3 times slower in NCHW on the CPU).

    Drawing (the rules at the top of this module): each training call draws the
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

    Shape
    -----
    ``branch(x)`` and ``shortcut`` have one shape ``(B, ...)``, batch first; `x` has
    batch size ``B`` too. The output has that shape.

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
        ``torch.compile`` options for the branch, set by ``compile_branches``; None runs it
        as it is.
    last_active : Tensor or None
        What the last forward pass computed: a bool scalar (``"batch"``) or one
        bool per sample (row modes); all True in evaluation, except for ``p = 0``.
    kept_rows : Tensor or None
        While a row mode runs the branch on some of the samples, their indices (see
        :meth:`kept_inputs`); None otherwise.
    """

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
        self.mode = check_mode(mode)
        if not isinstance(inverted, bool):
            raise TypeError(f"inverted must be True or False, got {inverted!r}")
        self.inverted = inverted
        self.seed, self.seed_given = seed_or_random(seed)
        self.index = int(index)
        self._drop_scale = 1.0
        self.step: tuple[int, ...] | None = None
        self.passes = 0
        self._last_active: bool | Tensor | None = None
        # While a row mode runs the branch on some samples: their indices (see kept_inputs).
        self.kept_rows: Tensor | None = None
        # The keys of the latest passes by their tags (see _pass_tag), for recomputations.
        self._recent: collections.OrderedDict[int, tuple[int, tuple[int, ...] | None]] = collections.OrderedDict()

    @property
    def drop_scale(self) -> float:
        return self._drop_scale

    @drop_scale.setter
    def drop_scale(self, value: float) -> None:
        self._drop_scale = _check_probability(value, "drop_scale")

    @property
    def last_active(self) -> Tensor | None:
        active = self._last_active
        return torch.tensor(active) if isinstance(active, bool) else active

    def forward(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor | None,
                first: nn.Module | None = None) -> Tensor:
        if not self.training:
            return self._evaluate(branch, x, shortcut, first)
        if isinstance(x, torch.fx.Proxy):
            return _stochastic_depth_cannot_train_traced(shortcut)
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            raise RuntimeError(
                "a model with stochastic depth is traced (torch.jit.trace) or exported (torch.export) in "
                "training mode, where the graph would freeze one draw of which residual blocks run. Trace "
                "or export it in eval mode (model.eval()), where every block runs; train the original model."
            )
        return self._train(branch, x, shortcut, first)

    def _evaluate(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor | None,
                  first: nn.Module | None) -> Tensor:
        # A branch never trained with (p_l = 0, drop_scale 1) is left out at test time too. Read so
        # that drop_scale is looked at only then: under torch.compile, whatever the traced code reads
        # is guarded on, and an inverted gate's output does not depend on drop_scale otherwise (an
        # evaluation at every drop_scale of a warm-up would recompile the model each time).
        left_out = self.survival_prob == 0.0 and self._drop_scale == 1.0
        # torch.compile replays this write after its graph (no guard on it); torch.export
        # allows no attribute writes.
        if not torch.compiler.is_exporting():
            self._last_active = not left_out
        if left_out:
            return x if shortcut is None else shortcut
        residual = self.run_region(branch, x if first is None else first(x))
        if shortcut is None:  # a whole layer (LayerDrop): its output, unscaled
            return residual
        # Not inverted: scaled by the survival probability in force (p_l, or more while
        # drop_scale < 1): after a schedule that ends with fewer drops, evaluation is the
        # network training ended with.
        out = shortcut.add(residual, alpha=1.0 if self.inverted else _warmed_up(self.survival_prob, self._drop_scale))
        return out if isinstance(x, torch.fx.Proxy) else _in_layout_of(out, residual)

    @eager_frame
    def _train(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor | None,
               first: nn.Module | None) -> Tensor:
        """A training pass: decide, then run the branch on what is kept.

        Eager also under torch.compile (a graph break where the gate is called): the branch
        runs as a compiled region of its kind (``stochastic_depth.compilation``).
        """
        decision, recomputed = self._decide(x)
        if not recomputed:  # a recomputation does not change what the last pass was
            self._last_active = decision.active
        layer = shortcut is None  # LayerDrop: the branch's output replaces x, nothing is scaled
        if self.mode == "batch":
            if not decision.active:
                return x if layer else shortcut
            residual = self.run_region(branch, x if first is None else first(x))
            if layer:
                return residual
            return _in_layout_of(shortcut.add(residual, alpha=self._train_scale(decision.survival_prob)), residual)

        kept, batch_size = decision.kept, x.shape[0]
        if len(kept) == 0:
            return x if layer else shortcut
        # Each sample keeps the branch with probability p ("row") or k / B ("row_subset").
        scale = self._train_scale(decision.survival_prob if self.mode == "row" else len(kept) / batch_size)
        if len(kept) == batch_size:
            residual = self.run_region(branch, x if first is None else first(x))
            return residual if layer else _in_layout_of(shortcut.add(residual, alpha=scale), residual)
        kept = _indices_to(kept, x.device)
        self.kept_rows = kept  # for the branch's other inputs with a batch dimension (an attention mask)
        try:
            return self._run_on_rows(branch, x, shortcut, first, kept, scale)
        finally:
            self.kept_rows = None

    def _run_on_rows(self, branch: Callable[[Tensor], Tensor], x: Tensor, shortcut: Tensor | None,
                     first: nn.Module | None, kept: Tensor, scale: float) -> Tensor:
        """The branch on the samples `kept` (fewer than the batch), added into (or, for a layer, copied over) the rest."""
        if shortcut is None:  # (a layer's rows are samples of (B, tokens, C): no memory layout to keep)
            residual = self.run_region(branch, mark_batch_dynamic(x.index_select(0, kept)))
            return x.index_copy(0, kept, residual.to(x.dtype))  # (its backward saves only the indices)
        if len(kept) > 1:
            # `first` gathers the rows itself, so that it saves x (kept anyway) and not a copy of them.
            inputs = select_rows(x, kept) if first is None else conv_on_rows(first, x, kept)
            residual = self.run_region(branch, mark_batch_dynamic(inputs))
        else:
            # BatchNorm cannot normalise one sample on 1x1 feature maps: for this rare
            # case the branch runs on the whole batch and we keep the one row.
            self.kept_rows = None  # (the branch sees the whole batch)
            residual = self.run_region(branch, x if first is None else first(x)).index_select(0, kept)
        # A channels_last output is scattered as its (N, H, W, C) view, in which it is plainly contiguous.
        if is_channels_last(shortcut):
            out = add_rows(shortcut.permute(0, 2, 3, 1), kept, residual.permute(0, 2, 3, 1).to(shortcut.dtype), scale)
            return out.permute(0, 3, 1, 2)
        return _in_layout_of(add_rows(shortcut, kept, residual.to(shortcut.dtype), scale), residual)

    @torch.compiler.disable  # host-side bookkeeping and draws: eager, also under torch.compile
    def _decide(self, x: Tensor) -> tuple[Decision, bool]:
        """The decision of a new pass, or of the pass that this call recomputes (then True)."""
        tag = _pass_tag()
        recomputed = in_backward_pass()
        if recomputed:
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
            elif not recomputed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn(_UNSTEPPED_DDP_WARNING, stacklevel=_CALLER_OF_THE_GATE)
            key = (self.seed, self.index, pass_index)
        else:
            key = (self.seed, self.index, pass_index, _process_rank())
        step = () if step is None else step
        p = _warmed_up(self.survival_prob, self._drop_scale)
        return draw_decision(self.mode, p, x.shape[0], key_seed(len(step), *key, *step)), recomputed

    def kept_inputs(self, values: tuple | dict, batch_size: int) -> tuple | dict:
        """A branch's other inputs (a tuple or dict), each tensor whose first dimension is `batch_size`
        (a per-sample attention mask) cut to the samples the branch runs on: what a branch that
        takes more than ``x`` calls while a row mode runs it on some samples (unchanged otherwise)."""
        rows = self.kept_rows
        if rows is None or batch_size < 2:
            return values

        def cut(value: Any) -> Any:
            is_batch = isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size
            return value.index_select(0, rows) if is_batch else value

        return {k: cut(v) for k, v in values.items()} if isinstance(values, dict) else tuple(cut(v) for v in values)

    def _train_scale(self, inclusion: float) -> float:
        """The factor of a kept residual while training, so that its expectation is ``p * residual``.

        (``residual`` itself when ``inverted``.) `inclusion` is the probability that a
        sample kept the branch: the survival probability in force in "batch" and "row",
        ``k / B`` in "row_subset". Applied as ``alpha`` of the add, which saves a
        multiplication.
        """
        return (1.0 if self.inverted else _warmed_up(self.survival_prob, self._drop_scale)) / inclusion

    def extra_repr(self) -> str:
        return f"survival_prob={self.survival_prob:.4f}, mode={self.mode}, inverted={self.inverted}"


# The frames between the warning and the code that called the gate: _decide, its disable
# wrapper, _train, its eager_frame wrapper, forward, Module._call_impl, Module._wrapped_call_impl.
_CALLER_OF_THE_GATE = 8

def _in_layout_of(out: Tensor, residual: Tensor) -> Tensor:
    """`out`, channels_last when `residual` is and `out` is not: an NCHW input whose branch returns
    channels_last (ConvNeXt's first block after a downsampling layer), as ``branch + shortcut`` is."""
    if is_channels_last(residual) and not is_channels_last(out):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def _indices_to(indices: Tensor, device: torch.device) -> Tensor:
    """`indices` (on the CPU) on `device`, without making the host wait for a GPU."""
    if indices.device == device:
        return indices
    if device.type == "cuda":
        # A copy from pageable memory waits for the GPU to finish all queued work;
        # from pinned memory it does not.
        indices = indices.pin_memory()
    return indices.to(device, non_blocking=True)


# The eager training pass's helpers: called from eager code under torch.compile(model), each
# would be compiled as a frame of its own (and again for every shape); only the regions are.
for _helper in (StochasticDepth.forward, StochasticDepth._evaluate, StochasticDepth._run_on_rows,
                StochasticDepth._train_scale, _warmed_up, _in_layout_of, _indices_to):
    not_a_frame(_helper)


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


def seed_or_random(seed: Any) -> tuple[int, bool]:
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
        lengths = {name: len(state[name]) for name in _GATE_STATE}
        if any(length != len(self.gates) for length in lengths.values()):
            raise ValueError(
                f"the state's lists have the lengths {lengths}, but this model has {len(self.gates)} gates: pass what "
                "get_state() returned for a model converted alike (the same blocks, the same gates)"
            )
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
    """The ``StochasticDepth`` gates of a model, in forward (block) order (TypeError for a non-module)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module with stochastic-depth gates, got {type(model).__name__} {model!r:.60}")
    return [m for m in model.modules() if isinstance(m, StochasticDepth)]


def stochastic_depth_state(model: nn.Module) -> StochasticDepthState:
    """The :class:`StochasticDepthState` of `model`'s gates.

    Raises
    ------
    TypeError
        For a model without gates (``stochastic_depth_gates(model)`` tells first).
    """
    gates = stochastic_depth_gates(model)
    if not gates:
        raise TypeError(
            f"stochastic_depth_state: {type(model).__name__} has no StochasticDepth gates; convert it with "
            "add_stochastic_depth first (or check stochastic_depth_gates(model) before)"
        )
    return StochasticDepthState(gates)
