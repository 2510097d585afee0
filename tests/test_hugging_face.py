"""Stochastic depth on Hugging Face transformers' vision models (stochastic_depth.hugging_face).

Each family is built from a tiny config (2-4 layers, 8-32 channels, 32x32 images, random
weights) with drop_path_rate 0.3, and checked against the same model unconverted: eval output,
the rates, what a dropped branch runs, the draws' frequencies, training output against
transformers' own masking with the gates' draws, state_dict keys, gradient checkpointing,
save_pretrained / from_pretrained, outputs and the refusals."""

import copy
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from stochastic_depth import add_stochastic_depth, set_step, stochastic_depth_gates  # noqa: E402
from stochastic_depth.hugging_face import FAMILIES, HuggingFaceLayer  # noqa: E402

RATE = 0.3
T = transformers
SMALL_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8, num_labels=3)  # fmt: skip
HIERARCHICAL = dict(num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                    patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], num_labels=3)  # fmt: skip
BUILDERS = {
    "Dinov2": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(**SMALL_VIT, drop_path_rate=RATE)),
    "Dinov2WithRegisters": lambda: T.Dinov2WithRegistersForImageClassification(
        T.Dinov2WithRegistersConfig(**SMALL_VIT, drop_path_rate=RATE, num_register_tokens=2)),
    "Beit": lambda: T.BeitForImageClassification(
        T.BeitConfig(**SMALL_VIT, drop_path_rate=RATE, use_relative_position_bias=True, layer_scale_init_value=0.1)),
    "Data2VecVision": lambda: T.Data2VecVisionForImageClassification(
        T.Data2VecVisionConfig(**SMALL_VIT, drop_path_rate=RATE, use_relative_position_bias=True, layer_scale_init_value=0.1)),
    "Swin": lambda: T.SwinForImageClassification(T.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, drop_path_rate=RATE,
        num_labels=3)),
    "Swinv2": lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4, drop_path_rate=RATE,
        num_labels=3)),
    "ConvNext": lambda: T.ConvNextForImageClassification(
        T.ConvNextConfig(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=RATE, num_labels=3)),
    "ConvNextV2": lambda: T.ConvNextV2ForImageClassification(
        T.ConvNextV2Config(hidden_sizes=[8, 16], depths=[2, 2], num_stages=2, drop_path_rate=RATE, num_labels=3)),
    "Segformer": lambda: T.SegformerForImageClassification(T.SegformerConfig(**HIERARCHICAL, drop_path_rate=RATE)),
    "PvtV2": lambda: T.PvtV2ForImageClassification(T.PvtV2Config(**HIERARCHICAL, drop_path_rate=RATE)),
    "FocalNet": lambda: T.FocalNetForImageClassification(T.FocalNetConfig(
        image_size=32, patch_size=2, embed_dim=8, depths=[2, 2], focal_levels=[2, 2], focal_windows=[3, 3],
        drop_path_rate=RATE, num_labels=3)),
    "GLPN": lambda: T.GLPNModel(T.GLPNConfig(**{k: v for k, v in HIERARCHICAL.items() if k != "num_labels"},
                                             drop_path_rate=RATE)),
    # (its last layers get a per-sample attention mask in training, which a row mode cuts to the kept samples)
    "EoMT": lambda: T.EomtForUniversalSegmentation(T.EomtConfig(**SMALL_VIT, num_queries=5, num_blocks=2,
                                                                drop_path_rate=RATE)),
}  # fmt: skip
# The output compared, where it is not `logits`.
OUTPUTS = {"GLPN": "last_hidden_state", "EoMT": "masks_queries_logits"}


def output(family, out):
    return getattr(out, OUTPUTS.get(family, "logits"))


def loss(family, out):
    return output(family, out).square().mean()


def build(family, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[family]()


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def layers(model):
    return [m for m in model.modules() if isinstance(m, HuggingFaceLayer)]


def branch_modules(layer):
    """``{gate: [submodules]}`` of a converted layer, from its declaration (``BRANCHES``)."""
    return {gate: [getattr(layer, n) for n in names if isinstance(getattr(layer, n, None), nn.Module)]
            for gate, names in type(layer).BRANCHES.items()}  # fmt: skip


def is_drop_path(module):
    return type(module).__name__.endswith("DropPath")


def own_rates(model):
    """The drop probability of each residual branch the transformers model drops, in forward order:
    its drop-path module's ``drop_prob`` (0 for the ``nn.Identity`` at rate 0), once per branch."""
    rates = []
    for module in model.modules():
        name = f"{type(module).__module__.removeprefix('transformers.models.')}.{type(module).__name__}"
        if name in FAMILIES:
            drop_path = module.drop_path
            rates += [getattr(drop_path, "drop_prob", 0.0)] * len(FAMILIES[name].GATES)
    return rates


@pytest.mark.parametrize("family", BUILDERS)
def test_eval_output_and_hidden_states_are_exactly_the_unconverted_models(family):
    unconverted = build(family).eval()
    model = add_stochastic_depth(copy.deepcopy(unconverted), seed=0)
    x = images()
    with torch.no_grad():
        expected, out = unconverted(pixel_values=x, output_hidden_states=True), model(pixel_values=x, output_hidden_states=True)
    assert torch.equal(output(family, out), output(family, expected))
    assert len(out.hidden_states) == len(expected.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, expected.hidden_states))


