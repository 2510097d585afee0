"""Drop schedules: the drop warm-up and the drop scale (stochastic_depth_state(model).drop_scale), and the
early and late schedules of stochastic_depth.schedules: the drop scale per step, the rates the gates draw at
under them in every mode (binomial tests with fixed seeds), and the evaluation network after them."""

import math

import pytest
import torch
from test_gate import binomial_bound
from test_resnet_with_stochastic_depth import active_sequence, batch, tiny_pair

from resnet_with_stochastic_depth import (
    ResNet,
    StochasticDepth,
    StochasticResNet,
    linear_drop_warmup,
    set_step,
    stochastic_depth_state,
)
from stochastic_depth.schedules import early_drops, late_drops

SIGMAS = 4.5  # a correct gate misses a binomial bound with probability < 1e-5 per block; the seeds are fixed


# ---------------------------------------------------------------------------------- drop warm-up and drop scale


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


# ---------------------------------------------------------------------------------- early and late schedules


def test_early_and_late_schedules_switch_at_the_given_step():
    assert [early_drops(step, 3) for step in range(6)] == [1, 1, 1, 0, 0, 0]
    assert [late_drops(step, 3) for step in range(6)] == [0, 0, 0, 1, 1, 1]
    assert early_drops(0, 0) == 0.0 and late_drops(0, 0) == 1.0  # a switch at step 0: never / always
    for schedule in (early_drops, late_drops):
        with pytest.raises(ValueError, match="-1"):
            schedule(2, -1)
        with pytest.raises(ValueError, match="-1"):
            schedule(-1, 2)


def run_schedule(model, schedule, switch, steps, x):
    """``active_blocks`` of one training pass per step, each step's gates keyed by the step and scaled by `schedule`."""
    state = stochastic_depth_state(model)
    rows = []
    with torch.no_grad():
        for step in range(steps):
            set_step(model, step)
            state.drop_scale = schedule(step, switch)
            model(x)
            rows.append(model.active_blocks.reshape(len(model.blocks), -1))
    return torch.stack(rows)  # (steps, blocks, 1 or batch)


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
@pytest.mark.parametrize("schedule", [early_drops, late_drops])
def test_each_step_draws_at_the_rate_its_schedule_says_in_every_mode(mode, schedule):
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.2, seed=5)  # 6 blocks, p_l = 0.867 ... 0.2
    model.train()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    steps, switch = 300, 150
    active = run_schedule(model, schedule, switch, steps, x)
    dropping = slice(0, switch) if schedule is early_drops else slice(switch, steps)
    quiet = slice(switch, steps) if schedule is early_drops else slice(0, switch)
    # Outside the drop phase the survival probability in force is 1: every block runs on every sample.
    assert active[quiet].all()
    # Inside it each block survives at its target p_l: Binomial(steps x samples, p_l) counts, or exactly
    # round(B p_l) samples per step in row_subset.
    phase = active[dropping]
    for block, p in enumerate(model.survival_probabilities):
        kept = phase[:, block]
        if mode == "row_subset":
            assert (kept.sum(1) == max(1, round(8 * p))).all(), block
            continue
        trials = kept.numel()
        assert abs(kept.sum().item() - trials * p) <= SIGMAS * math.sqrt(trials * p * (1 - p)), (block, p)


def test_a_schedule_resumed_from_the_gate_state_draws_what_the_whole_run_draws():
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = StochasticResNet.cifar(14, mode="row", p_last=0.2, seed=5)
    whole = run_schedule(model, early_drops, 6, 10, x)
    model = StochasticResNet.cifar(14, mode="row", p_last=0.2, seed=5)
    first = run_schedule(model, early_drops, 6, 4, x)
    saved = stochastic_depth_state(model).get_state()
    resumed = StochasticResNet.cifar(14, mode="row", p_last=0.2, seed=99)
    stochastic_depth_state(resumed).set_state(saved)
    state = stochastic_depth_state(resumed)
    rest = []
    with torch.no_grad():
        for step in range(4, 10):
            set_step(resumed, step)
            state.drop_scale = early_drops(step, 6)
            resumed(x)
            rest.append(resumed.active_blocks.reshape(6, -1))
    assert torch.equal(torch.cat([first, torch.stack(rest)]), whole)


@pytest.mark.parametrize("drop_scale", [0.0, 0.5, 1.0])
def test_evaluation_scales_each_residual_by_the_survival_probability_in_force(drop_scale):
    # In eval mode a (non-inverted) gate scales its residual by 1 - drop_scale * (1 - p_l): the same weights
    # in a network built with those survival probabilities (drop_scale 1) compute the same; at drop_scale 0,
    # after an early schedule, the plain network with the same weights.
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, p_last=0.2, seed=0)
    in_force = [1 - drop_scale * (1 - p) for p in model.survival_probabilities]
    reference = ResNet.cifar(14) if drop_scale == 0 else StochasticResNet.cifar(14, survival_rule=in_force, seed=0)
    reference.load_state_dict(model.state_dict())
    stochastic_depth_state(model).drop_scale = drop_scale
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
