"""Counters for measurements (benchmarks and tests), not part of the library.

``collective_bytes``
    The bytes FSDP2's collectives all-gather, reduce-scatter and all-reduce in this process.
``training_operator_count``
    The ATen operators of one training step, on the model's device and on the host.
``saved_tensor_bytes``
    The bytes autograd saves for backward in one training step (activation memory).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode  # what FlopCounterMode is built on (private)
from torch.utils._pytree import tree_leaves

__all__ = ["CollectiveBytes", "collective_bytes", "saved_tensor_bytes", "training_operator_count"]


@dataclasses.dataclass
class CollectiveBytes:
    """Bytes that passed through FSDP2's collectives while :func:`collective_bytes` counted.

    ``all_gathered``: the all-gathers' output bytes (the unsharded parameters, in the
    all-gather dtype); ``reduce_scattered``: the reduce-scatters' input bytes (the unsharded
    gradients, in the reduce dtype); ``all_reduced``: all-reduces' bytes. ``calls``: number
    of calls of each, by the same names.
    """

    all_gathered: int = 0
    reduce_scattered: int = 0
    all_reduced: int = 0
    calls: dict[str, int] = dataclasses.field(default_factory=lambda: {"all_gathered": 0, "reduce_scattered": 0, "all_reduced": 0})

    def _add(self, kind: str, tensor: torch.Tensor) -> None:
        setattr(self, kind, getattr(self, kind) + tensor.numel() * tensor.element_size())
        self.calls[kind] += 1


# torch.distributed's collectives as FSDP2 calls them (by attribute, at call time), and what each counts.
_COUNTED = {
    "all_gather_single": ("all_gathered", 0),          # (output_tensor, input_tensor, ...)
    "all_gather_into_tensor": ("all_gathered", 0),
    "reduce_scatter_single": ("reduce_scattered", 1),  # (output, input, ...)
    "reduce_scatter_tensor": ("reduce_scattered", 1),
    "all_reduce": ("all_reduced", 0),
}


@contextlib.contextmanager
def collective_bytes() -> Iterator[CollectiveBytes]:
    """Count the bytes of ``torch.distributed``'s all-gathers, reduce-scatters and all-reduces in this process.

    Replaces the functions in ``torch.distributed`` (``all_gather_single`` /
    ``all_gather_into_tensor``, ``reduce_scatter_single`` / ``reduce_scatter_tensor``,
    ``all_reduce``), which FSDP2 looks up at each call, by wrappers that count and call them;
    restores them on exit. Not thread-safe; for measurements.
    """
    counter = CollectiveBytes()
    originals = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}

    def counting(name: str, original: Any) -> Any:
        kind, position = _COUNTED[name]
        keyword = {0: ("output_tensor", "tensor"), 1: ("input",)}[position]

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tensor = args[position] if len(args) > position else next(kwargs[k] for k in (*keyword, "input_tensor", "output") if k in kwargs)
            counter._add(kind, tensor)
            return original(*args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(dist, name, counting(name, original))
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


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


def saved_tensor_bytes(model: nn.Module, images: Tensor, labels: Tensor, before_step: Callable[[], Any] | None = None) -> int:
    """Bytes autograd saves for backward in one cross-entropy training step of `model`.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: each storage once (a tensor and
    its views, or an activation saved by two operators, count once), parameters left out.
    What is saved is exact on any machine; it is the activation memory of the step, which
    sets the largest batch that fits. The step runs its backward too (the model's gradients
    change); `before_step` runs first (``set_step``, say).
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    if before_step is not None:
        before_step()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return sum(saved.values())
