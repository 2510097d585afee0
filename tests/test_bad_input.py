"""Bad input gets an error that names the argument, the value and what to pass, before anything changes."""

import numpy as np
import pytest
import torch
import torchvision
from test_library_blocks import build

from resnet_with_stochastic_depth import (
    StochasticDepth,
    StochasticResNet,
    add_stochastic_depth,
    set_step,
    stochastic_depth_gates,
)
from stochastic_depth.compilation import compile_branches
from stochastic_depth.distributed import fully_shard_stochastic_depth
from stochastic_depth.evaluation_network import keep_blocks
from stochastic_depth.gate import stochastic_depth_state
from stochastic_depth.schedules import early_drops, late_drops, linear_drop_warmup


def _structure(model):
    return [(name, type(m), getattr(m, "compile_options", None)) for name, m in model.named_modules()]


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        ((0.5,), {}, TypeError, ["survival_rule", "0.5", "p_last=0.5"]),
        (("quadratic",), {}, ValueError, ["survival rule", "'quadratic'"]),
        ((), {"p_last": "0.5"}, TypeError, ["p_last", "'0.5'"]),
        ((), {"inverted": "false"}, TypeError, ["inverted", "'false'"]),
        ((), {"mode": "rows"}, ValueError, ["mode", "'rows'"]),
        ((), {"p_last": 2.0}, ValueError, ["p_last", "2.0"]),
    ],
)
def test_add_stochastic_depth_names_a_bad_argument_and_changes_nothing(args, kwargs, error, words):
    model = torchvision.models.resnet18(num_classes=10)
    before = _structure(model)
    with pytest.raises(error) as raised:
        add_stochastic_depth(model, *args, **kwargs)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    assert _structure(model) == before


@pytest.mark.parametrize("model", [None, "resnet18"])
def test_add_stochastic_depth_of_something_that_is_not_a_module(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        add_stochastic_depth(model)


@pytest.mark.parametrize("schedule", [early_drops, late_drops, linear_drop_warmup])
@pytest.mark.parametrize(
    "steps, error, words",
    [(0.25, TypeError, ["0.25", "multiply it by the number of training steps"]), (float("nan"), TypeError, ["nan"]),
     ("10", TypeError, ["'10'"]), (None, TypeError, ["None"]), (-1, ValueError, ["-1"])],
)
def test_schedules_take_whole_numbers_of_steps(schedule, steps, error, words):
    with pytest.raises(error) as raised:
        schedule(3, steps)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    with pytest.raises(TypeError, match="step must be"):
        schedule(2.5, 10)
    assert schedule(torch.tensor(3), 10) == schedule(3, 10)  # integer types of other libraries


@pytest.mark.parametrize(
    "kwargs, name",
    [({"mp_policy": "bf16"}, "mp_policy"), ({"mp_policy": torch.bfloat16}, "mp_policy"), ({"mesh": "cpu"}, "mesh"),
     ({"offload_policy": True}, "offload_policy")],
)
def test_fully_shard_names_an_argument_of_the_wrong_type_before_sharding(kwargs, name):
    model = StochasticResNet.cifar(8, seed=0)
    before = _structure(model)
    with pytest.raises(TypeError, match=f"fully_shard_stochastic_depth: {name} must be a"):
        fully_shard_stochastic_depth(model, **kwargs)
    assert _structure(model) == before


@pytest.mark.parametrize("options", [{"mode": "fastest"}, {"backend": "no-such-backend"}, {"fulgraph": True}])
def test_compile_branches_refuses_options_torch_compile_does_not_take(options):
    model = StochasticResNet.cifar(8, seed=0)
    before = _structure(model)
    with pytest.raises(ValueError, match="compile_branches: torch.compile does not take"):
        compile_branches(model, **options)
    assert _structure(model) == before


def test_the_state_of_a_model_without_gates_is_an_error_that_says_what_to_do():
    with pytest.raises(TypeError, match="has no StochasticDepth gates; convert it with add_stochastic_depth"):
        stochastic_depth_state(torchvision.models.resnet18())


def test_a_state_of_other_gates_names_the_lengths():
    model = StochasticResNet.cifar(8, seed=0)
    state = stochastic_depth_state(model).get_state()
    state["passes"] = state["passes"][:-1]
    with pytest.raises(ValueError, match=r"'passes': 2.*this model has 3 gates"):
        stochastic_depth_state(model).set_state(state)


def test_keep_blocks_on_an_unconverted_model_says_to_convert_it():
    model = build("timm ResNet basic")
    with pytest.raises(TypeError, match=r"not converted yet \(timm.models.resnet.BasicBlock\): convert it with"):
        with keep_blocks(model, [0]):
            pass
    assert not stochastic_depth_gates(model)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [({"survival_rule": {0: 0.9, 1: 0.8}}, TypeError, ["survival_rule"]),
     ({"survival_rule": np.array(0.5)}, TypeError, ["survival_rule"]),
     ({"survival_rule": ["a"] * 8}, TypeError, ["survival probability of block 0", "'a'"]),
     ({"survival_rule": [None] * 8}, TypeError, ["survival probability of block 0", "None"]),
     ({"p_last": [0.5]}, TypeError, ["p_last"]),
     ({"p_last": 0.5 + 0j}, TypeError, ["p_last"])],
)
def test_add_stochastic_depth_refuses_rules_and_rates_of_other_kinds(kwargs, error, words):
    model = torchvision.models.resnet18(num_classes=10)
    before = _structure(model)
    with pytest.raises(error) as raised:
        add_stochastic_depth(model, **kwargs)
    assert all(word in str(raised.value) for word in words), str(raised.value)
    assert _structure(model) == before
    # Sequences of numbers of any kind are rules.
    add_stochastic_depth(model, survival_rule=np.linspace(1.0, 0.5, 8))


def test_the_gate_and_the_state_refuse_strings_and_bools():
    with pytest.raises(TypeError, match="inverted must be True or False, got 'no'"):
        StochasticDepth(survival_prob=0.5, inverted="no")
    with pytest.raises(TypeError, match="survival_prob must be a probability"):
        StochasticDepth(survival_prob="0.5")
    state = stochastic_depth_state(StochasticResNet.cifar(8, seed=0))
    for value in ("0.5", True):
        with pytest.raises(TypeError, match="drop_scale must be a probability"):
            state.drop_scale = value
    assert state.drop_scale == 1.0


@pytest.mark.parametrize("call", [stochastic_depth_state, lambda m: set_step(m, 0), compile_branches])
def test_functions_of_a_model_name_a_non_module(call):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        call(None)


def test_keep_blocks_takes_integers_of_any_library():
    model = StochasticResNet.cifar(8, seed=0).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        for keep in (np.arange(3), torch.arange(3)):
            with keep_blocks(model, keep):
                assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match=r"integer indices in \[0, 3\), got 1.5"):
        with keep_blocks(model, [0, 1.5]):
            pass
