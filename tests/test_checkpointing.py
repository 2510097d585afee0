"""Activation checkpointing and other recomputations in backward: a recomputed forward makes the draws
of the pass it recomputes, so a step with checkpointing (each block with torch.utils.checkpoint or
PyTorch's checkpoint_wrapper, the whole network in one region, timm's set_grad_checkpointing) has the
loss and gradients of the same step without it, in every mode, whatever ran between a pass and its
recomputation (two views before one backward, a second backward, a pass without gradients)."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_library_blocks import FAMILIES, build, converted_blocks, images
from test_resnet_with_stochastic_depth import batch, tiny_pair
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

from resnet_with_stochastic_depth import (
    BasicBlock,
    Bottleneck,
    StochasticResNet,
    add_stochastic_depth,
    set_step,
    stochastic_depth_gates,
)


def assert_same_gradients(model, twin):
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


# ---------------------------------------------------------------------------------- each residual block checkpointed


def checkpointed(model, impl):
    """`model` with every residual block wrapped by PyTorch's activation checkpointing."""
    is_block = lambda m: isinstance(m, (BasicBlock, Bottleneck))  # noqa: E731
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=impl)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=is_block)
    return model


@pytest.mark.parametrize("impl", [CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_activation_checkpointing_recomputes_with_the_same_decisions(mode, impl):
    _, model = tiny_pair(mode=mode, p_last=0.3, seed=3)
    twin = checkpointed(copy.deepcopy(model), impl)
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in twin.modules()) == 6
    # Reentrant checkpointing only recomputes when the block's input needs a gradient.
    x, y = batch(8)
    x.requires_grad_(impl == CheckpointImpl.REENTRANT)
    for _ in range(4):
        model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
        loss, twin_loss = F.cross_entropy(model(x), y), F.cross_entropy(twin(x), y)
        loss.backward(), twin_loss.backward()
        assert torch.equal(model.active_blocks, twin.active_blocks)
        assert torch.equal(loss, twin_loss)
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            assert a.grad is None or torch.equal(a.grad, b.grad), name
    assert not model.active_blocks.all()  # some blocks or samples were dropped


def test_activation_checkpointing_of_a_converted_torchvision_model():
    torch.manual_seed(0)
    model = add_stochastic_depth(torchvision.models.resnet18(num_classes=10), p_last=0.3, seed=5)
    twin = checkpointed(copy.deepcopy(model), CheckpointImpl.NO_REENTRANT)
    x, y = batch(4, size=32)
    for _ in range(3):
        model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        F.cross_entropy(twin(x), y).backward()
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            assert a.grad is None or torch.equal(a.grad, b.grad), name


# ---------------------------------------------------------------------------------- torchvision's and timm's blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_under_activation_checkpointing_equals_one_without(family):
    """Each converted block wrapped in torch.utils.checkpoint (non-reentrant): the recomputed
    forward makes the same draws, so output and gradients are the same (exactly)."""
    unconverted = build(family)
    plain = add_stochastic_depth(copy.deepcopy(unconverted), seed=7).train()
    checkpointed = add_stochastic_depth(copy.deepcopy(unconverted), seed=7).train()
    for block in converted_blocks(checkpointed):
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(block.forward)
    x, y = images(), torch.arange(8) % 10
    loss, loss_checkpointed = F.cross_entropy(plain(x), y), F.cross_entropy(checkpointed(x), y)
    loss.backward()
    loss_checkpointed.backward()
    assert torch.equal(loss, loss_checkpointed)
    assert [bool(g.last_active.any()) for g in stochastic_depth_gates(plain)] == [
        bool(g.last_active.any()) for g in stochastic_depth_gates(checkpointed)
    ]
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("family", ["timm ViT", "timm ConvNeXt", "timm ResNet basic"])
def test_timms_own_gradient_checkpointing_trains_alike(family):
    # timm's set_grad_checkpointing recomputes blocks in backward: the recomputation must make
    # the same draws, or the gradients belong to another network than the loss.
    unconverted = build(family)
    plain = add_stochastic_depth(copy.deepcopy(unconverted), seed=11).train()
    checkpointed = add_stochastic_depth(copy.deepcopy(unconverted), seed=11).train()
    checkpointed.set_grad_checkpointing(True)
    x, y = images(), torch.arange(8) % 10
    for _ in range(2):
        loss, other = F.cross_entropy(plain(x), y), F.cross_entropy(checkpointed(x), y)
        loss.backward()
        other.backward()
        assert torch.equal(loss, other)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


# ---------------------------------------------------------------------------------- the whole network in one region


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_checkpointing_the_whole_network_gives_the_gradients_of_the_same_step_without_it(mode, reentrant):
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.3, seed=3)
    twin = copy.deepcopy(model)
    x, y = batch(8, size=8)
    x.requires_grad_(reentrant)  # reentrant checkpointing only recomputes when an input needs a gradient
    for _ in range(3):  # later passes too: a recomputation must not shift the drops that follow
        model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        twin_loss = F.cross_entropy(checkpoint(twin, x, use_reentrant=reentrant), y)
        loss.backward(), twin_loss.backward()
        assert torch.equal(loss, twin_loss) and torch.equal(model.active_blocks, twin.active_blocks)
        assert_same_gradients(model, twin)
    assert not model.active_blocks.all()


# ---------------------------------------------------------------------------------- two views, one backward


