"""Counting the work of a training step: FLOP floors (the library) and operators (benchmarks.counters)."""

import copy

import pytest
import torch
from test_library_blocks import build, images
from test_resnet_with_stochastic_depth import batch, tiny_pair
from torch import nn

from benchmarks.counters import training_operator_count
from resnet_with_stochastic_depth import (
    ResNet,
    add_stochastic_depth,
    stochastic_depth_gates,
    stochastic_depth_state,
    survival_probabilities,
)
from stochastic_depth.counting import flop_counter_mode, gate_flop_floor, training_flop_floor


def test_gate_flop_floor_is_training_flop_floor_for_a_resnet():
    torch.manual_seed(0)
    plain = ResNet.cifar(20)
    stochastic = add_stochastic_depth(copy.deepcopy(plain), "linear", 0.5)
    x, y = images(4), torch.arange(4)
    expected = training_flop_floor(plain, x, y, survival_probabilities(9, "linear", 0.5))
    assert gate_flop_floor(stochastic, x, y) == pytest.approx(expected, rel=1e-12)


def test_gate_flop_floor_of_a_vit_by_hand():
    """The tiny ViT (batch 8, 17 tokens of width 64, MLP 256): a gate's work, forward and
    backward (3x the forward: the input gradient and the weight gradient of each product)."""
    model = add_stochastic_depth(build("timm ViT"))
    x, y = images(8), torch.arange(8)
    b, n, d = 8, 17, 64
    attention = 3 * (2 * b * n * 4 * d * d + 2 * 2 * b * n * n * d)  # qkv + proj; q k^T and attn v
    mlp = 3 * (2 * b * n * 8 * d * d)
    gates = stochastic_depth_gates(model)
    total = gate_flop_floor(model, x, y, [1.0] * len(gates))
    assert total["floor"] == 1.0
    for index, work in ((2, attention), (3, mlp)):
        fractions = [1.0] * len(gates)
        fractions[index] = 0.0  # this gate always drops
        skipped = total["total_gflop"] * (1 - gate_flop_floor(model, x, y, fractions)["floor"])
        assert skipped == pytest.approx(work / 1e9, rel=1e-9)
    nothing = gate_flop_floor(model, x, y, [0.0] * len(gates))
    assert nothing["floor"] == pytest.approx(nothing["fixed_gflop"] / nothing["total_gflop"])
    assert nothing["total_gflop"] - nothing["fixed_gflop"] == pytest.approx(4 * (attention + mlp) / 1e9, rel=1e-9)
    with pytest.raises(ValueError, match="expected 8 fractions"):
        gate_flop_floor(model, x, y, [1.0])


def test_flop_counter_counts_a_depthwise_convolutions_backward_as_twice_its_forward():
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    forward = 2 * 2 * 16 * 8 * 8 * 9  # output elements x (16 / 16 channels x 3x3) x 2
    with flop_counter_mode() as counter:
        conv(x).sum().backward()
    assert counter.get_total_flops() == 3 * forward


def test_row_subset_adds_at_most_seven_device_operators_and_a_few_host_ones_per_block():
    # Where a GPU step is bound by kernel launches (ResNet-50 on MNIST on an H100), each extra
    # operator costs time no smaller batch gives back. On the device, per block that runs on a
    # subset: the gather, again in backward (where the first convolution needs the kept rows:
    # gathering them again is what keeps a copy of them from being saved), and its gradient,
    # the scatter-add (instead of the add) and its gradient's zeros, the scale in backward, and
    # the copy of the kept indices. On the host, per block: the gate's draw.
    plain, stochastic = tiny_pair(mode="row_subset", p_last=0.5)
    x, y = batch(8)
    stochastic(x)  # a pass, to see which blocks ran on a subset
    on_a_subset = sum(0 < k < 8 for k in stochastic.active_blocks.sum(1).tolist())
    assert on_a_subset == 6
    passes = stochastic_depth_state(stochastic).get_state()
    counted, reference = training_operator_count(stochastic, x, y), training_operator_count(plain, x, y)
    assert stochastic_depth_state(stochastic).get_state() == passes  # counted on a copy
    assert reference["host"] == 0
    assert counted["device"] - reference["device"] <= 7 * on_a_subset, counted
    assert counted["host"] <= 8 * 6, counted