@pytest.mark.parametrize("family", BUILDERS)
def test_gates_keep_the_models_own_rates_per_sample_inverted_under_the_transformers_class_name(family):
    unconverted = build(family)
    rates = own_rates(unconverted)
    names = {n: type(m).__name__ for n, m in unconverted.named_modules()}
    library_classes = {n: type(m) for n, m in unconverted.named_modules()}
    model = add_stochastic_depth(unconverted)
    gates = stochastic_depth_gates(model)
    assert [1 - g.survival_prob for g in gates] == pytest.approx(rates, abs=1e-12)
    assert max(rates) == pytest.approx(RATE) and len(rates) >= 4
    assert all(g.mode == "row_subset" and g.inverted for g in gates)
    assert not any(is_drop_path(m) for m in model.modules())
    # transformers and accelerate find layers by class name (_no_split_modules, FSDP auto-wrap).
    modules = dict(model.named_modules())
    converted = [n for n, m in modules.items() if isinstance(m, HuggingFaceLayer)]
    assert converted
    assert all(isinstance(modules[n], library_classes[n]) and type(modules[n]).__name__ == names[n] for n in converted)


@pytest.mark.parametrize("family", BUILDERS)
def test_state_dict_keys_and_values_are_unchanged(family):
    unconverted = build(family)
    reference = copy.deepcopy(unconverted.state_dict())
    state = add_stochastic_depth(unconverted).state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    build(family, seed=5).load_state_dict(state)  # strict, into the unconverted class


@pytest.mark.parametrize("family", BUILDERS)
def test_a_dropped_branch_does_not_run_and_its_parameters_keep_no_gradient(family):
    model = add_stochastic_depth(build(family), "uniform", 0.5, mode="batch", seed=3).train()
    calls = set()
    for layer in layers(model):
        for modules in branch_modules(layer).values():
            for m in modules:
                m.register_forward_hook(lambda m, args, out: calls.add(m))
    x = images()
    dropped = kept = 0
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss(family, model(pixel_values=x)).backward()
        for layer in layers(model):
            for gate, modules in branch_modules(layer).items():
                active = bool(getattr(layer, gate).last_active)
                dropped, kept = dropped + (not active), kept + active
                assert all((m in calls) == active for m in modules), (layer, gate)
                assert all((p.grad is not None) == active for m in modules for p in m.parameters()), (layer, gate)
    assert dropped and kept  # the seed gives both cases


@pytest.mark.parametrize("family", BUILDERS)
def test_each_gates_drop_frequency_is_its_rate(family):
    # Row mode: one draw per sample and gate, 30 passes of 16 samples; within 4.5 standard deviations.
    model = add_stochastic_depth(build(family), mode="row", seed=0).train()
    gates = [g for g in stochastic_depth_gates(model) if g.survival_prob < 1]
    kept = torch.zeros(len(gates))
    passes, n = 30, 16
    with torch.no_grad():
        for step in range(passes):
            set_step(model, step)
            model(pixel_values=images(n))
            kept += torch.stack([g.last_active.float().sum() for g in gates])
    for count, gate in zip(kept.tolist(), gates):
        p, trials = gate.survival_prob, passes * n
        assert abs(count - trials * p) <= 4.5 * math.sqrt(trials * p * (1 - p)), (gate, count / trials)


class Replay(nn.Module):
    """transformers' drop path with given draws: the i-th call multiplies by the i-th mask / keep."""

    def __init__(self, masks):
        super().__init__()
        self.masks = masks

    def forward(self, h):
        mask = self.masks.pop(0)
        return h * mask.view(-1, *[1] * (h.dim() - 1)) * (mask.numel() / mask.sum())


