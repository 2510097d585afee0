"""evaluation_network.py: depth chosen at test time (keep_blocks, for every converted family) and
BatchNorm statistics of the evaluation network (recompute_batchnorm_statistics), against hand-built
references."""

import copy

import pytest
import torch
import torchvision
from test_library_blocks import build, images
from torch import nn

from resnet_with_stochastic_depth import (
    ResNet,
    StochasticResNet,
    add_stochastic_depth,
    stochastic_depth_gates,
    stochastic_depth_state,
)
from stochastic_depth.distributed import branch_modules
from stochastic_depth.evaluation_network import (
    depth_units,
    evaluation_mode,
    keep_blocks,
    recompute_batchnorm_statistics,
    residual_blocks,
)
from stochastic_depth.library_blocks import converted_class


class ShortcutOnly(nn.Module):
    """A block built without its residual branch: ``relu(shortcut(x))``."""

    def __init__(self, downsample):
        super().__init__()
        self.downsample = downsample

    def forward(self, x):
        return torch.relu(x if self.downsample is None else self.downsample(x))


def without_branch(model, index):
    """A copy of `model` whose block `index` is replaced by its shortcut alone."""
    reference = copy.deepcopy(model)
    target = residual_blocks(reference)[index]
    for parent in reference.modules():
        for name, child in parent.named_children():
            if child is target:
                setattr(parent, name, ShortcutOnly(target.downsample))
    return reference


def trained_like(model, seed=0):
    """Give the BatchNorm layers non-trivial statistics and affine parameters, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def models():
    torch.manual_seed(0)
    stochastic = trained_like(StochasticResNet.cifar(20, in_channels=1, num_classes=10, p_last=0.5, seed=0))
    torch.manual_seed(0)
    plain = trained_like(ResNet.cifar(20, in_channels=1, num_classes=10))
    torch.manual_seed(0)
    converted = trained_like(add_stochastic_depth(torchvision.models.resnet18(num_classes=10), p_last=0.5, seed=0))
    return {"stochastic": (stochastic, 1), "plain": (plain, 1), "torchvision": (converted, 3)}


@pytest.mark.parametrize("kind", ["stochastic", "plain", "torchvision"])
def test_keeping_every_block_is_the_eval_output_and_removing_one_is_the_network_without_its_branch(kind):
    model, channels = models()[kind]
    x = torch.randn(4, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    expected = model(x)
    n = len(residual_blocks(model))
    model.train()
    with keep_blocks(model, range(n)) as inside:
        assert inside is model and not model.training
        assert torch.equal(model(x), expected)
    assert model.training and all(m.training for m in model.modules())
    # Block 3 (identity shortcut) and the first block of the second stage (downsampling shortcut).
    downsampling = next(i for i, b in enumerate(residual_blocks(model)) if b.downsample is not None)
    for removed in (3, downsampling):
        reference = without_branch(model, removed).eval()
        with keep_blocks(model, [i for i in range(n) if i != removed]):
            out = model(x)
        assert torch.equal(out, reference(x)), removed
        assert not torch.equal(out, expected)
    # Two removed at once: the reference without both branches.
    reference = without_branch(without_branch(model, 5), 1).eval()
    with keep_blocks(model, [i for i in range(n) if i not in (1, 5)]):
        assert torch.equal(model(x), reference(x))


def test_blocks_are_restored_exactly_and_the_model_trains_as_before():
    (stochastic, _), (plain, _) = models()["stochastic"], models()["plain"]
    gates = [b.stochastic_depth for b in residual_blocks(stochastic)]
    plain_repr, plain_keys = repr(plain), list(plain.state_dict())
    for model in (stochastic, plain):
        with keep_blocks(model, [0, 2]):
            pass
        with pytest.raises(RuntimeError, match="inside"), keep_blocks(model, [1]):
            raise RuntimeError("an error inside")
    assert [b.stochastic_depth for b in residual_blocks(stochastic)] == gates
    assert all(b.stochastic_depth is None and "stochastic_depth" not in b._modules for b in residual_blocks(plain))
    assert repr(plain) == plain_repr and list(plain.state_dict()) == plain_keys


def test_unscaled_keeps_study_py_s_training_draw_sub_networks():
    model, _ = models()["stochastic"]
    trained = model.survival_probabilities
    with keep_blocks(model, [0, 2], unscaled=True):
        assert model.survival_probabilities[:3] == [1.0, 0.0, 1.0] and set(model.survival_probabilities[3:]) == {0.0}
    assert model.survival_probabilities == trained


@pytest.mark.parametrize("keep", [[9], [-1], [1.0], [True]])
def test_bad_block_indices_are_refused_naming_them(keep):
    model, _ = models()["plain"]  # 9 blocks
    with pytest.raises(ValueError, match=r"in \[0, 9\), got " + repr(keep[0]).replace(".", r"\.")):
        with keep_blocks(model, keep):
            pass


def test_torchvision_blocks_must_be_converted_first():
    with pytest.raises(TypeError, match="add_stochastic_depth"):
        residual_blocks(torchvision.models.resnet18())
    with pytest.raises(TypeError, match="no residual blocks"):
        residual_blocks(nn.Sequential(nn.Conv2d(1, 1, 3)))


# ---------------------------------------------------------------------------------- every converted family


def _zeroed_reference(unconverted, removed_blocks):
    """The unconverted model with the residual branches of `removed_blocks` (their indices among its
    convertible blocks) set to zero: a forward hook on each block's drop-path modules."""
    blocks = [m for m in unconverted.modules() if converted_class(type(m)) is not None]
    handles = []
    for index in removed_blocks:
        kind = converted_class(type(blocks[index]))
        for attribute in kind.DROP_PATHS:
            handles.append(getattr(blocks[index], attribute).register_forward_hook(lambda m, args, out: torch.zeros_like(out)))
    return handles


