"""Tests of the stochastic-depth ResNets against the paper's rules and hand-built references."""

import copy
import functools
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
import torchvision
from test_library_blocks import channels_last
from torch._dynamo.utils import counters
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torchvision.models.feature_extraction import create_feature_extractor

from resnet_with_stochastic_depth import (
    AvgPoolZeroPad,
    BasicBlock,
    Bottleneck,
    ResNet,
    StochasticDepth,
    StochasticResNet,
    add_stochastic_depth,
    draw_decision,
    key_seed,
    linear_drop_warmup,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
    survival_probabilities,
)
from stochastic_depth.compilation import compile_branches


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


def branch_batch_sizes(model):
    """A list that fills, as `model` runs, with the batch size each residual branch ran on."""
    seen = []
    for block in model.blocks:
        block.conv1.register_forward_hook(lambda module, inputs, out: seen.append(len(inputs[0])))
    return seen


def binomial_bound(n, p, sigmas=4.5):
    """Largest deviation of a Binomial(n, p) count from n * p that we accept.

    4.5 standard deviations: a correct implementation fails with probability < 1e-5
    per block; the seeds are fixed, so each test is deterministic anyway.
    """
    return sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


# ---------------------------------------------------------------------------------- probabilities


def test_linear_rule_is_the_papers_formula():
    probs = survival_probabilities(4, "linear", p_last=0.5)
    assert probs == pytest.approx([1 - 0.125, 1 - 0.25, 1 - 0.375, 0.5])


def test_resnet110_keeps_about_40_of_54_blocks():
    model = StochasticResNet.cifar(110)
    assert len(model.survival_probabilities) == 54
    assert model.survival_probabilities[-1] == pytest.approx(0.5)
    assert model.expected_active_blocks == pytest.approx(54 - 0.5 * 55 / 2)  # 40.25


def test_uniform_and_explicit_rules():
    assert survival_probabilities(3, "uniform", p_last=0.8) == [0.8, 0.8, 0.8]
    assert survival_probabilities(2, [0.3, 1]) == [0.3, 1.0]
    model = StochasticResNet.cifar(14, survival_rule=[1, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert model.survival_probabilities == pytest.approx([1, 0.9, 0.8, 0.7, 0.6, 0.5])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(p_last=1.5), "1.5"),
        (dict(p_last=-0.1), "-0.1"),
        (dict(p_last=float("nan")), "nan"),
        (dict(survival_rule="cosine"), "cosine"),
        (dict(survival_rule=[0.5] * 5), "expected 6 survival probabilities"),
        (dict(survival_rule=[1, 1, 1, 2, 1, 1]), "block 3"),
        (dict(mode="column"), "column"),
    ],
)
def test_bad_arguments_name_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StochasticResNet.cifar(14, **kwargs)


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


# ---------------------------------------------------------------------------------- drop statistics


@pytest.mark.parametrize(
    "rule",
    ["linear", "uniform", [0.95, 0.2, 0.6, 1.0, 0.0, 0.35]],
    ids=["linear", "uniform", "explicit"],
)
def test_block_drop_frequencies_match_survival_probabilities(rule):
    model = StochasticResNet.cifar(14, survival_rule=rule, p_last=0.5, seed=2016)
    x, _ = batch(2, size=4)
    passes = 2000
    kept = active_sequence(model, x, passes).sum(0)
    for count, p in zip(kept.tolist(), model.survival_probabilities):
        assert abs(count - passes * p) <= binomial_bound(passes, p), (count, p)


def test_row_mode_drops_each_sample_independently():
    model = StochasticResNet.cifar(14, mode="row", seed=7)
    x, _ = batch(64, size=4)
    passes = 100
    active = active_sequence(model, x, passes)
    assert active.shape == (passes, 6, 64)
    kept = active.sum((0, 2))
    trials = passes * 64
    for count, p in zip(kept.tolist(), model.survival_probabilities):
        assert abs(count - trials * p) <= binomial_bound(trials, p), (count, p)


def test_same_seed_same_drops_other_seed_other_drops():
    def drop_sequence(seed):
        return active_sequence(StochasticResNet.cifar(14, seed=seed), batch(2, size=4)[0], 50)

    assert torch.equal(drop_sequence(1), drop_sequence(1))
    assert not torch.equal(drop_sequence(1), drop_sequence(2))


