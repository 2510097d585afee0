"""Tests of the stochastic-depth ResNets against the paper's rules and hand-built references."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from resnet_with_stochastic_depth import (
    Bottleneck,
    ResNet,
    StochasticDepth,
    StochasticResNet,
    add_stochastic_depth,
    stochastic_depth_gates,
    survival_probabilities,
)


def tiny_pair(seed=0, **stochastic_kwargs):
    """A CIFAR ResNet-14 (L = 6 blocks, one projection per later stage) and its stochastic twin."""
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


def test_global_seed_makes_the_default_generator_reproducible():
    _, a = tiny_pair(seed=5)
    _, b = tiny_pair(seed=5)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


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
    seen_batch_sizes = []
    for block in model.blocks:
        block.conv1.register_forward_hook(lambda m, inputs, out: seen_batch_sizes.append(len(inputs[0])))
    x, y = batch(32)
    F.cross_entropy(model(x), y).backward()
    expected = [int(n) for n in model.active_blocks.sum(1).tolist() if n > 0]
    assert seen_batch_sizes == expected
    assert sum(expected) < 6 * 32


def test_row_mode_output_matches_a_masked_reference():
    torch.manual_seed(0)
    gate = StochasticDepth(survival_prob=0.6, mode="row", generator=torch.Generator().manual_seed(9))
    x = torch.randn(16, 3)
    weight = torch.randn(3, 3)
    out = gate(lambda t: t @ weight, x, shortcut=x)
    mask = gate.last_active.float().unsqueeze(1)
    torch.testing.assert_close(out, x + mask * (x @ weight))


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


@pytest.mark.parametrize("inverted", [False, True])
def test_training_output_equals_test_output_in_expectation(inverted):
    gate = StochasticDepth(survival_prob=0.3, inverted=inverted, generator=torch.Generator().manual_seed(11))
    x = torch.tensor([1.0, -2.0])
    residual = torch.tensor([4.0, 8.0])
    draws = 20000
    mean = sum(gate(lambda _: residual, x, x) for _ in range(draws)) / draws
    gate.eval()
    expected = gate(lambda _: residual, x, x)
    torch.testing.assert_close(expected, x + (residual if inverted else 0.3 * residual))
    # The training output is x + B * c * residual with B ~ Bernoulli(0.3): tolerance 4.5 sigma.
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
    for model, out in zip((plain, stochastic), outputs):
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


def test_add_stochastic_depth_rejects_a_model_without_residual_blocks():
    with pytest.raises(TypeError, match="no residual blocks"):
        add_stochastic_depth(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------- PyTorch features


def test_deepcopy_and_generator_state_round_trip():
    _, model = tiny_pair()
    clone = copy.deepcopy(model)
    assert all(g.generator is clone.generator for g in stochastic_depth_gates(clone))
    state = model.generator.get_state()
    x, _ = batch(2, size=4)
    first = active_sequence(model, x, 20)
    model.generator.set_state(state)
    assert torch.equal(active_sequence(model, x, 20), first)


@pytest.mark.parametrize("mode", ["batch", "row"])
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


@pytest.mark.parametrize("mode", ["batch", "row"])
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


# ---------------------------------------------------------------------------------- distributed


def _ddp_worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(100 + rank)  # different global RNG on each rank: the model's generator must decide
    model = StochasticResNet.cifar(14, seed=1234)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x, y = batch(4, seed=rank)  # different data on each rank
    drops = []
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        drops.append(model.active_blocks.clone())
    results[rank] = torch.stack(drops)
    dist.destroy_process_group()


def test_distributed_ranks_with_the_same_seed_drop_the_same_blocks(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(2, tmp_path / "rendezvous", results), nprocs=2)
        drops = [results[0], results[1]]
    assert torch.equal(drops[0], drops[1])
    assert not drops[0].all()  # some blocks were actually dropped
