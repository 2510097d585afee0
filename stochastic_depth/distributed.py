"""Sharded (FSDP2) and data-parallel (DDP) training of models with stochastic-depth gates.

:func:`fully_shard_stochastic_depth` shards a model the way FSDP2 shards any model
(``torch.distributed.fsdp.fully_shard`` on parts of it, then on the root), but cut so
that in ``"batch"`` mode a dropped residual branch costs no communication: each
branch's modules form an FSDP unit of their own, which FSDP2 all-gathers only when
the branch is called (its forward pre-hook) and reduce-scatters only when it produced
gradients. A branch the gate drops is not called, so its unit is neither all-gathered
in the forward pass nor in the backward pass, and its gradients are not
reduce-scattered. Processes skip the same units because they draw the same decisions
(the same seed, :func:`resnet_with_stochastic_depth.set_step` before every step):
nothing is communicated by the gates, and no collective is left unmatched.

In the row modes every process runs every branch on its own samples (in ``"row"`` a
process whose draw kept no sample does not call it), so a branch there stays in its
block's unit, which is all-gathered whenever the block runs; for ``"row"`` that unit
reduce-scatters zeros for parameters a process did not use, so that every process
reduce-scatters the same tensors. The row modes save computation, not communication.

:func:`get_checkpoint_state` and :func:`set_checkpoint_state` save and restore a sharded run
exactly, also when some branches have not run yet (and so have no optimizer state).

:func:`data_parallel` wraps a model in ``DistributedDataParallel`` with the options the
gates need (``find_unused_parameters=True``) and refuses ``static_graph=True``, under
which DDP would assume the same parameters unused at every step.

``benchmarks.counters.collective_bytes`` counts the bytes FSDP2 all-gathers and
reduce-scatters (for tests and ``benchmarks/bench_fsdp.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from stochastic_depth.gate import StochasticDepth, stochastic_depth_gates, stochastic_depth_state
from stochastic_depth.library_blocks import GatedBlock

__all__ = [
    "branch_modules",
    "get_checkpoint_state",
    "set_checkpoint_state",
    "data_parallel",
    "fully_shard_stochastic_depth",
    "gated_blocks",
]

def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def gated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that hold stochastic-depth gates as children, in ``modules()`` order.

    These are the residual blocks ``add_stochastic_depth`` converted (and the blocks of this
    project's ResNets); each holds one gate per residual branch.
    """
    return [m for m in model.modules() if any(isinstance(c, StochasticDepth) for c in m.children())]


def branch_modules(block: nn.Module) -> dict[str, list[nn.Module]]:
    """Each gate of `block` and the child modules (those holding parameters) that its branch calls.

    Parameters
    ----------
    block : torch.nn.Module
        A gated residual block (see :func:`gated_blocks`).

    Returns
    -------
    dict of str to list of torch.nn.Module
        Gate attribute name -> the children its branch runs, in forward order. Parameters
        of the block itself (torchvision ConvNeXt's ``layer_scale``, timm ConvNeXt's ``gamma``)
        are in no child: they stay with the block.

    Raises
    ------
    TypeError
        For a block that does not declare its branches (``GatedBlock.BRANCHES``).
    """
    declared = getattr(type(block), "BRANCHES", None)
    if not isinstance(block, GatedBlock) or declared is None:
        raise TypeError(
            f"{type(block).__name__} does not declare which children make up each branch (GatedBlock.BRANCHES): "
            "fully_shard_stochastic_depth shards the blocks that add_stochastic_depth converts and the blocks of "
            "resnet_with_stochastic_depth"
        )
    branches = {}
    for gate, names in declared.items():
        children = [getattr(block, name, None) for name in names]
        branches[gate] = [c for c in children if isinstance(c, nn.Module) and _has_parameters(c)]
    return branches