def test_global_seed_makes_the_default_seed_reproducible():
    _, a = tiny_pair(seed=5)
    _, b = tiny_pair(seed=5)
    _, c = tiny_pair(seed=6)
    assert a.seed == b.seed != c.seed


# ---------------------------------------------------------------------------------- dropped = not computed


def test_dropped_block_is_not_computed_and_gets_no_gradient_or_bn_update():
    model = StochasticResNet.cifar(14, p_last=0.2, seed=3)
    calls = {i: 0 for i in range(6)}
    for i, block in enumerate(model.blocks):
        block.conv1.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x, y = batch()
    seen_dropped = seen_kept = 0
    for _ in range(10):
        before = copy.deepcopy(model.state_dict())
        calls_before = dict(calls)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for i, (block, active) in enumerate(zip(model.blocks, model.active_blocks.tolist())):
            prefix = next(name for name, m in model.named_modules() if m is block)
            branch_params = [p for n, p in block.named_parameters() if not n.startswith("downsample")]
            bn_stats = [k for k in before if k.startswith(prefix + ".bn")]
            assert calls[i] - calls_before[i] == int(active)
            if active:
                seen_kept += 1
                assert all(p.grad is not None for p in branch_params)
                assert any(not torch.equal(before[k], model.state_dict()[k]) for k in bn_stats)
            else:
                seen_dropped += 1
                assert all(p.grad is None for p in branch_params)
                assert all(torch.equal(before[k], model.state_dict()[k]) for k in bn_stats)
            if block.downsample is not None:  # the projection shortcut always runs
                assert all(p.grad is not None for p in block.downsample.parameters())
    assert seen_dropped > 5 and seen_kept > 5


def test_row_mode_runs_the_branch_only_on_kept_samples():
    model = StochasticResNet.cifar(14, mode="row", p_last=0.3, seed=4)
    seen_batch_sizes = branch_batch_sizes(model)
    x, y = batch(32)
    F.cross_entropy(model(x), y).backward()
    expected = [int(n) for n in model.active_blocks.sum(1).tolist() if n > 0]
    assert seen_batch_sizes == expected
    assert sum(expected) < 6 * 32


def test_row_mode_output_matches_a_masked_reference():
    torch.manual_seed(0)
    gate = StochasticDepth(survival_prob=0.6, mode="row", seed=9)
    x = torch.randn(16, 3)
    weight = torch.randn(3, 3)
    out = gate(lambda t: t @ weight, x, shortcut=x)
    mask = gate.last_active.float().unsqueeze(1)
    torch.testing.assert_close(out, x + mask * (x @ weight))


def test_row_subset_keeps_exactly_k_samples_chosen_uniformly():
    model = StochasticResNet.cifar(14, mode="row_subset", p_last=0.3, seed=8)
    x, _ = batch(20, size=4)
    passes = 60
    active = active_sequence(model, x, passes)
    k = [max(1, math.floor(20 * p + 0.5)) for p in model.survival_probabilities]
    assert k == [18, 15, 13, 11, 8, 6]  # p_l = 0.883, 0.767, 0.65, 0.533, 0.417, 0.3
    assert active.sum(2).tolist() == [k] * passes  # exactly k samples every pass
    # Each sample is one of the k with probability k / 20; over 60 passes, 4.5 sigma.
    for block, k_l in enumerate(k):
        for count in active[:, block].sum(0).tolist():
            q = k_l / 20
            assert abs(count - passes * q) <= binomial_bound(passes, q), (block, count, k_l)


def test_row_subset_runs_every_branch_on_the_same_batch_size_every_pass():
    model = StochasticResNet.cifar(14, mode="row_subset", p_last=0.3, seed=4)
    seen = branch_batch_sizes(model)
    x, y = batch(32)
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
    k = [max(1, math.floor(32 * p + 0.5)) for p in model.survival_probabilities]
    assert seen == k * 3 and sum(k) < 6 * 32


@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_a_batch_passed_by_name_is_drawn_for_like_one_passed_by_position(mode):
    _, model = tiny_pair(mode=mode, p_last=0.5, seed=2)
    twin = copy.deepcopy(model)
    x, _ = batch(8)
    torch.testing.assert_close(twin(x=x), model(x))
    assert torch.equal(twin.active_blocks, model.active_blocks) and twin.active_blocks.shape == (6, 8)


