"""Drops in the training code people write: wrappers that call a model's layers, whole-network
checkpointing, several forward passes before one backward, compile and export, whole-model
pickles. Each situation comes from a public bug report against a peer library; each test
compares with the right value (frequencies, the same step without the feature), not only
"no error". (DDP with uneven inputs is tested in test_resnet_with_stochastic_depth.py.)
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.checkpoint import checkpoint
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from resnet_with_stochastic_depth import (
    BasicBlock,
    Bottleneck,
    StochasticResNet,
    add_stochastic_depth,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
)
from stochastic_depth.compilation import compile_branches


def images(n=4, size=32, seed=1, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(10, (n,), generator=g)


def assert_frequencies_match(gates, counts, passes):
    """Each gate kept its branch in about ``p * passes`` of `passes` passes (4.5 sigma)."""
    for gate, count in zip(gates, counts):
        p = gate.survival_prob
        assert abs(count - passes * p) <= 4.5 * math.sqrt(passes * p * (1 - p)) + 1e-9, (count, p)


def count_kept(gates, run, passes):
    counts = [0] * len(gates)
    with torch.no_grad():
        for _ in range(passes):
            run()
            for i, gate in enumerate(gates):
                counts[i] += int(gate.last_active)
    return counts


def converted_resnet18(p_last=0.3, seed=0, **kwargs):
    torch.manual_seed(0)
    return add_stochastic_depth(torchvision.models.resnet18(num_classes=10), p_last=p_last, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("wrapper", ["BackboneWithFPN", "IntermediateLayerGetter", "children[:-2]"])
def test_wrappers_that_call_the_layers_get_drops_at_the_survival_rates(wrapper):
    model = converted_resnet18()
    assert len(list(model.children())) == 10  # nothing added: children()[:-2] still ends at layer4
    if wrapper == "BackboneWithFPN":
        net = BackboneWithFPN(model, {"layer2": "0", "layer4": "1"}, [128, 512], out_channels=16)
    elif wrapper == "IntermediateLayerGetter":
        net = IntermediateLayerGetter(model, {"layer3": "c3", "layer4": "c4"})
    else:
        net = torch.nn.Sequential(*list(model.children())[:-2])
        assert isinstance(net[-1][-1], BasicBlock)
    gates = stochastic_depth_gates(net)
    assert len(gates) == 8
    x, _ = images(2)
    assert_frequencies_match(gates, count_kept(gates, lambda: net(x), 300), 300)


def test_converting_a_container_backbone_adds_no_child_it_would_call():
    backbone = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=2).backbone
    children = [name for name, _ in backbone.named_children()]
    add_stochastic_depth(backbone, p_last=0.5, seed=3)
    assert [name for name, _ in backbone.named_children()] == children
    x, _ = images(2, size=32)
    out = backbone(x)["out"]
    F.mse_loss(out, torch.zeros_like(out)).backward()
    assert out.shape == (2, 2048, 4, 4)
    gates = stochastic_depth_gates(backbone)
    assert len(gates) == 16 and all(gate.last_active is not None for gate in gates)


def test_a_single_block_on_its_own_gets_fresh_decisions_each_pass():
    model = converted_resnet18(p_last=0.5)
    block = model.layer4[1]
    x = torch.randn(2, 512, 2, 2)
    gate = block.stochastic_depth
    assert_frequencies_match([gate], count_kept([gate], lambda: block(x), 400), 400)


def test_a_detector_fed_a_list_of_images_draws_for_its_batch_in_row_subset_mode():
    torch.manual_seed(0)
    detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=96
    )
    add_stochastic_depth(detector, p_last=0.5, mode="row_subset", seed=1)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    losses = detector([torch.rand(3, 64, 80), torch.rand(3, 72, 64)], targets)
    sum(losses.values()).backward()
    gates = stochastic_depth_gates(detector)
    assert len(gates) == 16
    for gate in gates:  # each drew for the 2 images it got: k = round(2 p) of them kept
        assert gate.last_active.shape == (2,)
        assert int(gate.last_active.sum()) == max(1, math.floor(2 * gate.survival_prob + 0.5))


# ---------------------------------------------------------------------------------- whole-network checkpointing


def assert_same_gradients(model, twin):
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_checkpointing_the_whole_network_gives_the_gradients_of_the_same_step_without_it(mode, reentrant):
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.3, seed=3)
    twin = copy.deepcopy(model)
    x, y = images(8, size=8)
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
    (x1, y), (x2, _) = images(8, size=8, seed=1), images(8, size=8, seed=2)
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
    (x1, y), (x2, _) = images(8, size=8, seed=1), images(8, size=8, seed=2)
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
    x, y = images(8, size=8)
    loss = F.cross_entropy(checkpoint(model, x, use_reentrant=False, preserve_rng_state=False), y)
    with pytest.raises(RuntimeError, match="preserve_rng_state=True"):
        loss.backward()


def test_two_views_in_batch_mode_with_a_step_share_one_subnetwork_also_through_a_region():
    # With set_step, batch mode draws per step: both views of the step drop the same blocks,
    # so a region recomputed for either view is not ambiguous.
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, p_last=0.3, seed=4)
    twin = copy.deepcopy(model)
    (x1, y), (x2, _) = images(8, size=8, seed=1), images(8, size=8, seed=2)
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


# ---------------------------------------------------------------------------------- eval: compile and export


@pytest.mark.parametrize("make", [lambda: StochasticResNet.cifar(20, seed=0), lambda: converted_resnet18()],
                         ids=["StochasticResNet", "converted-resnet18"])
def test_an_eval_model_compiles_as_one_graph_and_exports(make):
    model = make()
    x, y = images(4, size=16)
    F.cross_entropy(model(x), y).backward()  # a training pass first: BatchNorm statistics moved
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        exported = torch.export.export(model, (x,)).module()(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- whole-model pickles


def test_a_compiled_branches_model_pickles_whole_and_deep_copies():
    model = compile_branches(StochasticResNet.cifar(14, mode="row_subset", seed=2), backend="eager")
    x, _ = images(8, size=8)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        # Compiled with the same options (found in this process's regions), with the same seed and
        # pass counts: the same steps as an eager twin.
        assert all(gate.compile_options == {"backend": "eager"} for gate in stochastic_depth_gates(twin))
        eager = StochasticResNet.cifar(14, mode="row_subset", seed=2)
        eager.load_state_dict(model.state_dict())
        for _ in range(2):
            assert torch.equal(twin(x), eager(x)) and torch.equal(twin.active_blocks, eager.active_blocks)
        twin.eval(), eager.eval()
        assert torch.equal(twin(x), eager(x))


# ---------------------------------------------------------------------------------- TorchScript


def test_torchscript_says_to_export_instead():
    model = converted_resnet18().eval()
    with pytest.raises(TypeError, match=r"cannot be compiled by TorchScript.*torch\.export\.export"):
        torch.jit.script(model)
    torch.jit.script(torchvision.models.resnet18(num_classes=10).eval())  # the unconverted one scripts


# ---------------------------------------------------------------------------------- resuming, tracing, bad values


def test_the_state_of_several_converted_subnetworks_resumes_each_exactly():
    def two_backbones():
        torch.manual_seed(0)
        net = torch.nn.ModuleDict({"a": torchvision.models.resnet18(num_classes=10),
                                   "b": torchvision.models.resnet18(num_classes=10)})
        add_stochastic_depth(net["a"], p_last=0.5)  # each conversion draws a seed of its own
        add_stochastic_depth(net["b"], p_last=0.5)
        return net

    net, resumed = two_backbones(), two_backbones()
    x, _ = images(2)
    with torch.no_grad():
        for _ in range(3):
            net["a"](x), net["b"](x)
    resumed.load_state_dict(net.state_dict())
    stochastic_depth_state(resumed).set_state(stochastic_depth_state(net).get_state())
    for _ in range(10):
        with torch.no_grad():
            for name in ("a", "b"):
                net[name](x), resumed[name](x)
                assert [bool(g.last_active) for g in stochastic_depth_gates(net[name])] == \
                    [bool(g.last_active) for g in stochastic_depth_gates(resumed[name])]


def test_a_state_with_a_bad_value_is_refused_and_changes_nothing():
    model = StochasticResNet.cifar(14, seed=1)
    state = stochastic_depth_state(model)
    before = state.get_state()
    for name, bad, message in [("step", ["abc"] * 6, "step"), ("seed", [2**64] * 6, "seed"),
                               ("passes", [-1] * 6, "passes"), ("drop_scale", [2.0] * 6, "drop_scale")]:
        with pytest.raises(ValueError, match=message):
            state.set_state({**before, name: bad})
        assert state.get_state() == before
    with pytest.raises(ValueError, match="another version"):
        state.set_state({"generator": torch.ByteTensor(8), "drop_scale": 1.0})


def test_set_step_takes_integers_of_any_kind_and_refuses_the_rest():
    import numpy as np

    model = StochasticResNet.cifar(14, seed=1)
    set_step(model, np.int64(3), 4)
    assert all(gate.step == (3, 4) for gate in stochastic_depth_gates(model))
    for bad in [(2**63,), (1.5,), ("1",), (True,), ()]:
        with pytest.raises(ValueError, match="step"):
            set_step(model, *bad)


@pytest.mark.parametrize("trace", ["jit.trace", "export"])
def test_tracing_or_exporting_in_training_mode_refuses_instead_of_freezing_a_draw(trace):
    model = StochasticResNet.cifar(14, seed=1).train()
    x, _ = images(2, size=8)
    with pytest.raises(Exception, match="in training mode, where the graph would freeze one draw"):
        if trace == "jit.trace":
            torch.jit.trace(model, x)
        else:
            torch.export.export(model, (x,))