@pytest.mark.parametrize("family", ["torchvision ConvNeXt", "torchvision Swin", "timm ViT", "timm ConvNeXt",
                                    "transformers DINOv2", "transformers Swin"])
def test_keep_blocks_on_every_converted_family(family):
    unconverted = build(family).eval()
    model = add_stochastic_depth(copy.deepcopy(unconverted))
    x = images()
    units = depth_units(model)
    with torch.no_grad():
        evaluation = model.eval()(x)
        with keep_blocks(model, range(len(units))):
            assert torch.equal(model(x), evaluation)  # every block kept: the evaluation output, bit for bit
        calls = []
        for removed in ([len(units) - 1], list(range(1, len(units), 2))):  # the last block; every other one
            hooks = [module.register_forward_pre_hook(lambda m, args: calls.append(m))
                     for index in removed for block, gate in units[index]
                     for module in branch_modules(block)[gate]]
            with keep_blocks(model, [i for i in range(len(units)) if i not in removed]):
                out = model(x)
            for h in hooks:
                h.remove()
            assert calls == []  # the removed branches' modules do not run
            handles = _zeroed_reference(unconverted, removed)
            torch.testing.assert_close(out, unconverted(x), atol=1e-6, rtol=1e-6)
            for h in handles:
                h.remove()
        assert torch.equal(model(x), evaluation)  # restored
    assert all(gate.training is False for gate in stochastic_depth_gates(model))