@pytest.mark.parametrize("inverted", [False, True])
def test_row_subset_output_matches_a_rescaled_masked_reference(inverted):
    gate = StochasticDepth(survival_prob=0.6, mode="row_subset", inverted=inverted, seed=9)
    x = torch.randn(16, 3)
    weight = torch.randn(3, 3)
    out = gate(lambda t: t @ weight, x, shortcut=x)
    mask = gate.last_active.float().unsqueeze(1)
    assert mask.sum() == 10  # round(16 * 0.6)
    scale = 16 / 10 * (1 if inverted else 0.6)  # so that E[output] = x + 0.6 x W (x + x W inverted)
    torch.testing.assert_close(out, x + mask * scale * (x @ weight))


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_a_decision_is_a_function_of_its_seed_and_keys_hash_apart(mode):
    first, again = (draw_decision(mode, 0.5, 64, key_seed(3, 1, 7)) for _ in range(2))
    assert torch.equal(torch.as_tensor(first.active), torch.as_tensor(again.active))
    assert first.kept is None if mode == "batch" else torch.equal(first.kept, first.active.nonzero().squeeze(1))
    assert key_seed(3, 1, 7) != key_seed(3, 7, 1) and key_seed(1, 2) != key_seed(1, 2, 0)
    assert 0 <= key_seed(-1, 2**62) < 2**63
    # Seeds of neighbouring keys give unrelated draws: 400 keys, batch mode at p = 0.3.
    kept = sum(bool(draw_decision("batch", 0.3, 1, key_seed(5, i)).active) for i in range(400))
    assert abs(kept - 120) <= binomial_bound(400, 0.3)


def test_row_subset_chooses_every_k_subset_equally_often():
    # 6000 draws, each choosing k = 2 of B = 4 samples: the 6 subsets must be equally
    # likely (a tie between keys, or a biased shuffle, would favour some).
    decisions = [draw_decision("row_subset", 0.5, 4, key_seed(2, i)) for i in range(6000)]
    assert all(torch.equal(d.kept, d.active.nonzero().squeeze(1)) for d in decisions)  # ascending
    counts = {}
    for d in decisions:
        counts[tuple(d.kept.tolist())] = counts.get(tuple(d.kept.tolist()), 0) + 1
    assert len(counts) == 6 and sum(counts.values()) == 6000
    # Chi-square goodness of fit against uniform; fixed seed, so deterministic; a correct
    # draw fails at this level with probability 1e-4.
    assert scipy.stats.chisquare(list(counts.values())).pvalue > 1e-4


def test_survival_prob_is_keyword_only_so_it_cannot_be_read_as_torchvisions_drop_probability():
    with pytest.raises(TypeError):
        StochasticDepth(0.1, "row")
    assert StochasticDepth(survival_prob=0.1, mode="row").survival_prob == 0.1
    with pytest.raises(ValueError, match="'column'"):
        StochasticDepth(survival_prob=0.5, mode="column")


# ---------------------------------------------------------------------------------- evaluation


def reference_eval(model, x):
    """The paper's test rule written out by hand: relu(shortcut + p_l * branch) per block."""
    x = F.relu(model.bn1(model.conv1(x)))
    for block, p in zip(model.blocks, model.survival_probabilities):
        shortcut = x if block.downsample is None else block.downsample(x)
        residual = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        x = F.relu(shortcut + p * residual)
    return model.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_eval_matches_hand_built_reference_and_is_deterministic():
    _, model = tiny_pair(p_last=0.3)
    x, y = batch(8)
    for _ in range(3):  # move the BatchNorm statistics away from their initial values
        F.cross_entropy(model(x), y).backward()
    model.eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, reference_eval(model, x), atol=1e-5, rtol=0)
        assert torch.equal(out, model(x))
        assert model.active_blocks.all()


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
@pytest.mark.parametrize("inverted", [False, True])
def test_training_output_equals_test_output_in_expectation(inverted, mode):
    gate = StochasticDepth(survival_prob=0.3, mode=mode, inverted=inverted, seed=11)
    x = torch.tensor([[1.0, -2.0]] * 10)  # 10 samples: row_subset keeps k = 3 of them, scaled by 0.3 * 10 / 3
    residual = torch.tensor([[4.0, 8.0]] * 10)
    draws = 4000
    mean = sum(gate(lambda t: residual[: len(t)], x, x) for _ in range(draws)) / draws
    gate.eval()
    expected = gate(lambda _: residual, x, x)
    torch.testing.assert_close(expected, x + (residual if inverted else 0.3 * residual))
    # Per sample, the training output is x + B * c * residual with B ~ Bernoulli(0.3) and c = 1 / 0.3
    # (inverted) or 1: tolerance 4.5 sigma of the mean over the draws, per sample.
    scale = 1 / 0.3 if inverted else 1.0
    sigma = scale * residual.abs() * math.sqrt(0.3 * 0.7 / draws)
    assert ((mean - expected).abs() <= 4.5 * sigma).all()


