"""Stochastic depth on torchvision's and timm's residual blocks: parity with the unconverted
models, the drop rates, skipped work, state_dicts, memory layout and the errors. (Their activation
checkpointing is tested in test_checkpointing.py.)

Every family is built small (a few blocks, 16-64 channels, 32x32 images) with random weights."""

import copy
import math
import warnings
from pathlib import Path

import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.convnext import ConvNeXt as TimmConvNeXt
from timm.models.resnet import BasicBlock as TimmBasicBlock
from timm.models.resnet import Bottleneck as TimmBottleneck
from timm.models.resnet import ResNet as TimmResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.efficientnet import EfficientNet, FusedMBConv, FusedMBConvConfig, MBConv, MBConvConfig
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.ops import StochasticDepth as TorchvisionStochasticDepth

from resnet_with_stochastic_depth import (
    add_stochastic_depth,
    stochastic_depth_gates,
)
from stochastic_depth.library_blocks import GatedBlock, converted_class

RATE = 0.4  # drop_path_rate / stochastic_depth_prob of every family, spread over its blocks by the library


def swin(block=None, **kwargs):
    if block is not None:
        kwargs.update(block=block, downsample_layer=PatchMergingV2)
    return SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
        stochastic_depth_prob=RATE, num_classes=10, **kwargs,
    )


FAMILIES = {
    "torchvision ConvNeXt": lambda: ConvNeXt(
        [CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], stochastic_depth_prob=RATE, num_classes=10
    ),
    "torchvision Swin": swin,
    "torchvision Swin V2": lambda: swin(SwinTransformerBlockV2),
    "torchvision EfficientNet": lambda: EfficientNet(
        [MBConvConfig(1, 3, 1, 16, 16, 2), MBConvConfig(4, 3, 2, 16, 24, 2)],
        dropout=0.0, stochastic_depth_prob=RATE, num_classes=10,
    ),
    "torchvision EfficientNet V2": lambda: EfficientNet(
        [FusedMBConvConfig(1, 3, 1, 16, 16, 2), FusedMBConvConfig(4, 3, 2, 16, 24, 2)],
        dropout=0.0, stochastic_depth_prob=RATE, num_classes=10, last_channel=64,
    ),
    "timm ViT": lambda: VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, drop_path_rate=RATE,
        init_values=1e-5, num_classes=10,
    ),
    "timm ConvNeXt": lambda: TimmConvNeXt(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), drop_path_rate=RATE, num_classes=10),
    "timm ResNet basic": lambda: TimmResNet(TimmBasicBlock, [2, 2, 1, 1], drop_path_rate=RATE, num_classes=10),
    "timm ResNet bottleneck": lambda: TimmResNet(TimmBottleneck, [1, 1, 1, 1], drop_path_rate=RATE, num_classes=10),
}
LAYER_NORM = {"torchvision ConvNeXt", "torchvision Swin", "torchvision Swin V2", "timm ViT", "timm ConvNeXt"}


class HuggingFaceLogits(nn.Module):
    """transformers' ``{family}ForImageClassification`` from a config, called as ``images -> logits``
    as the other families are (transformers' own tests are in test_hugging_face.py)."""

    def __init__(self, family, **config):
        import transformers  # (here: processes that build other families need not import it)

        super().__init__()
        self.model = getattr(transformers, f"{family}ForImageClassification")(getattr(transformers, f"{family}Config")(**config))

    def forward(self, x):
        return self.model(pixel_values=x).logits


# Two transformers families for the tests of the tools (DDP, FSDP2, torch.compile), 32x32 images, 10 classes.
HUGGING_FACE = {
    "transformers DINOv2": lambda: HuggingFaceLogits(
        "Dinov2", hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, drop_path_rate=RATE, num_labels=10),
    "transformers Swin": lambda: HuggingFaceLogits(
        "Swin", image_size=32, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=4,
        drop_path_rate=RATE, num_labels=10),
}  # fmt: skip