def test_keep_blocks_numbers_a_transformers_gates_one_by_one_on_request():
    model = add_stochastic_depth(build("timm ViT")).eval()
    assert len(depth_units(model, "gate")) == 2 * len(depth_units(model)) == len(stochastic_depth_gates(model))
    x = images()
    with torch.no_grad():
        with keep_blocks(model, [i for i in range(8) if i != 7], by="gate"):  # the last block's MLP branch removed
            without_mlp = model(x)
        block = depth_units(model)[-1][0][0]
        with keep_blocks(model, range(4)):
            block.register_forward_hook(lambda m, args, out: args[0] + block.ls1(block.attn(block.norm1(args[0]))))
            reference = model(x)
    torch.testing.assert_close(without_mlp, reference, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------- BatchNorm


def input_of(model, layer, x):
    """What `layer` receives when the model evaluates `x` (a forward pre-hook)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().double()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_batchnorm_statistics_are_those_of_the_evaluation_network_and_training_is_untouched():
    torch.manual_seed(0)
    model, _ = models()["stochastic"]
    twin, _ = models()["stochastic"]  # same weights, statistics and seed of the draws
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    layer = residual_blocks(model)[-1].bn2  # the last block's: every block before it runs, scaled by p_l
    old_mean = layer.running_mean.clone()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    tracked = [m.num_batches_tracked.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    drop_state = stochastic_depth_state(model).get_state()
    model.train()
    assert recompute_batchnorm_statistics(model, x) is model

    # By hand: the layer's input in the evaluation network that uses the new statistics, per channel.
    inputs = input_of(model, layer, x)
    values = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
    mean = values.sum(1) / values.shape[1]
    var = (values - mean[:, None]).square().sum(1) / (values.shape[1] - 1)
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(layer.running_mean, old_mean)
    # The first layer's statistics are those of conv1(x) alone.
    first = model.conv1(x).detach().double()
    torch.testing.assert_close(model.bn1.running_mean.double(), first.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)

    # Weights, counters, modes and the state of the draws are untouched.
    for name, value in model.named_parameters():
        assert torch.equal(value, weights[name]), name
    assert all(torch.equal(a, m.num_batches_tracked) for a, m in
               zip(tracked, (m for m in model.modules() if isinstance(m, nn.BatchNorm2d))))  # fmt: skip
    assert stochastic_depth_state(model).get_state() == drop_state
    # Training mode (batch statistics, sampled sub-networks) gives what it gave before.
    model.train(), twin.train()
    for _ in range(3):
        assert torch.equal(model(x), twin(x))
        assert torch.equal(model.active_blocks, twin.active_blocks)


def test_batchnorm_statistics_over_batches_of_a_loader_pool_every_image():
    model, _ = models()["plain"]
    x = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64)), batch_size=16)
    recompute_batchnorm_statistics(model, loader)
    # The first layer's input does not depend on other layers: exact over the 64 images.
    first = model.conv1(x).detach().double()
    torch.testing.assert_close(model.bn1.running_mean.double(), first.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn1.running_var.double(), first.var((0, 2, 3)), rtol=1e-5, atol=1e-6)
    # Deeper layers: close to the one-batch (exact) statistics.
    exact, _ = models()["plain"]
    recompute_batchnorm_statistics(exact, x)
    layer, exact_layer = residual_blocks(model)[-1].bn2, residual_blocks(exact)[-1].bn2
    torch.testing.assert_close(layer.running_var, exact_layer.running_var, rtol=0.2, atol=0.05)


def test_bad_batchnorm_inputs_are_refused_naming_them():
    model, _ = models()["plain"]
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match="got shape \\(0, 1, 16, 16\\)"):
        recompute_batchnorm_statistics(model, torch.zeros(0, 1, 16, 16))
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        recompute_batchnorm_statistics(model, torch.zeros(4, 1, 16, 16), batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        recompute_batchnorm_statistics(model, [])
    with pytest.raises(ValueError, match="expected a 4-D input"):  # fails inside the pass: statistics restored
        recompute_batchnorm_statistics(model, [torch.zeros(4, 1, 16, 16), torch.zeros(4, 3, 16, 16)])
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        recompute_batchnorm_statistics(nn.Sequential(nn.Conv2d(1, 1, 3)), torch.zeros(2, 1, 4, 4))


def test_evaluation_mode_gives_each_module_its_own_mode_back_even_after_an_error():
    model = StochasticResNet.cifar(14, seed=0).train()
    frozen = model.bn1.eval()  # a user's frozen BatchNorm inside a model in training mode
    before = {name: m.training for name, m in model.named_modules()}
    with evaluation_mode(model) as same:
        assert same is model and not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == before and not frozen.training
    with pytest.raises(RuntimeError, match="inside"):
        with evaluation_mode(model):
            raise RuntimeError("inside")
    assert {name: m.training for name, m in model.named_modules()} == before