def test_block_with_zero_survival_is_left_out_at_test_time_too():
    model = StochasticResNet.cifar(14, survival_rule=[1, 1, 1, 1, 1, 0]).eval()
    calls = []
    model.blocks[-1].conv1.register_forward_hook(lambda *_: calls.append(1))
    model(batch()[0])
    assert calls == [] and model.active_blocks.tolist() == [True] * 5 + [False]


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


# ---------------------------------------------------------------------------------- add_stochastic_depth


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


# ---------------------------------------------------------------------------------- PyTorch features


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


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_channels_last_gives_the_same_results(mode):
    _, model = tiny_pair(mode=mode, seed=0)
    twin = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = batch(8)
    out = model(x)
    out_cl = twin(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out_cl, out, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.active_blocks, twin.active_blocks)
    model.eval(), twin.eval()
    torch.testing.assert_close(twin(x.to(memory_format=torch.channels_last)), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_bfloat16_autocast_on_cpu(mode):
    _, model = tiny_pair(mode=mode, p_last=0.5)
    x, y = batch(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), model(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize(
    "device, backend",
    [
        ("cpu", "aot_eager"),  # inductor would compile for a minute on 2 cores
        pytest.param("cuda", "inductor", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
    ],
)
def test_torch_compile_matches_eager_in_train_and_eval(mode, device, backend):
    _, eager = tiny_pair(mode=mode, p_last=0.5, seed=21)
    eager.to(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend)
    x, y = (t.to(device) for t in batch(8))
    # Inductor fuses and reorders float32 arithmetic on the GPU; the CPU backend does not.
    tolerance = dict(atol=1e-5, rtol=1e-5) if device == "cpu" else dict(atol=1e-3, rtol=1e-3)
    for _ in range(3):
        out_eager, out_compiled = eager(x), compiled(x)
        assert torch.equal(eager.active_blocks, compiled_model.active_blocks)
        torch.testing.assert_close(out_compiled, out_eager, **tolerance)
        F.cross_entropy(out_eager, y).backward()
        F.cross_entropy(out_compiled, y).backward()
    for a, b in zip(eager.parameters(), compiled_model.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=100 * tolerance["atol"], rtol=100 * tolerance["rtol"])
    eager.eval(), compiled_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), **tolerance)


# ---------------------------------------------------------------------------------- PyTorch's tools


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_a_channels_last_network_stays_channels_last_in_every_mode(mode):
    # The row modes' gather and scatter-add would return NCHW tensors: every later convolution
    # would then run in the slower layout, silently.
    _, model = tiny_pair(mode=mode, p_last=0.5, seed=0)
    model.to(memory_format=torch.channels_last)
    layouts = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: layouts.append(channels_last(out)))
    F.cross_entropy(model(batch(8)[0].to(memory_format=torch.channels_last)), batch(8)[1]).backward()
    assert layouts == [True] * 6


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


@pytest.mark.parametrize("mode", ["batch", "row_subset"])
def test_compile_branches_matches_eager_in_train_and_eval(mode, assert_trains_alike):
    _, eager = tiny_pair(mode=mode, p_last=0.5, seed=21)
    compiled = compile_branches(copy.deepcopy(eager), backend="aot_eager")
    x, y = batch(8)
    assert_trains_alike(eager, compiled, x, y, atol=1e-5, grad_atol=1e-4)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