def _check_gates_agree(gates: Sequence[StochasticDepth], group: dist.ProcessGroup | None, wrapper: str) -> None:
    """Raise unless every process's gates have the same seed, index, mode and survival probability.

    Under FSDP2, processes that drew different branches call different all-gathers: gloo aborts
    on the size mismatch, or, where the units happen to be of the same size, pairs the shards of
    different blocks and trains on wrong weights without a word (fairseq's LayerDrop hangs under
    FSDP instead, fairseq #3875). Under DDP they train different sub-networks, silently. So a
    mismatch found here, once, before training, is an error. It cannot catch what happens later:
    a ``set_step`` with another step on one process.
    """
    fields = ("seed", "index", "mode", "survival_prob")
    mine = [tuple(getattr(g, f) for f in fields) for g in gates]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    consequence = {
        "fully_shard_stochastic_depth": "their all-gathers would not match",
        "data_parallel": "they would train different sub-networks and average their gradients",
    }[wrapper]
    for rank, theirs in enumerate(everyone):
        if theirs != mine:
            if len(theirs) != len(mine):
                differs = f"{len(theirs)} gates there, {len(mine)} here"
            else:
                gate, here, there = next((i, a, b) for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
                names = [f for f, a, b in zip(fields, here, there) if a != b]
                differs = f"gate {gate}: {', '.join(f'{n} {b!r} there, {a!r} here' for n, a, b in zip(fields, here, there) if n in names)}"
            raise ValueError(
                f"{wrapper}: the stochastic-depth gates of process {rank} differ from this process's ({differs}): "
                f"processes must drop the same branches, or {consequence}. Build the model alike on every process: "
                "the same seed= (add_stochastic_depth(model, seed=...), StochasticResNet(..., seed=...)), the same "
                "mode and the same rates (drop_path_rate, stochastic_depth_prob, p_last)"
            )


def fully_shard_stochastic_depth(
    model: nn.Module,
    *,
    mesh: Any = None,
    reshard_after_forward: bool | int | None = None,
    mp_policy: MixedPrecisionPolicy | None = None,
    offload_policy: OffloadPolicy | None = None,
) -> FSDPModule:
    """Shard `model` with FSDP2 so that a branch dropped in ``"batch"`` mode is not communicated.

    Applies ``torch.distributed.fsdp.fully_shard`` bottom-up, in place:

    1. for each gate in ``"batch"`` mode, the children its branch calls (:func:`branch_modules`)
       as one FSDP unit (``fully_shard`` of the list): all-gathered when the branch is called,
       reduce-scattered when it computed gradients, neither when the gate drops it;
    2. each gated block, which then holds the rest of its parameters (shortcut projections,
       layer scales kept on the block itself) and, for gates in a row mode, the branches;
    3. the root, holding everything else (stem, embeddings, norms, head).

    Use it like ``fully_shard``: build the model on every process with the same ``seed=``, shard
    it, make the optimizer from ``model.parameters()`` afterwards, call
    ``set_step(model, step)`` on every process before each step (with a step that names the
    same batch everywhere) and ``optimizer.zero_grad(set_to_none=True)``. In ``"batch"`` mode a
    dropped branch's parameters then keep ``grad=None`` and the optimizer skips them, as
    without FSDP.

    What not to do: ``set_modules_to_forward_prefetch`` / ``set_modules_to_backward_prefetch``
    naming a branch's unit (a static list would all-gather the branch also when it is dropped;
    FSDP2's own backward prefetching follows the order of the units that ran, and skips the
    dropped ones); ``set_reduce_scatter_unused_params(True)`` on a branch's unit (it would
    reduce-scatter zeros for a dropped branch).

    Parameters
    ----------
    model : torch.nn.Module
        A model with gates (``add_stochastic_depth``, ``StochasticResNet``), on its device, not
        sharded yet. Activation checkpointing (``apply_activation_checkpointing``) may be
        applied before.
    mesh, reshard_after_forward, mp_policy, offload_policy
        Passed to every ``fully_shard`` call; ``None`` leaves FSDP2's default (the default
        process group's world; every unit but the root resharded after forward, so a kept
        branch is all-gathered twice per step, in the forward and the backward pass).

    Returns
    -------
    FSDPModule
        `model` itself, now sharded (its class is FSDP2's subclass of the original one).

    Raises
    ------
    TypeError
        For a model without gates, one with a block of several gates whose branches are not
        known (:func:`branch_modules`), or a module sharded already.
    ValueError
        When the processes' gates differ in seed, mode or rates (checked once, here, with one
        ``all_gather_object``): they would not skip the same all-gathers.
    """
    gates = stochastic_depth_gates(model)
    if not gates:
        raise TypeError(f"{type(model).__name__} has no StochasticDepth gates: shard it with fully_shard")
    # The arguments' types, before anything is sharded (fully_shard would fail at the first forward).
    for name, value, kind, example in (
        ("mesh", mesh, DeviceMesh, "init_device_mesh('cpu', (world_size,))"),
        ("mp_policy", mp_policy, MixedPrecisionPolicy, "MixedPrecisionPolicy(param_dtype=torch.bfloat16)"),
        ("offload_policy", offload_policy, OffloadPolicy, "CPUOffloadPolicy()"),
    ):
        if value is not None and not isinstance(value, kind):
            raise TypeError(
                f"fully_shard_stochastic_depth: {name} must be a {kind.__name__} or None, got {value!r} "
                f"(e.g. {name}={example})"
            )
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise TypeError("the model is sharded already (a module of it is an FSDPModule): pass the unsharded model")
    # (over the mesh's processes; for a mesh of several dimensions, over the default group's)
    group = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None
    _check_gates_agree(gates, group, "fully_shard_stochastic_depth")
    if all(g.mode != "batch" for g in gates):
        warnings.warn(
            f"no gate of {type(model).__name__} is in batch mode (add_stochastic_depth's default for torchvision "
            "and timm models is row_subset): every branch runs on some samples of every process, so every branch "
            "is all-gathered and nothing is saved in communication. Convert with mode='batch' for that saving",
            stacklevel=2,
        )

    options: dict[str, Any] = {}
    if reshard_after_forward is not None:
        options["reshard_after_forward"] = reshard_after_forward
    if mesh is not None:
        options["mesh"] = mesh
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if offload_policy is not None:
        options["offload_policy"] = offload_policy

    for block in gated_blocks(model):
        branches = branch_modules(block)
        gated_in_row_mode = False
        for gate_name, children in branches.items():
            if getattr(block, gate_name).mode != "batch":
                gated_in_row_mode = gated_in_row_mode or getattr(block, gate_name).mode == "row"
                continue
            if children:
                fully_shard(children, **options)
        if any(True for _ in _unsharded_parameters(block)):
            fully_shard(block, **options)
            if gated_in_row_mode:
                # A "row" gate that kept no sample on one process does not call its branch there:
                # zeros stand in for its gradients, so that all processes reduce-scatter alike.
                block.set_reduce_scatter_unused_params(True, recurse=False)
    fully_shard(model, **options)
    return model


def _unsharded_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters of `module` that no FSDP unit inside it manages yet."""
    # fully_shard replaces the parameters it manages by DTensors
    return (p for p in module.parameters() if not isinstance(p, DTensor))


def get_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint of a sharded (or any) model with gates needs, on the CPU.

    The full model and optimizer state dicts (``get_model_state_dict`` /
    ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``: on rank 0
    only, empty elsewhere; call it on every process, it gathers) and the gates' state. Save it
    from rank 0 (``torch.save``) and restore it with :func:`set_checkpoint_state`.

    A branch that its gate has dropped at every step so far has no optimizer state yet (an
    optimizer makes a parameter's state at its first gradient): the checkpoint holds none for
    it, and :func:`set_checkpoint_state` leaves it without, as the uninterrupted run has it.

    Returns
    -------
    dict
        ``{"model": ..., "optimizer": ..., "stochastic_depth": ...}``.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
        "stochastic_depth": stochastic_depth_state(model).get_state(),
    }


def set_checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Restore what :func:`get_checkpoint_state` returned, on every process.

    Call it on every process of the new run, after sharding the model and making its optimizer,
    with the checkpoint on rank 0 (other processes may pass None or ``{}``): rank 0 sends the
    state dicts out (``broadcast_from_rank0=True``). On one process without ``torch.distributed``
    it loads the state as it is. A parameter without optimizer state in the
    checkpoint (a branch not run yet) stays without: loading alone would give it a state at step
    1 with zero moments (what ``set_optimizer_state_dict`` initialises with), and AdamW would
    then continue otherwise than the uninterrupted run.

    Raises
    ------
    ValueError
        On rank 0, for a state without the keys :func:`get_checkpoint_state` gives.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    keys = {"model", "optimizer", "stochastic_depth"}
    if rank == 0 and (not isinstance(state, dict) or set(state) != keys):
        raise ValueError(f"set_checkpoint_state: expected what get_checkpoint_state returned, with the keys {sorted(keys)}, "
                         f"got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
    state = state or {}
    # Rank 0 tells every process which parameters had optimizer state, and the gates' state.
    shared = [(set(state["optimizer"]["state"]), state["stochastic_depth"]) if rank == 0 else None]
    if distributed:
        dist.broadcast_object_list(shared, src=0)
    with_state, gates = shared[0]
    # (one process without torch.distributed: nothing to send)
    set_model_state_dict(model, state.get("model", {}),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed))
    set_optimizer_state_dict(model, optimizer, state.get("optimizer", {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=False))
    for name, parameter in model.named_parameters():
        if _plain_name(name) not in with_state:
            optimizer.state.pop(parameter, None)
    stochastic_depth_state(model).set_state(gates)


def _plain_name(name: str) -> str:
    """A parameter's name as the state dicts give it: without the wrappers' prefixes (activation
    checkpointing's, torch.compile's)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def data_parallel(model: nn.Module, **ddp_options: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, find_unused_parameters=True, **ddp_options)``, for a model with gates.

    A dropped branch produces no gradients, and which branches are dropped changes from step to
    step (and, with gradient accumulation keyed by micro-batch, between the micro-batches of
    one step): DDP must look for unused parameters in every backward pass. DDP still
    all-reduces every bucket whole (a dropped branch's gradients as zeros): dropping saves
    computation under DDP, not communication.

    Raises
    ------
    ValueError
        For ``static_graph=True`` while a gate can drop (survival probability below 1):
        DDP would assume the parameters unused at its first step are unused at every step.
        For ``find_unused_parameters=False`` likewise. For transformers layers checkpointed with
        ``use_reentrant=True``, which DDP cannot run with unused parameters.
        When the processes' gates differ in seed, mode or rates (checked once, here, with one
        ``all_gather_object``): the processes would train different sub-networks.
    TypeError
        For a model without gates.
    """
    gates = stochastic_depth_gates(model)
    if not gates:
        raise TypeError(f"{type(model).__name__} has no StochasticDepth gates: use DistributedDataParallel")
    _check_gates_agree(gates, ddp_options.get("process_group"), "data_parallel")
    can_drop = any(g.survival_prob < 1.0 for g in gates)
    if can_drop and ddp_options.get("static_graph", False):
        raise ValueError(
            "static_graph=True tells DDP that the same parameters are used at every step, but stochastic-depth "
            "gates leave a different set of branches unused at each step: pass static_graph=False (the "
            "default); data_parallel sets find_unused_parameters=True"
        )
    if can_drop and ddp_options.get("find_unused_parameters", True) is False:
        raise ValueError(
            "find_unused_parameters=False: a dropped branch's parameters get no gradient, and DDP would wait for "
            "them; data_parallel sets find_unused_parameters=True"
        )
    if can_drop and any(_reentrant_checkpointing(m) for m in model.modules()):
        raise ValueError(
            "the model checkpoints its layers with reentrant activation checkpointing (use_reentrant=True), which "
            "DDP cannot combine with the unused parameters of dropped branches (find_unused_parameters=True, a "
            "PyTorch limit): enable checkpointing with use_reentrant=False, transformers' default "
            "(model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"
        )
    ddp_options["find_unused_parameters"] = True
    return DistributedDataParallel(model, **ddp_options)


def _reentrant_checkpointing(module: nn.Module) -> bool:
    """Whether `module` is a transformers layer set to checkpoint with ``use_reentrant=True``."""
    function = getattr(module, "_gradient_checkpointing_func", None)
    return bool(getattr(module, "gradient_checkpointing", False)) and getattr(function, "keywords", {}).get("use_reentrant") is True