# The submodules (and parameters) each gate's branch consists of, by converted class and gate.
def build(family, seed=0):
    torch.manual_seed(seed)
    return {**FAMILIES, **HUGGING_FACE}[family]()


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def channels_last(t):
    """Whether `t` is laid out channels_last and not also plainly contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def converted_blocks(model):
    return [m for m in model.modules() if isinstance(m, GatedBlock)]


def branch_parts(block):
    """``{gate: (submodules, parameters)}`` of a converted block's branches, from its declaration
    (``BRANCHES``); a one-branch block's own parameters (a layer scale) belong to its branch."""
    parts = {}
    for gate, names in type(block).BRANCHES.items():
        modules = [m for m in (getattr(block, n, None) for n in names) if isinstance(m, nn.Module)]
        own = list(block.parameters(recurse=False)) if len(block.GATES) == 1 else []
        parts[gate] = (modules, [p for m in modules for p in m.parameters()] + own)
    return parts


@pytest.mark.parametrize("family", FAMILIES)
def test_the_declared_branches_hold_every_parameter_but_the_shortcuts(family):
    # A wrong declaration would leave a parameter out (FSDP2 would shard it with the block and
    # gather it for a dropped branch) or count it twice.
    for block in converted_blocks(add_stochastic_depth(build(family))):
        declared = [p for _, parameters in branch_parts(block).values() for p in parameters]
        shortcut = [p for name in ("downsample", "shortcut") if isinstance(getattr(block, name, None), nn.Module)
                    for p in getattr(block, name).parameters()]
        assert len({id(p) for p in declared}) == len(declared)
        assert {id(p) for p in declared} | {id(p) for p in shortcut} == {id(p) for p in block.parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_output_is_exactly_the_unconverted_models(family):
    unconverted = build(family).eval()
    model = add_stochastic_depth(copy.deepcopy(unconverted))
    x = images()
    with torch.no_grad():
        # Exactly equal: the same operations, with shortcut + branch for branch + shortcut.
        assert torch.equal(model(x), unconverted(x))
    # Also when converted in training mode and switched to eval afterwards.
    trained_mode = add_stochastic_depth(copy.deepcopy(unconverted).train()).eval()
    with torch.no_grad():
        assert torch.equal(trained_mode(x), unconverted(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_keep_the_models_own_rates_per_sample_and_inverted(family):
    unconverted = build(family)
    own = []  # 1 - p of each drop-path module, read here from the library's modules
    for block in unconverted.modules():
        kind = converted_class(type(block))
        if kind is None or (isinstance(block, (MBConv, FusedMBConv)) and not block.use_res_connect):
            continue
        for attribute in kind.DROP_PATHS:
            m = getattr(block, attribute)  # timm: nn.Identity or None where the rate is 0
            p = m.p if isinstance(m, TorchvisionStochasticDepth) else getattr(m, "drop_prob", 0.0)
            own += [1 - p] * (len(kind.GATES) // len(kind.DROP_PATHS))  # Swin: one module, two branches
    model = add_stochastic_depth(unconverted)
    gates = stochastic_depth_gates(model)
    assert [g.survival_prob for g in gates] == pytest.approx(own, abs=1e-12)  # timm's rates are float32 numbers
    assert 1 - RATE - 1e-7 <= min(own) < 1  # the library spreads RATE over the blocks, up to RATE
    assert all(g.mode == "row_subset" and g.inverted for g in gates)
    assert not any(isinstance(m, (TorchvisionStochasticDepth, DropPath)) for b in converted_blocks(model) for m in b.children())


@pytest.mark.parametrize("family", ["torchvision Swin", "timm ViT", "timm ResNet basic"])
def test_an_explicit_rule_replaces_the_own_rates_and_both_gates_of_a_block_share_it(family):
    model = add_stochastic_depth(build(family), "uniform", 0.7, mode="batch")
    gates = stochastic_depth_gates(model)
    assert [g.survival_prob for g in gates] == [0.7] * len(gates)
    assert all(g.mode == "batch" for g in gates)
    blocks = converted_blocks(model)
    linear = add_stochastic_depth(build(family), p_last=0.5)
    expected = [1 - (l / len(blocks)) * 0.5 for l in range(1, len(blocks) + 1)]
    per_block = [[g.survival_prob for g in b.children() if g in set(stochastic_depth_gates(linear))] for b in converted_blocks(linear)]
    assert per_block == [[p] * len(per_block[0]) for p in expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_with_the_unconverted_model(family):
    unconverted = build(family)
    reference = copy.deepcopy(unconverted.state_dict())
    parameters = dict(unconverted.named_parameters())
    model = add_stochastic_depth(unconverted)
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    # The very same parameter objects (an optimizer built before the conversion still works).
    assert all(p is parameters[n] for n, p in model.named_parameters())
    other = build(family, seed=5)
    other.load_state_dict(state)  # strict: the unconverted class takes the converted model's state_dict
    model.load_state_dict(build(family, seed=6).state_dict())  # and the other way round
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), build(family, seed=6).state_dict().values()))


def test_converted_blocks_keep_their_children_in_order():
    unconverted = build("timm ViT")
    names = [n for n, _ in unconverted.blocks[0].named_children()]
    model = add_stochastic_depth(unconverted)
    assert [n for n, _ in model.blocks[0].named_children()] == names  # drop_path1/2 replaced in place
    swin_names = [n for n, _ in build("torchvision Swin").features[1][0].named_children()]
    converted = [n for n, _ in add_stochastic_depth(build("torchvision Swin")).features[1][0].named_children()]
    assert converted == [
        n for name in swin_names for n in (["stochastic_depth_attn", "stochastic_depth_mlp"] if name == "stochastic_depth" else [name])
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_frequencies_per_gate_at_its_rate(family):
    # "row": one independent draw per sample and gate; binomial test per gate over passes x batch.
    model = add_stochastic_depth(build(family), "uniform", 0.5, mode="row", seed=0)
    gates = stochastic_depth_gates(model)
    for gate, p in zip(gates, [0.3, 0.6, 0.9, 0.5] * len(gates)):  # several rates in one model
        gate.survival_prob = p
    kept = torch.zeros(len(gates))
    passes, n = 40, 8
    x = images(n)
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
            kept += torch.stack([g.last_active.float().sum() for g in gates])
    for count, gate in zip(kept.tolist(), gates):
        # Bonferroni over the gates: a correct sampler fails one family at rate 1e-3.
        pvalue = scipy.stats.binomtest(int(count), passes * n, gate.survival_prob).pvalue
        assert pvalue > 1e-3 / len(gates), (gate, count / (passes * n))


@pytest.mark.parametrize("family", FAMILIES)
def test_row_subset_keeps_round_b_p_samples_per_gate(family):
    model = add_stochastic_depth(build(family), seed=0)  # own rates, row_subset
    x = images(8)
    with torch.no_grad():
        model.train()(x)
    for gate in stochastic_depth_gates(model):
        assert int(gate.last_active.sum()) == max(1, math.floor(8 * gate.survival_prob + 0.5))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dropped_branch_gets_no_forward_call_and_no_gradient(family):
    # Batch mode at p = 0.5: some branches drop for the whole batch, others run.
    model = add_stochastic_depth(build(family), "uniform", 0.5, mode="batch", seed=3).train()
    calls = {}
    for block in converted_blocks(model):
        for modules, _ in branch_parts(block).values():
            for m in modules:
                m.register_forward_hook(lambda m, args, out: calls.__setitem__(m, calls.get(m, 0) + 1))
    x, y = images(), torch.arange(8) % 10
    dropped = kept = 0
    for _ in range(4):
        model.zero_grad(set_to_none=True)
        calls.clear()
        F.cross_entropy(model(x), y).backward()
        for block in converted_blocks(model):
            for gate_name, (modules, params) in branch_parts(block).items():
                active = bool(getattr(block, gate_name).last_active)
                dropped, kept = dropped + (not active), kept + active
                assert all((m in calls) == active for m in modules), (block, gate_name)
                assert all((p.grad is not None) == active for p in params), (block, gate_name)
    assert dropped and kept  # the seed gives both cases over the passes


@pytest.mark.parametrize("family", FAMILIES)
def test_row_subset_runs_each_branch_on_the_kept_samples_only(family):
    model = add_stochastic_depth(build(family), "uniform", 0.5, seed=0).train()  # k = 4 of 8
    batch_sizes = {}
    for block in converted_blocks(model):
        for modules, _ in branch_parts(block).values():
            m = modules[0]
            m.register_forward_pre_hook(lambda m, args: batch_sizes.__setitem__(m, args[0].shape[0]))
    model(images(8)).sum().backward()
    assert set(batch_sizes.values()) == {4}


def _capture(block):
    """Forward hook storing the block's input and output of the last call."""
    seen = {}
    block.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach().clone(), out=out.detach()))
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_samples_get_what_masking_gives_them(family):
    """Hand-built reference: the masking drop path's formula with the gates' draws.

    LayerNorm blocks: the branch on the whole batch, masked (what torchvision/timm compute),
    equals the converted block's output to float rounding (atol 1e-5 on outputs of order 1).
    BatchNorm blocks: the kept samples are normalised with their own statistics, so the
    reference runs the branch on the kept samples only."""
    model = add_stochastic_depth(build(family), "uniform", 0.5, seed=0).train()
    block = converted_blocks(model)[-1]
    twin = copy.deepcopy(block)  # same weights and running statistics, for the reference
    seen = _capture(block)
    with torch.no_grad():
        model(images(8))
    x, out = seen["x"], seen["out"]
    gates = list(type(block).BRANCHES)
    shortcut = x
    with torch.no_grad():
        if hasattr(twin, "downsample") and twin.downsample is not None:
            shortcut = twin.downsample(x)
        elif type(twin).__name__ == "StochasticConvNeXtBlock":
            shortcut = twin.shortcut(x)
        if hasattr(twin, "attention_branch"):  # transformer blocks
            branches = [twin.attention_branch, twin.mlp_branch]
        elif hasattr(twin, "branch"):
            branches = [twin.branch]
        else:  # EfficientNet
            branches = [twin.block]
        h = shortcut
        for gate_name, branch in zip(gates, branches):
            mask = getattr(block, gate_name).last_active
            scale = mask.numel() / mask.sum()  # inverted row_subset: B / k
            inputs = h if len(branches) > 1 else x  # a transformer's second branch reads the first's sum
            if family in LAYER_NORM:
                residual = branch(inputs) * mask.view(-1, *[1] * (h.dim() - 1)) * scale
            else:
                residual = torch.zeros_like(h).index_copy(0, mask.nonzero()[:, 0], branch(inputs[mask])) * scale
            h = h + residual
        if type(twin).__name__.startswith("StochasticTimm"):
            h = torch.relu(h)
    torch.testing.assert_close(out, h, atol=1e-5, rtol=1e-5)

class CustomBlock(nn.Module):
    """A block this project cannot know the forward of, holding timm's DropPath."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop_path = DropPath(0.2)

    def forward(self, x):
        return x + self.drop_path(self.fc(x))


def test_a_custom_block_with_a_drop_path_is_refused_before_anything_changes():
    vit = build("timm ViT")
    vit.custom = CustomBlock()  # beside supported blocks
    before = {n: type(m) for n, m in vit.named_modules()}
    with pytest.raises(TypeError, match=r"custom\.drop_path \(DropPath\).*in custom \(.*CustomBlock\).*Supported blocks: .*CNBlock.*vision_transformer.Block"):
        add_stochastic_depth(vit)
    assert {n: type(m) for n, m in vit.named_modules()} == before
    assert not hasattr(vit, "stochastic_depth_state")


class OtherLibraryDropPath(nn.Module):
    """A drop path of a library we do not know, recognised by its class name only."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x


def test_a_drop_path_of_any_library_is_named_by_its_qualified_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
    model[1].drop_path = OtherLibraryDropPath(0.1)
    with pytest.raises(TypeError, match=r"1\.drop_path \(OtherLibraryDropPath\)"):
        add_stochastic_depth(model)


def test_timm_drop_path_without_scale_by_keep_is_refused():
    vit = build("timm ViT")
    vit.blocks[2].drop_path1 = DropPath(0.2, scale_by_keep=False)
    with pytest.raises(TypeError, match="blocks.2.drop_path1 is a DropPath with scale_by_keep=False"):
        add_stochastic_depth(vit)
    assert isinstance(vit.blocks[0].drop_path1, nn.Identity) and not stochastic_depth_gates(vit)


def test_efficientnet_blocks_without_a_residual_connection_are_left_as_they_are():
    # Dropping the only path of a block that changes width would zero its output (timm's
    # rexnet fix, huggingface/pytorch-image-models#685): torchvision never drops it, nor do we.
    model = build("torchvision EfficientNet")
    no_residual = [m for m in model.modules() if isinstance(m, MBConv) and not m.use_res_connect]
    assert no_residual
    add_stochastic_depth(model)
    assert all(type(m) is MBConv for m in no_residual)
    assert all(m in set(model.modules()) for m in no_residual)


def test_converting_twice_keeps_the_rates():
    model = add_stochastic_depth(build("timm ViT"), seed=0)
    rates = [g.survival_prob for g in stochastic_depth_gates(model)]
    add_stochastic_depth(model, mode="batch")
    assert [g.survival_prob for g in stochastic_depth_gates(model)] == rates
    assert all(g.mode == "batch" for g in stochastic_depth_gates(model))


def test_vit_per_sample_attention_mask_in_a_row_mode_is_refused_a_broadcast_one_works():
    unconverted = build("timm ViT").eval()
    model = add_stochastic_depth(copy.deepcopy(unconverted), seed=0).train()
    x, tokens = images(4), 17  # 16 patches and the class token
    with pytest.raises(ValueError, match="per-sample attention mask"):
        model(x, attn_mask=torch.ones(4, 1, tokens, tokens, dtype=torch.bool))
    broadcast = torch.rand(1, 1, tokens, tokens, generator=torch.Generator().manual_seed(0)) < 0.8
    broadcast |= torch.eye(tokens, dtype=torch.bool)  # every token attends to itself
    assert model(x, attn_mask=broadcast).shape == (4, 10)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, attn_mask=broadcast), unconverted(x, attn_mask=broadcast))
        per_sample = broadcast.expand(4, 1, tokens, tokens)  # fine in eval: every sample runs
        assert torch.equal(model(x, attn_mask=per_sample), unconverted(x, attn_mask=per_sample))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_timm_resnet_batch_mode_dropped_block_leaves_its_input_to_autograd(memory_format):
    # A dropped block with an identity shortcut hands back its input (in channels_last, not
    # a permuted view of it); timm's in-place ReLU must not overwrite it (autograd needs the
    # previous ReLU's output).
    model = add_stochastic_depth(build("timm ResNet basic"), "uniform", 0.0, mode="batch").train()
    model.to(memory_format=memory_format)
    F.cross_entropy(model(images().to(memory_format=memory_format)), torch.arange(8) % 10).backward()
    assert all(not bool(g.last_active) for g in stochastic_depth_gates(model))
    assert model.conv1.weight.grad is not None