def test_compile_branches_compiles_each_kind_of_branch_once_whatever_the_depth():
    # A deeper network of the same stages has more blocks of the same kinds: no more graphs.
    x, y = batch(8)
    graphs = []
    for depth in (14, 26):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = compile_branches(StochasticResNet.cifar(depth, p_last=1.0, seed=0), backend="eager")
        F.cross_entropy(model(x), y).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    # ResNet-14: 3 kinds of branch in stage 1-3's later blocks, 2 first blocks of stages 2 and 3, and
    # their 2 option-A shortcuts.
    assert graphs == [7, 7]


@pytest.mark.parametrize(
    "make, size",
    [(lambda: StochasticResNet.cifar(110, mode="row_subset", seed=0), 16),
     (lambda: StochasticResNet.imagenet(152, num_classes=10, seed=0), 32)],
    ids=["resnet110-row_subset", "resnet152-batch"],
)
def test_compile_branches_reaches_no_recompile_limit_in_deep_networks(make, size):
    # The "eager" backend runs dynamo's capture and guards, which is where the limit is
    # counted, without compiling kernels; fail_on_recompile_limit_hit turns the limit's
    # silent eager fallback into an error.
    torch._dynamo.reset()
    counters.clear()
    model = compile_branches(make(), backend="eager")
    x, y = batch(4, size=size)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
        model.eval()
        with torch.no_grad():
            model(x)
    assert counters["stats"]["unique_graphs"] > 0  # the branches were compiled, not run as they are
    assert "recompile_limit" not in str(counters["stats"])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- drop warm-up


def test_linear_drop_warmup_schedule():
    assert [linear_drop_warmup(step, 4) for step in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]
    assert linear_drop_warmup(0, 0) == 1.0
    with pytest.raises(ValueError, match="-1"):
        linear_drop_warmup(3, -1)


@pytest.mark.parametrize("mode, drop_scale", [("batch", 0.0), ("batch", 0.25), ("batch", 0.5), ("row", 0.5), ("batch", 1.0)])
def test_drop_scale_scales_every_blocks_drop_probability(mode, drop_scale):
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.2, seed=12)
    stochastic_depth_state(model).drop_scale = drop_scale
    x, _ = batch(8, size=4)
    passes = 150 if mode == "batch" else 25
    active = active_sequence(model, x, passes)
    kept = active.reshape(passes, 6, -1).sum((0, 2))
    trials = passes * (1 if mode == "batch" else 8)
    for count, p in zip(kept.tolist(), model.survival_probabilities):
        survival = 1 - drop_scale * (1 - p)  # exactly 1 at drop_scale 0: the bound is then 1e-9
        assert abs(count - trials * survival) <= binomial_bound(trials, survival), (count, survival)


@pytest.mark.parametrize("p, drop_scale", [(0.5, 1.0), (0.5, 0.25), (0.2, 0.0), (0.0, 0.5), (0.0, 0.0)])
def test_evaluation_scales_by_the_survival_probability_in_force(p, drop_scale):
    # By hand: shortcut + (1 - drop_scale (1 - p)) * branch; unscaled when inverted; a branch
    # that is never kept in training (probability in force 0) is left out.
    x, shortcut = torch.randn(3, 5), torch.randn(3, 5)
    for inverted in (False, True):
        gate = StochasticDepth(survival_prob=p, inverted=inverted, seed=0).eval()
        gate.drop_scale = drop_scale
        in_force = 1 - drop_scale * (1 - p)
        expected = shortcut if in_force == 0 else shortcut + (1.0 if inverted else in_force) * (2 * x)
        torch.testing.assert_close(gate(lambda t: 2 * t, x, shortcut), expected, rtol=0, atol=1e-6)
        assert bool(gate.last_active) == (in_force > 0)


def test_after_a_schedule_that_stops_dropping_evaluation_is_the_plain_network():
    # drop_scale 0 (e.g. the end of an early schedule): the evaluated network is the one that
    # trained last, every block at full strength: the plain ResNet with the same weights.
    plain, stochastic = tiny_pair(seed=3)
    stochastic_depth_state(stochastic).drop_scale = 0.0
    x, _ = batch(4, size=8)
    plain.eval(), stochastic.eval()
    assert torch.equal(plain(x), stochastic(x))  # one process: the same operations, bit for bit
    stochastic_depth_state(stochastic).drop_scale = 1.0
    assert not torch.allclose(plain(x), stochastic(x))


