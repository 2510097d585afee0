"""The gate: one training path for every family, what a training step keeps for backward."""

import pytest
import torch
import torchvision
from test_library_blocks import FAMILIES, build, images
from torch import nn

from resnet_with_stochastic_depth import StochasticDepth, StochasticResNet, add_stochastic_depth, stochastic_depth_gates

ALL_FAMILIES = {
    **FAMILIES,
    "StochasticResNet": lambda: StochasticResNet.cifar(14, p_last=0.5, seed=0),
    "torchvision ResNet-18": lambda: add_stochastic_depth(torchvision.models.resnet18(num_classes=10), seed=0),
}


def _converted(family, mode):
    if family in FAMILIES:
        return add_stochastic_depth(build(family), mode=mode, seed=0)
    torch.manual_seed(0)
    model = ALL_FAMILIES[family]()
    return add_stochastic_depth(model, mode=mode, seed=0) if mode != "batch" else model


@pytest.mark.parametrize("mode", ["batch", "row_subset"])
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_a_hook_on_every_gate_runs_once_per_branch_in_training_and_in_eval(family, mode):
    model = _converted(family, mode)
    gates = stochastic_depth_gates(model)
    calls = []
    for gate in gates:
        gate.register_forward_hook(lambda module, args, out: calls.append(module))
    model.train()(images()).sum().backward()
    assert calls == gates  # once each, in forward order, dropped or not
    calls.clear()
    with torch.no_grad():
        model.eval()(images())
    assert calls == gates


@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_the_row_modes_keep_no_residual_alive_for_backward(mode):
    # The residual of the kept samples is added into the shortcut; its gradient needs only the indices.
    torch.manual_seed(0)
    branch = nn.Linear(16, 32)
    gate = StochasticDepth(survival_prob=0.5, mode=mode, seed=1)
    x, shortcut = torch.randn(8, 16), torch.randn(8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = gate(branch, x, shortcut)
    kept = int(gate.last_active.sum())
    assert 1 < kept < 8
    assert not any(t.shape == (kept, 32) for t in saved), [tuple(t.shape) for t in saved]
    # ... and the gradients are those of the masked reference.
    out.sum().backward()
    mask = gate.last_active.float().unsqueeze(1)
    scale = 0.5 * 8 / kept if mode == "row_subset" else 1.0
    reference = shortcut + scale * mask * branch(x)
    grad = torch.autograd.grad(reference.sum(), branch.weight)[0]
    torch.testing.assert_close(branch.weight.grad, grad)
    torch.testing.assert_close(out, reference)