def checkpoint_each_block(model, reentrant):
    """Checkpoint every residual block on its own, as apply_activation_checkpointing does."""
    for block in [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]:
        forward = block.forward
        block.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=reentrant)
    return model


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_two_views_then_one_backward_with_per_block_checkpointing_are_exact(mode, reentrant):
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.3, seed=4)
    twin = checkpoint_each_block(copy.deepcopy(model), reentrant)
    (x1, y), (x2, _) = batch(8, size=8, seed=1), batch(8, size=8, seed=2)
    x1.requires_grad_(reentrant), x2.requires_grad_(reentrant)
    for _ in range(2):
        model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x1), y) + F.cross_entropy(model(x2), y)
        twin_loss = F.cross_entropy(twin(x1), y) + F.cross_entropy(twin(x2), y)
        loss.backward(), twin_loss.backward()
        assert torch.equal(loss, twin_loss)
        assert_same_gradients(model, twin)


def through_stem_and_blocks(model, x, checkpoint_blocks, reentrant=False):
    """`model`'s forward, with each block checkpointed when `checkpoint_blocks`."""
    h = model.relu(model.bn1(model.conv1(x)))
    for block in model.blocks:
        h = checkpoint(block, h, use_reentrant=reentrant) if checkpoint_blocks else block(h)
    return model.fc(torch.flatten(model.avgpool(h), 1))


def two_views_one_region(model, x1, x2, y, checkpointed, reentrant):
    run = (lambda x: checkpoint(model, x, use_reentrant=reentrant)) if checkpointed else model
    (F.cross_entropy(run(x1), y) + F.cross_entropy(run(x2), y)).backward()


def two_views_backward_twice(model, x1, x2, y, checkpointed, reentrant):
    loss = F.cross_entropy(through_stem_and_blocks(model, x1, checkpointed, reentrant), y)
    loss = loss + F.cross_entropy(through_stem_and_blocks(model, x2, checkpointed, reentrant), y)
    loss.backward(retain_graph=True)
    loss.backward()


def a_step_set_between_the_views(model, x1, x2, y, checkpointed, reentrant):
    set_step(model, 0)
    loss = F.cross_entropy(through_stem_and_blocks(model, x1, checkpointed, reentrant), y)
    set_step(model, 1)
    (loss + F.cross_entropy(through_stem_and_blocks(model, x2, checkpointed, reentrant), y)).backward()


def a_region_then_a_plain_pass(model, x1, x2, y, checkpointed, reentrant):
    loss = F.cross_entropy(checkpoint(model, x1, use_reentrant=reentrant) if checkpointed else model(x1), y)
    (loss + F.cross_entropy(model(x2), y)).backward()


def a_pass_without_gradients_then_a_region(model, x1, x2, y, checkpointed, reentrant):
    with torch.no_grad():  # e.g. torch.optim.swa_utils.update_bn, in training mode
        model(x2)
    F.cross_entropy(checkpoint(model, x1, use_reentrant=reentrant) if checkpointed else model(x1), y).backward()


def the_very_same_tensor_twice_through_one_block(model, x1, x2, y, checkpointed, reentrant):
    block = model.layer3[1]  # as in R-Drop: a block run twice on one tensor
    h = torch.randn(8, 64, 2, 2, generator=torch.Generator().manual_seed(3), requires_grad=True)
    run = (lambda t: checkpoint(block, t, use_reentrant=reentrant)) if checkpointed else block
    (run(h).square().sum() + run(h).sum()).backward()


@pytest.mark.parametrize("situation", [
    two_views_one_region, two_views_backward_twice, a_step_set_between_the_views, a_region_then_a_plain_pass,
    a_pass_without_gradients_then_a_region, the_very_same_tensor_twice_through_one_block,
], ids=lambda f: f.__name__)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_recomputations_find_their_pass_whatever_ran_in_between(situation, reentrant, mode):
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.3, seed=4)
    twin = copy.deepcopy(model)
    (x1, y), (x2, _) = batch(8, size=8, seed=1), batch(8, size=8, seed=2)
    x1.requires_grad_(reentrant), x2.requires_grad_(reentrant)
    for _ in range(2):
        model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
        situation(model, x1, x2, y, checkpointed=False, reentrant=reentrant)
        situation(twin, x1, x2, y, checkpointed=True, reentrant=reentrant)
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            # (reentrant checkpointing sums two backwards' gradients in another order: rounding only)
            assert a.grad is None or torch.allclose(a.grad, b.grad, rtol=0, atol=1e-6), name


def test_a_recomputation_without_the_rng_state_restored_says_so():
    model = StochasticResNet.cifar(14, mode="row", seed=4)
    x, y = batch(8, size=8)
    loss = F.cross_entropy(checkpoint(model, x, use_reentrant=False, preserve_rng_state=False), y)
    with pytest.raises(RuntimeError, match="preserve_rng_state=True"):
        loss.backward()


def test_two_views_in_batch_mode_with_a_step_share_one_subnetwork_also_through_a_region():
    # With set_step, batch mode draws per step: both views of the step drop the same blocks,
    # so a region recomputed for either view is not ambiguous.
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, p_last=0.3, seed=4)
    twin = copy.deepcopy(model)
    (x1, y), (x2, _) = batch(8, size=8, seed=1), batch(8, size=8, seed=2)
    for step in range(3):
        set_step(model, step), set_step(twin, step)
        model.zero_grad(set_to_none=True), twin.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x1), y)
        first = model.active_blocks.clone()
        loss = loss + F.cross_entropy(model(x2), y)
        assert torch.equal(first, model.active_blocks)
        twin_loss = F.cross_entropy(checkpoint(twin, x1, use_reentrant=False), y)
        twin_loss = twin_loss + F.cross_entropy(checkpoint(twin, x2, use_reentrant=False), y)
        loss.backward(), twin_loss.backward()
        assert torch.equal(loss, twin_loss)
        assert_same_gradients(model, twin)