def test_drop_scale_is_checked_and_part_of_the_state():
    _, model = tiny_pair()
    state = stochastic_depth_state(model)
    with pytest.raises(ValueError, match="drop_scale.*1.5"):
        state.drop_scale = 1.5
    state.drop_scale = 0.5
    saved = state.get_state()
    x, _ = batch(2, size=4)
    first = active_sequence(model, x, 10)
    state.drop_scale = 1.0
    state.set_state(saved)
    assert state.drop_scale == 0.5 and torch.equal(active_sequence(model, x, 10), first)


# ---------------------------------------------------------------------------------- distributed


def _ddp_worker(rank, world_size, init_file, mode, stepped, results):
    import warnings

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(100 + rank)  # a different global RNG on each rank, as timm's train.py (seed + rank)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.5, seed=1234)  # the same weights come from rank 0
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    drops = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Epoch 0 is uneven (process 0 has 3 batches, process 1 has 2) under join(); then
        # process 0 runs one extra training-mode forward pass; epoch 1 is even.
        for epoch, batches in enumerate([3 - rank, 2]):
            with ddp.join():
                for i in range(batches):
                    if stepped:
                        set_step(model, epoch, i)
                    x, y = batch(16, seed=10 * epoch + i + 1000 * rank)  # different data on each rank
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(ddp(x), y).backward()
                    optimizer.step()
                    drops[epoch, i] = model.active_blocks.clone()
            if rank == 0 and epoch == 0:
                with torch.no_grad():
                    model(batch(16)[0])
    warned = any("without set_step" in str(w.message) for w in caught)
    results[rank] = (drops, [p.detach().clone() for p in model.parameters()], warned)
    dist.destroy_process_group()


def _run_two_processes(tmp_path, mode, stepped):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, tmp_path / "rendezvous", mode, stepped, results), nprocs=2)
        return results[0], results[1]


def test_ddp_processes_drop_the_same_blocks_at_every_step_after_uneven_inputs_and_an_extra_pass(tmp_path):
    (drops0, params0, warned0), (drops1, params1, warned1) = _run_two_processes(tmp_path, "batch", stepped=True)
    assert sorted(drops0) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)] and sorted(drops1) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for step in drops1:  # every step both processes took
        assert torch.equal(drops0[step], drops1[step]), step
    assert not all(d.all() for d in drops0.values())  # some blocks were dropped
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    assert not warned0 and not warned1


def test_ddp_without_set_step_warns_in_batch_mode(tmp_path):
    # Without a step, a pass's key is its number: process 0, 2 passes ahead after epoch 0, drops others.
    (drops0, _, warned0), (drops1, _, warned1) = _run_two_processes(tmp_path, "batch", stepped=False)
    assert warned0 and warned1
    assert not all(torch.equal(drops0[step], drops1[step]) for step in [(1, 0), (1, 1)])


@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_ddp_processes_draw_their_own_samples_in_the_row_modes(tmp_path, mode):
    (drops0, _, _), (drops1, _, _) = _run_two_processes(tmp_path, mode, stepped=True)
    steps = sorted(drops1)
    a, b = (torch.stack([d[step] for step in steps]) for d in (drops0, drops1))  # (steps, gates, samples)
    # Independent draws agree on a sample with probability 1 - 2 p (1 - p) (row) or about that
    # (row_subset: k of B kept on each process, agreement 1 - 2 k (B - k) / (B (B - 1)) per sample).
    probs = torch.tensor(StochasticResNet.cifar(14, p_last=0.5).survival_probabilities)
    if mode == "row":
        agree = 1 - 2 * probs * (1 - probs)
    else:
        k = torch.tensor([max(1, math.floor(16 * p + 0.5)) for p in probs.tolist()], dtype=torch.float64)
        agree = 1 - 2 * k * (16 - k) / (16 * 15)
    trials = a.shape[0] * a.shape[2]
    expected = (agree * trials).sum().item()
    variance = (agree * (1 - agree) * trials).sum().item()
    observed = (a == b).sum().item()
    assert abs(observed - expected) <= 4.5 * math.sqrt(variance), (observed, expected)
    assert observed < a.numel()
    # Process 0's draws are the ones a single process with the same seed makes at those steps.
    single = StochasticResNet.cifar(14, mode=mode, p_last=0.5, seed=1234)
    for step in sorted(drops0):
        set_step(single, *step)
        single(batch(16)[0])
        assert torch.equal(single.active_blocks, drops0[step]), step


