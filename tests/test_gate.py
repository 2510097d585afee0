"""The gate (StochasticDepth): the survival rules, draws that are functions of their seeds and keys
(draw_decision, key_seed), the batch, row and row_subset modes against binomial bounds and masked
references, the scaling and the evaluation rule, what a training step runs and keeps for backward,
channels_last and bfloat16 autocast, set_step and the gates' state."""

import copy
import math

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
import torchvision
from test_library_blocks import FAMILIES, build, channels_last, images
from test_resnet_with_stochastic_depth import active_sequence, batch, tiny_pair
from torch import nn

from resnet_with_stochastic_depth import (
    Bottleneck,
    StochasticDepth,
    StochasticResNet,
    add_stochastic_depth,
    draw_decision,
    key_seed,
    set_step,
    stochastic_depth_gates,
    stochastic_depth_state,
    survival_probabilities,
)
from stochastic_depth.autograd_ops import conv_on_rows

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


def binomial_bound(n, p, sigmas=4.5):
    """Largest deviation of a Binomial(n, p) count from n * p that we accept.

    4.5 standard deviations: a correct implementation fails with probability < 1e-5
    per block; the seeds are fixed, so each test is deterministic anyway.
    """
    return sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


def branch_batch_sizes(model):
    """A list that fills, as `model` runs, with the batch size each residual branch ran on."""
    seen = []
    for block in model.blocks:
        block.conv1.register_forward_hook(lambda module, inputs, out: seen.append(len(inputs[0])))
    return seen


# ---------------------------------------------------------------------------------- survival rules


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


def test_survival_prob_is_keyword_only_so_it_cannot_be_read_as_torchvisions_drop_probability():
    with pytest.raises(TypeError):
        StochasticDepth(0.1, "row")
    assert StochasticDepth(survival_prob=0.1, mode="row").survival_prob == 0.1
    with pytest.raises(ValueError, match="'column'"):
        StochasticDepth(survival_prob=0.5, mode="column")


# ---------------------------------------------------------------------------------- draws, seeds and keys


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


# ---------------------------------------------------------------------------------- batch mode


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


# ---------------------------------------------------------------------------------- row mode


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


# ---------------------------------------------------------------------------------- row_subset mode


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


# ---------------------------------------------------------------------------------- what a training step runs and keeps for backward


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


def _saved_storages(run):
    """What autograd saves for backward while `run()` runs: data pointer of each storage -> the first tensor saved in it."""
    saved = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, saved


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_a_resnet_block_run_on_some_samples_saves_its_input_not_a_copy_of_them(mode, layout):
    # The block's input is a ReLU output, which autograd keeps for the ReLU's backward. Its first
    # convolution, run on the gathered kept samples, would save that gathered copy as well: the
    # row modes then saved more than the unconverted block (a ResNet-50: 1.08 of its bytes).
    torch.manual_seed(0)
    block = Bottleneck(16, 4)  # 16 channels in and out: an identity shortcut
    block.stochastic_depth = StochasticDepth(survival_prob=0.5, mode=mode, seed=3)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    block.to(memory_format=memory_format)
    pre = torch.randn(8, 16, 6, 6).to(memory_format=memory_format).requires_grad_()
    x = torch.relu(pre)
    out, saved = _saved_storages(lambda: block(x))
    kept = block.stochastic_depth.last_active.nonzero().flatten()
    assert 1 < len(kept) < 8
    assert x.untyped_storage().data_ptr() in saved
    copies = [t for t in saved.values() if t.shape == (len(kept), 16, 6, 6) and torch.equal(t, x[kept])]
    assert not copies
    assert channels_last(out) == (layout == "channels_last")
    # The same output and gradients as the branch run on a gathered copy (the reference path).
    out.square().sum().backward(retain_graph=True)  # (the reference goes through x's ReLU again)
    grads = [pre.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    for t in [pre, *block.parameters()]:
        t.grad = None
    gate, shortcut = block.stochastic_depth, x
    gate.passes -= 1  # the same pass again: the same samples
    reference = block.relu(gate(block.branch, x, shortcut))
    torch.testing.assert_close(reference, out)
    reference.square().sum().backward()
    for got, want in zip(grads, [pre.grad] + [p.grad for p in block.parameters()]):
        torch.testing.assert_close(got, want)


def test_the_first_convolution_on_some_samples_matches_autograd_also_twice_differentiated():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1).double()
    x = torch.randn(7, 6, 9, 9, dtype=torch.double, requires_grad=True)
    index = torch.tensor([5, 0, 3])
    assert torch.autograd.gradcheck(lambda x, w, b: conv_on_rows(conv, x, index), (x, conv.weight, conv.bias))
    assert torch.autograd.gradgradcheck(lambda x, w, b: conv_on_rows(conv, x, index), (x, conv.weight, conv.bias))


def test_the_first_convolution_on_some_samples_under_bfloat16_autocast_matches_autograd():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(7, 6, 9, 9, requires_grad=True)
    index = torch.tensor([1, 4])
    grads = []
    for run in (lambda: conv_on_rows(conv, x, index), lambda: conv(x[index])):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run()
        out.float().square().sum().backward()
        grads.append((out, x.grad, conv.weight.grad, conv.bias.grad))
        x.grad = conv.weight.grad = conv.bias.grad = None
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


def test_hooks_and_other_convolutions_still_see_the_first_convolution_called():
    # Pruning's mask is a forward pre-hook; a subclass may compute something else: those are
    # called as they are, on the gathered rows.
    torch.manual_seed(0)
    x, index = torch.randn(6, 4, 5, 5), torch.tensor([0, 2, 5])
    conv = nn.Conv2d(4, 3, 3, padding=1)
    torch.nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)
    calls = []
    conv.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    torch.testing.assert_close(conv_on_rows(conv, x, index), conv(x[index]))
    assert calls == [3, 3]
    circular = nn.Conv2d(4, 3, 3, padding=1, padding_mode="circular")
    torch.testing.assert_close(conv_on_rows(circular, x, index), circular(x[index]))
    # accelerate's add_hook_to_module replaces forward on the instance.
    replaced = nn.Conv2d(4, 3, 3, padding=1)
    plain_forward = replaced.forward
    replaced.forward = lambda t: plain_forward(t) * 0
    assert not conv_on_rows(replaced, x, index).any()


# ---------------------------------------------------------------------------------- memory layout and autocast


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


# ---------------------------------------------------------------------------------- set_step and the gates' state


def test_set_step_takes_integers_of_any_kind_and_refuses_the_rest():
    import numpy as np

    model = StochasticResNet.cifar(14, seed=1)
    set_step(model, np.int64(3), 4)
    assert all(gate.step == (3, 4) for gate in stochastic_depth_gates(model))
    for bad in [(2**63,), (1.5,), ("1",), (True,), ()]:
        with pytest.raises(ValueError, match="step"):
            set_step(model, *bad)


def test_the_state_of_several_converted_subnetworks_resumes_each_exactly():
    def two_backbones():
        torch.manual_seed(0)
        net = torch.nn.ModuleDict({"a": torchvision.models.resnet18(num_classes=10),
                                   "b": torchvision.models.resnet18(num_classes=10)})
        add_stochastic_depth(net["a"], p_last=0.5)  # each conversion draws a seed of its own
        add_stochastic_depth(net["b"], p_last=0.5)
        return net

    net, resumed = two_backbones(), two_backbones()
    x, _ = batch(2, size=32)
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