def _layouts(model, x):
    """``{name: [channels_last, ...]}``: each convolution's input and each block's output, per call."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):

            def input_hook(m, args, name=name):
                seen.setdefault(name, []).append(channels_last(args[0]))

            handles.append(m.register_forward_pre_hook(input_hook))
        elif isinstance(m, GatedBlock) or converted_class(type(m)) is not None:

            def output_hook(m, args, out, name=name):
                seen.setdefault(name, []).append(channels_last(out))

            handles.append(m.register_forward_hook(output_hook))
    model(x).sum().backward()
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["torchvision ConvNeXt", "timm ConvNeXt", "torchvision EfficientNet", "timm ResNet basic"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_row_subset_keeps_the_libraries_memory_layout(family, memory_format):
    """The gate's gather and scatter-add return NCHW tensors; the blocks put each tensor back
    in the layout the library gives it (ConvNeXt's blocks return channels_last tensors, and a
    model moved to channels_last stays so), where depthwise convolutions run ~3x faster."""
    unconverted = build(family).to(memory_format=memory_format).train()
    model = add_stochastic_depth(copy.deepcopy(unconverted), "uniform", 0.5, seed=0)  # k = 4 of 8: all run
    x = images().contiguous(memory_format=memory_format)
    expected = _layouts(unconverted, x)
    assert _layouts(model, x) == expected
    channels_last = any(any(flags) for flags in expected.values())
    assert channels_last == (memory_format == torch.channels_last or "ConvNeXt" in family)

def test_gates_start_in_the_mode_of_the_model_they_are_added_to():
    # Gates used to start in training mode: a model converted after .eval() drew at test time.
    import torchvision

    resnet = add_stochastic_depth(torchvision.models.resnet18(num_classes=10).eval(), seed=0)
    vit = add_stochastic_depth(build("timm ViT").eval(), seed=0)
    assert not any(g.training for g in stochastic_depth_gates(resnet) + stochastic_depth_gates(vit))
    x = images(2)
    with torch.no_grad():
        assert torch.equal(resnet(x), resnet(x))  # no draws: the same output twice


def test_without_timm_torchvision_models_are_still_converted(tmp_path):
    # timm is optional: a user with torch and torchvision only converts ResNets and
    # torchvision's blocks (a process where importing timm fails, as where it is not installed).
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['timm'] = None\n"
        "import torch, torchvision\n"
        "from resnet_with_stochastic_depth import add_stochastic_depth, stochastic_depth_gates\n"
        "from stochastic_depth import library_blocks\n"
        "resnet = add_stochastic_depth(torchvision.models.resnet18(num_classes=10), seed=0)\n"
        "convnext = add_stochastic_depth(torchvision.models.convnext_tiny(stochastic_depth_prob=0.4), seed=0)\n"
        "print(len(stochastic_depth_gates(resnet)), len(stochastic_depth_gates(convnext)),\n"
        "      sorted(library_blocks.__all__) == sorted(n for n in library_blocks.__all__ if hasattr(library_blocks, n)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["8", "18", "True"]


def test_a_model_built_without_a_drop_rate_warns_that_nothing_would_drop():
    # timm's drop_path_rate and torchvision's stochastic_depth_prob default to 0: keeping the
    # model's own rates would give gates that never drop, which the user should hear about.
    no_rate = TimmResNet(TimmBasicBlock, [1, 1, 1, 1], num_classes=10)
    with pytest.warns(UserWarning, match="drop rate of 0.*pass p_last"):
        add_stochastic_depth(no_rate, seed=0)
    assert {g.survival_prob for g in stochastic_depth_gates(no_rate)} == {1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_stochastic_depth(TimmResNet(TimmBasicBlock, [1, 1, 1, 1], num_classes=10), p_last=0.5, seed=0)
        add_stochastic_depth(build("timm ResNet basic"), seed=0)  # its own rates, some below 1


def test_a_block_used_twice_is_converted_once_and_stays_shared():
    block = build("timm ViT").blocks[-1]  # (a rate above 0)
    model = nn.Sequential(block, block)
    add_stochastic_depth(model, seed=0)
    assert model[0] is model[1] and isinstance(model[0], GatedBlock)
    assert len(stochastic_depth_gates(model)) == 2  # one block, two branches, called twice


def test_a_hook_handle_registered_before_converting_still_removes_its_hook():
    model = build("timm ViT")
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda m, args, out: calls.append(1))
    add_stochastic_depth(model, seed=0)
    model(images())
    assert calls == [1]
    handle.remove()
    model(images())
    assert calls == [1]
