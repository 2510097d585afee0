"""``torch.compile`` around the gates: regional compilation of the residual branches.

A gate draws on the host, from counters that change at every pass: no graph can hold that.
So a gate's training pass runs eagerly (a graph break where a traced caller calls it) and
hands its branch to a *region*: a copy of a two-line function with a code object of its own,
one per kind of branch (the same code, modules of the same class, settings and parameter
shapes: one branch of the blocks of one stage). Dynamo keeps compiled variants, and counts its
recompile limit, per code object, so:

- under ``torch.compile(model)`` dynamo compiles each region as a frame of its own with the
  model's backend and options, once per kind of branch, however deep the network;
- with :func:`compile_branches` a holder keeps ``torch.compile`` options and the region is
  ``torch.compile(copy, **options)``;
- otherwise a region is a plain call.

Nothing of a gate (its probability, index, step or passes) reaches a traced frame, so nothing
of it is guarded on. Every private dynamo API the library uses is in this module.
"""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch._dynamo.eval_frame import skip_code  # no public way to skip one code object

__all__ = ["compile_branches"]


def not_a_frame(function: Callable) -> Callable:
    """`function`, which torch.compile never compiles as a frame of its own but still inlines
    where it traces a caller: for the dispatchers of the eager training pass, which would
    otherwise be compiled, and recompiled, for every shape of their arguments. (What
    ``torch._dynamo.skip`` does, without its graph break.)"""
    skip_code(function.__code__)
    return function


_GRAPH_BREAK_REASON = (
    "a stochastic-depth gate draws which residual branches run on the host, at every training pass: "
    "torch.compile runs the gate's training pass eagerly (this graph break) and compiles each kind of "
    "branch as a region of its own. Compile the model without fullgraph=True (torch.compile(model)), or "
    "use stochastic_depth.compile_branches(model); in eval mode the model is one graph "
    "(fullgraph=True works there)"
)


def eager_frame(function: Callable) -> Callable:
    """`function`, whose own frame torch.compile runs eagerly (a graph break where a traced
    caller calls it), compiling the frames it calls (``torch.compiler.disable(recursive=False)``).

    Called from eager code it is a skipped frame (see :func:`not_a_frame`): a function disabled
    with ``recursive=False`` is converted again at every call (about 1 ms on a CPU, at every gate
    of every training pass), which cost the idiom 7% of a ViT-S step.
    """
    disabled = torch.compiler.disable(function, recursive=False, reason=_GRAPH_BREAK_REASON)

    @not_a_frame
    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # a traced caller: the graph break
            return disabled(*args, **kwargs)
        return function(*args, **kwargs)

    not_a_frame(function)
    return call


@not_a_frame
def mark_batch_dynamic(t: Tensor) -> Tensor:
    """`t`, its batch dimension marked dynamic: the row modes' kept samples are a new batch size at
    every gate and step, so their regions are compiled for any."""
    torch._dynamo.maybe_mark_dynamic(t, 0)
    return t


# ----------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------


def _region(function: Callable[..., Tensor], *args: Any) -> Tensor:
    return function(*args)


# The regions of this process by kind (and options). Bounded: a region dropped from it is
# compiled again by the next branch of its kind, nothing else is lost.
_SHARED_REGIONS: collections.OrderedDict[Any, Callable[..., Tensor]] = collections.OrderedDict()
_MAX_SHARED_REGIONS = 256