# (EoMT's mask annealing draws from torch's generator in training, as the gates do: the two models'
# masks would differ. Its row-mode training, with the kept samples' rows of its mask, runs in the test above.)
@pytest.mark.parametrize("family", [f for f in BUILDERS if f != "EoMT"])
def test_training_output_is_transformers_masking_with_the_gates_draws(family):
    """Hand-built reference: the unconverted model, its drop paths replaced by masks with the draws
    the gates made (row_subset: scaled by B / k), runs transformers' own forward on the whole batch.
    The converted model runs each branch on the kept samples only: equal up to float rounding."""
    unconverted = build(family).train()
    model = add_stochastic_depth(copy.deepcopy(unconverted), seed=0).train()
    x = images(8)
    with torch.no_grad():
        out = output(family, model(pixel_values=x))
    masks = [g.last_active.clone() for g in stochastic_depth_gates(model)]
    for layer in [m for m in unconverted.modules() if hasattr(m, "drop_path") and not isinstance(m, nn.ModuleList)]:
        gates = len(FAMILIES[f"{type(layer).__module__.removeprefix('transformers.models.')}.{type(layer).__name__}"].GATES)
        layer.drop_path = Replay([masks.pop(0) for _ in range(gates)])
    assert not masks
    with torch.no_grad():
        expected = output(family, unconverted(pixel_values=x))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _count_checkpoints(model):
    """Wrap each layer's checkpoint function (set by gradient_checkpointing_enable) to count its calls."""
    counts = {}
    for name, module in model.named_modules():
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is not None:
            def counted(*args, _name=name, _function=function, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _function(*args, **kwargs)
            module._gradient_checkpointing_func = counted
    return counts


@pytest.mark.parametrize("family", [f for f in BUILDERS if build(f).supports_gradient_checkpointing])
def test_gradient_checkpointing_checkpoints_every_layer_it_did_with_the_same_drops(family):
    x = images()

    def checkpointed(model):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        counts = _count_checkpoints(model.train())
        loss(family, model(pixel_values=x)).backward()
        return counts

    before = checkpointed(build(family))
    assert before, "the family checkpoints nothing: pick another"
    model = add_stochastic_depth(build(family), seed=4)
    reference = copy.deepcopy(model).train()  # the same gates (seed 4): the same drops
    assert checkpointed(model) == before
    loss(family, reference(pixel_values=x)).backward()
    assert [bool(g.last_active.any()) for g in stochastic_depth_gates(model)] == [
        bool(g.last_active.any()) for g in stochastic_depth_gates(reference)]
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(b.grad, a.grad, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("family", ["Dinov2", "Swin", "ConvNextV2"])
def test_save_pretrained_writes_the_original_model_and_converting_it_again_gives_the_same_gates(family, tmp_path):
    model = add_stochastic_depth(build(family), seed=7)
    model.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(isinstance(m, HuggingFaceLayer) for m in loaded.modules())  # the architecture as transformers has it
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert loaded.config.drop_path_rate == RATE
    add_stochastic_depth(loaded, seed=7)
    x = images()
    for m in (model, loaded):
        set_step(m.train(), 3)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits, atol=0, rtol=0)
    assert [g.last_active.tolist() for g in stochastic_depth_gates(loaded)] == [
        g.last_active.tolist() for g in stochastic_depth_gates(model)]


def test_no_split_modules_still_find_every_layer():
    from transformers.trainer_pt_utils import get_module_class_from_name

    model = add_stochastic_depth(build("Dinov2"))
    assert "Dinov2Layer" in model._no_split_modules
    found = get_module_class_from_name(model, "Dinov2Layer")
    assert found is not None and all(isinstance(layer, found) for layer in model.dinov2.encoder.layer)


def test_attentions_in_training_hold_the_samples_that_kept_the_attention_branch():
    model = build("Dinov2")
    model.set_attn_implementation("eager")  # (SDPA returns no attention weights)
    model = add_stochastic_depth(model, "uniform", 0.5, seed=0).train()  # row_subset: 4 of 8 samples
    out = model(pixel_values=images(8), output_attentions=True, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape[0] == 8 for h in out.hidden_states)
    assert [a.shape[0] for a in out.attentions] == [4] * model.config.num_hidden_layers


def test_a_converted_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    model = add_stochastic_depth(build("Swin"), seed=0).eval()
    x = images()
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, model(pixel_values=x).logits)
    torch.save({"model": model, "x": x, "logits": model(pixel_values=x).logits.detach()}, tmp_path / "model.pt")
    code = (
        "import torch; saved = torch.load(r'%s', weights_only=False); m = saved['model'];"
        "assert torch.equal(m(pixel_values=saved['x']).logits, saved['logits']); print(type(m.swin.encoder.layers[0].blocks[0]))"
    ) % (tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stochastic_depth.hugging_face.SwinLayer" in result.stdout


def test_refused_families_name_the_layer_and_why_and_change_nothing():
    config = T.CvtConfig(num_labels=3, embed_dim=[8, 16, 16], num_heads=[1, 2, 2], depth=[1, 2, 3], drop_path_rate=[0.1, 0.2, 0.3])
    model = T.CvtForImageClassification(config)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"CvtLayer\).* drops the whole layer output, the residual included"):
        add_stochastic_depth(model)
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_an_unknown_transformers_layer_with_a_drop_path_is_refused_naming_the_supported_ones():
    config = T.VitDetConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                            pretrain_image_size=32, drop_path_rate=0.2)  # fmt: skip
    model = T.VitDetModel(config)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"VitDetDropPath.*VitDetLayer is not one of the transformers layers.*Dinov2Layer"):
        add_stochastic_depth(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
