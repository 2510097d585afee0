"""The model file: ResNet and StochasticResNet built as He et al. and the paper build them (depths,
parameter counts, shortcuts), the same weights and state_dict keys as ResNet, add_stochastic_depth on
torchvision's ResNets, and a deep copy that draws what the original draws.

Its builders (``tiny_pair``, ``batch``, ``active_sequence``) serve the other test files too."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from resnet_with_stochastic_depth import (
    AvgPoolZeroPad,
    Bottleneck,
    ResNet,
    StochasticResNet,
    add_stochastic_depth,
    draw_decision,
    key_seed,
    stochastic_depth_gates,
    stochastic_depth_state,
    survival_probabilities,
)


def tiny_pair(seed=0, **stochastic_kwargs):
    """A CIFAR ResNet-14 (L = 6 blocks, one option-A shortcut per later stage) and its stochastic twin."""
    torch.manual_seed(seed)
    plain = ResNet.cifar(14)
    torch.manual_seed(seed)
    stochastic = StochasticResNet.cifar(14, **stochastic_kwargs)
    return plain, stochastic


def batch(n=4, channels=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(10, (n,), generator=g)


def active_sequence(model, x, passes):
    """``model.active_blocks`` after each of ``passes`` training-mode forward passes, stacked."""
    rows = []
    with torch.no_grad():
        for _ in range(passes):
            model(x)
            rows.append(model.active_blocks)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------- construction


def test_bad_depths_and_stems_are_rejected():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet.cifar(15)
    with pytest.raises(ValueError, match="depth 42"):
        ResNet.imagenet(42)
    with pytest.raises(ValueError, match="stem 'vit'"):
        ResNet(Bottleneck, [1], widths=[8], stem="vit")


@pytest.mark.parametrize(
    "shape, message",
    [((2, 1, 8, 8), r"\(batch, 3, height, width\), got shape \(2, 1, 8, 8\)"), ((3, 8, 8), r"got shape \(3, 8, 8\)")],
)
def test_wrong_input_says_what_was_expected_and_what_came(shape, message):
    with pytest.raises(ValueError, match=message):
        StochasticResNet.cifar(14)(torch.zeros(shape))


# ---------------------------------------------------------------------------------- the paper's CIFAR networks


@pytest.mark.parametrize("depth, expected", [(20, 269_722), (110, 1_727_962)])
def test_cifar_resnets_have_he_et_als_parameter_counts(depth, expected):
    count = sum(p.numel() for p in ResNet.cifar(depth).parameters())
    assert count == expected
    assert sum(p.numel() for p in StochasticResNet.cifar(depth).parameters()) == expected
    # The two projections (conv 1x1 and BatchNorm) of option B add 16*32 + 2*32 + 32*64 + 2*64 parameters.
    assert sum(p.numel() for p in ResNet.cifar(depth, shortcut="projection").parameters()) == expected + 2752


def test_option_a_shortcut_pools_two_by_two_and_appends_zero_channels():
    shortcut = AvgPoolZeroPad(2, 5, stride=2)
    assert list(shortcut.parameters()) == [] and list(shortcut.buffers()) == []
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    out = shortcut(x)
    assert out.shape == (2, 5, 2, 2)
    # Top-left window of sample 0, channel 0: pixels 0, 1, 4, 5.
    assert out[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4
    torch.testing.assert_close(out[:, :2], F.avg_pool2d(x, 2))
    assert not out[:, 2:].any()
    with pytest.raises(ValueError, match="32 -> 16"):
        AvgPoolZeroPad(32, 16, 2)


def test_every_block_of_resnet110_is_gated_and_a_dropped_downsampling_block_is_relu_of_its_shortcut():
    model = StochasticResNet.cifar(110, seed=0)
    assert len(stochastic_depth_gates(model)) == 54
    assert all(block.stochastic_depth is not None for block in model.blocks)
    downsampling = [block for block in model.blocks if block.downsample is not None]
    assert len(downsampling) == 2 and all(isinstance(b.downsample, AvgPoolZeroPad) for b in downsampling)
    seen, calls = [], []
    for block in downsampling:
        block.stochastic_depth.survival_prob = 0.0  # always dropped
        block.conv1.register_forward_hook(lambda *_: calls.append(1))
        block.register_forward_hook(lambda block, inputs, out: seen.append((block, inputs[0].clone(), out.clone())))
    model(torch.randn(3, 3, 16, 16))
    assert calls == [] and len(seen) == 2
    for block, x, out in seen:
        torch.testing.assert_close(out, F.relu(block.downsample(x)), atol=0, rtol=0)
        assert out.shape == (3, block.conv1.out_channels, x.shape[2] // 2, x.shape[3] // 2)


def test_projection_shortcuts_remain_an_option():
    model = StochasticResNet.cifar(20, shortcut="projection")
    assert isinstance(model.layer2[0].downsample, torch.nn.Sequential)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut 'B'"):
        ResNet.cifar(20, shortcut="B")


# ---------------------------------------------------------------------------------- same model as ResNet


def test_plain_and_stochastic_share_weights_and_state_dict_keys():
    plain, stochastic = tiny_pair(seed=3)
    assert plain.state_dict().keys() == stochastic.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, stochastic.state_dict()[key])
    stochastic.load_state_dict(ResNet.cifar(14).state_dict())
    plain.load_state_dict(stochastic.state_dict())


def test_all_survival_probabilities_one_is_exactly_resnet():
    plain, stochastic = tiny_pair(survival_rule=[1.0] * 6)
    x, y = batch(8)
    outputs = [m(x) for m in (plain, stochastic)]
    assert torch.equal(*outputs)
    for out in outputs:
        F.cross_entropy(out, y).backward()
    for (name, a), b in zip(plain.named_parameters(), stochastic.parameters()):
        assert torch.equal(a.grad, b.grad), name
    plain.eval(), stochastic.eval()
    assert torch.equal(plain(x), stochastic(x))


def test_torchvision_resnet50_weights_load_into_resnet50():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet50(num_classes=10).eval()
    ours = ResNet.imagenet(50, num_classes=10).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- add_stochastic_depth on torchvision's ResNets


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.resnet50])
def test_add_stochastic_depth_to_torchvision_keeps_weights_and_outputs(factory):
    torch.manual_seed(0)
    original = factory(num_classes=10).eval()
    converted = add_stochastic_depth(copy.deepcopy(original), p_last=1.0)
    assert type(converted) is type(original)
    assert converted.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(converted(x), original(x))


def test_converted_torchvision_model_trains_with_dropped_blocks():
    torch.manual_seed(0)
    model = add_stochastic_depth(torchvision.models.resnet18(num_classes=10), p_last=0.5, seed=0)
    gates = stochastic_depth_gates(model)
    assert len(gates) == 8 and gates[-1].survival_prob == 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch(16, size=32)
    losses, dropped = [], 0
    for _ in range(15):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        dropped += sum(not g.last_active for g in gates)
    assert dropped > 0
    assert losses[-1] < 0.5 * losses[0]


def test_add_stochastic_depth_with_a_bad_argument_leaves_the_model_as_it_was():
    model = torchvision.models.resnet18(num_classes=10)
    before = {name: type(m) for name, m in model.named_modules()}
    for kwargs in (dict(mode="rows"), dict(p_last=2.0)):
        with pytest.raises(ValueError):
            add_stochastic_depth(model, **kwargs)
        assert {name: type(m) for name, m in model.named_modules()} == before
        assert not stochastic_depth_gates(model)


def test_converted_torchvision_model_draws_like_stochastic_resnet_and_adds_nothing_else():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    children = [name for name, _ in model.named_children()]
    add_stochastic_depth(model, p_last=0.5, seed=0)
    add_stochastic_depth(model, p_last=0.5, seed=0)  # again: the gates replaced, the same draws
    assert [name for name, _ in model.named_children()] == children
    assert not model._forward_pre_hooks and not model._forward_hooks
    x, _ = batch(2, size=32)
    with torch.no_grad():
        model(x)
    decisions = [bool(gate.last_active) for gate in stochastic_depth_gates(model)]
    # Pass 0 of gate i: the key (seed, index, pass) with no step.
    expected = [
        bool(draw_decision("batch", p, 2, key_seed(0, 0, i, 0)).active)
        for i, p in enumerate(survival_probabilities(8, "linear", 0.5))
    ]
    assert decisions == expected


def test_add_stochastic_depth_rejects_a_model_without_residual_blocks():
    with pytest.raises(TypeError, match="no residual blocks"):
        add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------- copies


def test_deepcopy_and_state_round_trip():
    _, model = tiny_pair()
    x, _ = batch(2, size=4)
    active_sequence(model, x, 3)
    clone = copy.deepcopy(model)  # an EMA copy: the same seed and counts, so the same next draws
    state = stochastic_depth_state(model).get_state()
    first = active_sequence(model, x, 20)
    assert torch.equal(active_sequence(clone, x, 20), first)
    stochastic_depth_state(model).set_state(state)
    assert torch.equal(active_sequence(model, x, 20), first)