def _module_kind(module: nn.Module) -> tuple:
    """A module's class and settings (``extra_repr``) and the names, shapes and dtypes of its tensors."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return type(module), module.extra_repr(), tuple((n, tuple(t.shape), t.dtype) for n, t in tensors)


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


def _shared_region(kind: Any, options: Mapping[str, Any] | None) -> Callable[..., Tensor]:
    key = kind if options is None else (kind, repr(sorted(options.items())))
    region = _SHARED_REGIONS.get(key)
    if region is None:
        code = _region.__code__.replace(co_name=f"stochastic_depth_region_{len(_SHARED_REGIONS)}")
        region = types.FunctionType(code, _region.__globals__, code.co_name)
        region = region if options is None else torch.compile(region, **options)
        _SHARED_REGIONS[key] = region
        if len(_SHARED_REGIONS) > _MAX_SHARED_REGIONS:
            _SHARED_REGIONS.popitem(last=False)
    else:
        _SHARED_REGIONS.move_to_end(key)
    return region


def _identity(function: Any) -> Any:
    """What names one branch of one holder across calls (a bound method is a new object at every
    call), or None for a closure, whose kind is computed at every call."""
    if isinstance(function, types.MethodType):
        return function.__func__, id(function.__self__)
    if isinstance(function, nn.Module):
        return id(function)
    return None


class Regions:
    """One holder's regions, by branch: the kind of each branch computed once.

    Owned by its holder (a gate or a block), so it goes with the model. A copy of the holder
    (``copy.deepcopy``, an EMA copy; pickling) starts with none: its branches are other
    modules, and it finds their regions in this process's table or compiles them again.
    """

    def __init__(self) -> None:
        self.by_branch: dict[Any, Callable[..., Tensor]] = {}

    def __deepcopy__(self, memo: dict) -> Regions:
        return Regions()

    def __reduce__(self) -> tuple:
        return Regions, ()

    def run(self, function: Callable[..., Tensor], args: tuple, options: Mapping[str, Any] | None) -> Tensor:
        identity = _identity(function)
        region = self.by_branch.get(identity) if identity is not None else None
        if region is None:
            region = _shared_region(_callable_kind(function), options)
            if identity is not None:
                self.by_branch[identity] = region
        return region(function, *args)


class CompileOptions(dict):
    """The ``torch.compile`` options a holder compiles its branches with (:func:`compile_branches`).

    A deep copy of a model (an EMA copy) shares them, and so the compiled regions, instead of
    copying a backend object into a new one (which would compile everything again).
    """

    def __deepcopy__(self, memo: dict) -> CompileOptions:
        return self


class RegionHolder(nn.Module):
    """A module that runs branches (a gate) or shortcuts (a block) as compiled regions.

    ``compile_options``: the ``torch.compile`` options set by :func:`compile_branches`, or None
    (a branch is then a region only in a training pass, for ``torch.compile(model)`` to compile
    it as a frame of its own). Changing the modules' dtype or device (``model.half()``,
    ``.to()``) forgets the kinds computed, which name their dtypes.
    """

    compile_options: CompileOptions | None = None

    def runs_regions(self) -> bool:
        """Whether its branches run as regions now: with compile options, or in a training pass
        (which runs eagerly under ``torch.compile``)."""
        return self.compile_options is not None or self.training

    def run_region(self, function: Callable[..., Tensor], *args: Any) -> Tensor:
        """``function(*args)``, as the compiled region of its kind where one applies."""
        if torch.compiler.is_compiling() or not self.runs_regions():
            return function(*args)  # traced as part of the caller's graph, or no compilation at all
        regions = self.__dict__.get("_regions")
        if regions is None:
            regions = self.__dict__["_regions"] = Regions()
        return regions.run(function, args, self.compile_options)

    def _apply(self, fn: Callable, recurse: bool = True) -> RegionHolder:
        self.__dict__.pop("_regions", None)
        return super()._apply(fn, recurse)


# Called from eager code under torch.compile(model), these would each be compiled as frames of
# their own (and again for every shape): only the regions are.
for _helper in (_module_kind, _callable_kind, _shared_region, _identity, Regions.__init__, Regions.run,
                RegionHolder.runs_regions,
                RegionHolder.run_region):
    not_a_frame(_helper)


def compile_branches(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation: ``torch.compile`` each residual branch, leaving the gates eager.

    Every gate of `model` runs its branch, and every residual block its downsampling shortcut,
    as a region compiled with `options`. Branches of one kind (the same code, modules of the
    same class and parameter shapes: one branch of the blocks of one stage) share one compiled
    function, also across models (a ``ResNet`` and its stochastic twin, an EMA copy): a
    ResNet-110 compiles 5 branches, a ResNet-152 8 and 4 shortcuts, a ViT 2, each with its own
    dynamo cache, so no recompile limit is reached. In the row modes the kept samples are a new
    batch size at every gate and step, and the regions are compiled for any batch size. The
    decisions, the gathering of kept samples and the shortcut addition run eagerly in between;
    dropped branches are still skipped.

    It works on every converted family and on this project's ResNets (a plain ``ResNet``
    too). The model pickles and deep-copies as before: the holders keep the options only.
    ``torch.compile(model)`` of the whole model works too (the same regions, compiled with the
    model's options); ``compile_branches`` leaves the stem, the head and the downsampling
    layers between stages eager.

    Parameters
    ----------
    model : torch.nn.Module
        A network with stochastic-depth gates, or a ``ResNet`` of this project; changed in place.
    **options
        Passed to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).

    Returns
    -------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    TypeError
        For a model with neither gates nor residual blocks of this library, before anything
        is changed.
    ValueError
        For options ``torch.compile`` does not take (an unknown ``mode`` or ``backend``, an
        unknown keyword), before anything is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_branches: model must be a torch.nn.Module, got {type(model).__name__} {model!r:.60}")
    try:  # torch.compile checks its options when it wraps a function, before anything is compiled
        torch.compile(_region, **options)
    except Exception as error:
        raise ValueError(f"compile_branches: torch.compile does not take the options {options!r}: {error}") from error
    holders = [m for m in model.modules() if isinstance(m, RegionHolder)]
    if not holders:
        raise TypeError(
            f"{type(model).__name__} has no stochastic-depth gates and no residual blocks of this project to "
            "compile: convert it with add_stochastic_depth first, or torch.compile it as it is"
        )
    shared = CompileOptions(options)  # (one object: copies of the model share it, see there)
    for holder in holders:
        holder.compile_options = shared
        holder.__dict__.pop("_regions", None)  # compiled with other options
    return model
