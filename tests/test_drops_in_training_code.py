"""Drops in the training code people write: wrappers that call a model's layers, a detector fed a list
of images, TorchScript, tracing and export. Each situation comes from a public bug report against a
peer library or a PyTorch tool users apply to a model; each test compares with the right value
(frequencies, the same model without the feature), not only "no error". (Checkpointing and two views
before one backward are tested in test_checkpointing.py, compile, export and pickles of compiled
models in test_compile.py, DDP with uneven inputs in test_distributed.py, resuming the gates' state
in test_gate.py.)
"""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from test_resnet_with_stochastic_depth import batch, tiny_pair
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.feature_extraction import create_feature_extractor

from resnet_with_stochastic_depth import (
    BasicBlock,
    StochasticResNet,
    add_stochastic_depth,
    stochastic_depth_gates,
)


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


# ---------------------------------------------------------------------------------- TorchScript


def test_torchscript_says_to_export_instead():
    model = converted_resnet18().eval()
    with pytest.raises(TypeError, match=r"cannot be compiled by TorchScript.*torch\.export\.export"):
        torch.jit.script(model)
    torch.jit.script(torchvision.models.resnet18(num_classes=10).eval())  # the unconverted one scripts


# ---------------------------------------------------------------------------------- tracing and export


def test_torch_fx_trace_in_eval_mode_matches_eager():
    _, model = tiny_pair(p_last=0.3)
    x, y = batch(8)
    F.cross_entropy(model(x), y).backward()  # BatchNorm statistics away from their start
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    features = create_feature_extractor(model, return_nodes={"layer2": "mid", "fc": "logits"})
    features.eval()
    with torch.no_grad():
        out = features(x)
    assert out["mid"].shape == (8, 32, 4, 4) and torch.equal(out["logits"], model(x))


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_torch_fx_trace_in_training_mode_refuses_to_run_and_says_why(mode):
    _, model = tiny_pair(mode=mode)
    traced = torch.fx.symbolic_trace(model.train())
    message = r"traced by torch.fx in training mode, where a trace would freeze one draw.*model.eval\(\)"
    with pytest.raises(RuntimeError, match=message):
        traced(batch()[0])


@pytest.mark.parametrize("trace", ["jit.trace", "export"])
def test_tracing_or_exporting_in_training_mode_refuses_instead_of_freezing_a_draw(trace):
    model = StochasticResNet.cifar(14, seed=1).train()
    x, _ = images(2, size=8)
    with pytest.raises(Exception, match="in training mode, where the graph would freeze one draw"):
        if trace == "jit.trace":
            torch.jit.trace(model, x)
        else:
            torch.export.export(model, (x,))
