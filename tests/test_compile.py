"""torch.compile of models with gates, against the same models eager: ``torch.compile(model)``
(the idiom) and regional compilation (``compile_branches``), for every converted family.

What dynamo captures, guards on and recompiles does not depend on the backend, so these tests
compile with backend="eager" (dynamo only) or "aot_eager" (also AOTAutograd's forward and
backward graphs), which compile no kernels; inductor compiles one tiny model. The families are
test_library_blocks.py's, small (a few blocks, 32x32 images), and this project's ResNets. Also here:
compiled and exported evaluation networks, and copies and pickles of a compile_branches model."""

import copy
import io

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
import torchvision
from test_drops_in_training_code import converted_resnet18
from test_library_blocks import FAMILIES, HUGGING_FACE, images
from test_resnet_with_stochastic_depth import batch, tiny_pair
from timm.models.vision_transformer import VisionTransformer
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from resnet_with_stochastic_depth import (
    StochasticResNet,
    add_stochastic_depth,
    stochastic_depth_gates,
    stochastic_depth_state,
)
from stochastic_depth.compilation import compile_branches

MODES = ("batch", "row", "row_subset")


ALL_FAMILIES = {
    **FAMILIES,
    "StochasticResNet (CIFAR ResNet-14)": lambda: StochasticResNet.cifar(14, num_classes=10),
    "torchvision ResNet-18": lambda: add_stochastic_depth(torchvision.models.resnet18(num_classes=10), p_last=0.5),
    **HUGGING_FACE,
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled code, and fails where dynamo would silently run eagerly."""
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def converted(family, mode, seed=3):
    torch.manual_seed(0)
    model = ALL_FAMILIES[family]()
    # (Every gate drops at 0.5 or less, so that each mode skips something in a few passes.)
    return add_stochastic_depth(model, "linear", 0.5, mode=mode, seed=seed).train()


def assert_trains_alike(reference, other, x, y, *, atol, grad_atol):
    """`other` (a compiled copy of `reference`) draws the same branches and samples over three
    training passes, gives close losses, and ends with close gradients on the same parameters."""
    module = getattr(other, "_orig_mod", other)
    for _ in range(3):
        loss, other_loss = F.cross_entropy(reference(x), y), F.cross_entropy(other(x), y)
        for a, b in zip(stochastic_depth_gates(reference), stochastic_depth_gates(module), strict=True):
            assert torch.equal(a.last_active, b.last_active)
        torch.testing.assert_close(other_loss, loss, atol=atol, rtol=atol)
        loss.backward(), other_loss.backward()
    for (name, a), b in zip(reference.named_parameters(), module.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(b.grad, a.grad, atol=grad_atol, rtol=grad_atol), name


def labels(n=8):
    return torch.randint(10, (n,), generator=torch.Generator().manual_seed(2))


# ---------------------------------------------------------------------------------- torch.compile of the whole model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_torch_compile_of_the_model_trains_like_eager(family, mode):
    eager = converted(family, mode)
    compiled = torch.compile(copy.deepcopy(eager), backend="eager")
    # The same drops, losses and gradients, exactly: dynamo runs the same operations (the eager
    # backend compiles no kernels), and the gates draw outside any graph.
    assert_trains_alike(eager, compiled, images(), labels(), atol=0, grad_atol=0)
    assert not all(gate.last_active.all() for gate in stochastic_depth_gates(eager))  # something was skipped


@pytest.mark.parametrize("mode", MODES)
def test_torch_compile_with_aot_autograd_trains_like_eager(mode):
    eager = converted("timm ViT", mode)
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    assert_trains_alike(eager, compiled, images(), labels(), atol=1e-5, grad_atol=1e-4)


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


def vit(depth):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, drop_path_rate=0.5,
                              num_classes=10)
    return add_stochastic_depth(model, mode="row_subset", seed=0)


@pytest.mark.parametrize(
    "make, depths",
    [(lambda depth: StochasticResNet.imagenet(depth, num_classes=10, seed=0), (101, 152)), (vit, (4, 24))],
    ids=["resnet-batch", "vit-row_subset"],
)
def test_torch_compile_reaches_no_recompile_limit_in_deep_networks(make, depths):
    # fail_on_recompile_limit_hit (the fixture) turns the limit's silent eager fallback into an error.
    # Each kind of branch (a ResNet's 8 and 4 shortcuts, a ViT's 2) is compiled as a region of its
    # own: a deeper network of the same kinds of block compiles no more graphs.
    graphs = []
    for depth in depths:
        torch._dynamo.reset()
        counters.clear()
        model = torch.compile(make(depth).train(), backend="eager")
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            F.cross_entropy(model(x), labels(4)).backward()
        graphs.append(counters["stats"]["unique_graphs"])
        assert "recompile_limit" not in str(counters["stats"])
    assert graphs[0] > 0 and graphs[1] == graphs[0], graphs


@pytest.mark.parametrize("mode", MODES)
def test_compiling_stops_after_the_first_steps(mode):
    # The gates' numbers (probability, index, step, passes) reach no guard: later steps, which
    # draw other blocks and other samples, run what was compiled.
    counter = CompileCounter()
    model = torch.compile(converted("StochasticResNet (CIFAR ResNet-14)", mode, seed=0), backend=counter)
    steps = []
    for _ in range(12):
        F.cross_entropy(model(images()), labels()).backward()
        steps.append(counter.frame_count)
    assert steps[4:] == [steps[3]] * 8, steps


@pytest.mark.parametrize("family", ["timm ViT", "StochasticResNet (CIFAR ResNet-14)"])
def test_later_steps_convert_no_frame(family):
    # After the first steps every frame either hits its compiled code or is skipped by a flag on
    # its code. A gate or block disabled with torch.compiler.disable(recursive=False) would be
    # handed to dynamo's frame conversion at every call, to learn once more that it must skip
    # it (about 1 ms each, 7% of a ViT-S step on a CPU); counters["frames"] counts those calls.
    model = torch.compile(converted(family, "row_subset", seed=0), backend="eager")
    for _ in range(3):
        F.cross_entropy(model(images()), labels()).backward()
    counters.clear()
    for _ in range(3):
        F.cross_entropy(model(images()), labels()).backward()
    assert counters["frames"]["total"] == 0, dict(counters["frames"])


def test_fullgraph_in_training_says_what_to_use_instead():
    model = torch.compile(converted("timm ViT", "batch"), fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"without fullgraph=True.*compile_branches"):
        model(images())
    model.eval()
    with torch.no_grad():
        model(images())  # one graph in eval mode


def test_inductor_compiles_a_converted_convnext_in_a_row_mode():
    # The issue's ConvNeXt failed at its first compiled training step ("cannot determine truth
    # value of Relational") from layout checks on the dynamic batch of kept samples, now eager.
    eager = converted("torchvision ConvNeXt", "row_subset")
    compiled = torch.compile(copy.deepcopy(eager))
    assert_trains_alike(eager, compiled, images(4), labels(4), atol=1e-4, grad_atol=1e-3)


# ---------------------------------------------------------------------------------- compile_branches


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_compile_branches_trains_like_eager_for_every_family(family, mode):
    eager = converted(family, mode)
    compiled = compile_branches(copy.deepcopy(eager), backend="eager")
    assert all(gate.compile_options == {"backend": "eager"} for gate in stochastic_depth_gates(compiled))
    assert_trains_alike(eager, compiled, images(), labels(), atol=0, grad_atol=0)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(images()), eager(images()), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["batch", "row_subset"])
def test_compile_branches_matches_eager_in_train_and_eval(mode, assert_trains_alike):
    _, eager = tiny_pair(mode=mode, p_last=0.5, seed=21)
    compiled = compile_branches(copy.deepcopy(eager), backend="aot_eager")
    x, y = batch(8)
    assert_trains_alike(eager, compiled, x, y, atol=1e-5, grad_atol=1e-4)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


def test_compile_branches_compiles_each_kind_of_branch_once_and_shares_it():
    # A 4-block ViT has two kinds of branch (attention, MLP), whatever its depth; a deep copy (an
    # EMA model) and a pickled copy run the same two compiled regions.
    model = compile_branches(converted("timm ViT", "row_subset"), backend="eager")
    for m in (model, copy.deepcopy(model), torch.load(io.BytesIO(_saved(model)), weights_only=False)):
        F.cross_entropy(m(images()), labels()).backward()
        assert all(gate.compile_options == {"backend": "eager"} for gate in stochastic_depth_gates(m))
    # One graph each: the kept samples are a new batch size at every gate, compiled for any.
    assert counters["stats"]["unique_graphs"] == 2


def _saved(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


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


def test_a_compiled_branches_model_pickles_whole_and_deep_copies():
    model = compile_branches(StochasticResNet.cifar(14, mode="row_subset", seed=2), backend="eager")
    x, _ = batch(8, size=8)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        # Compiled with the same options (found in this process's regions), with the same seed and
        # pass counts: the same steps as an eager twin.
        assert all(gate.compile_options == {"backend": "eager"} for gate in stochastic_depth_gates(twin))
        eager = StochasticResNet.cifar(14, mode="row_subset", seed=2)
        eager.load_state_dict(model.state_dict())
        for _ in range(2):
            assert torch.equal(twin(x), eager(x)) and torch.equal(twin.active_blocks, eager.active_blocks)
        twin.eval(), eager.eval()
        assert torch.equal(twin(x), eager(x))


# ---------------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("family", ["timm ViT", "torchvision ConvNeXt"])
def test_a_compiled_evaluation_compiles_once_for_every_drop_scale(family):
    # An evaluation during a drop warm-up: the gates (inverted, the libraries' convention) read
    # drop_scale only where it matters, so no guard on it; before, each value compiled anew.
    torch.manual_seed(0)
    model = add_stochastic_depth(FAMILIES[family]()).eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for tenth in range(1, 11):
            stochastic_depth_state(model).drop_scale = tenth / 10
            assert torch.equal(compiled(images()), model(images()))
    assert counters["stats"]["unique_graphs"] == 1



@pytest.mark.parametrize("family", ["timm ViT", "StochasticResNet (CIFAR ResNet-14)"])
def test_a_compiled_eval_pass_records_every_block_as_active(family):
    # What an eager eval pass records (docs/pytorch-tools.md, "Seeing the drops"): after a
    # training pass that dropped something, a compiled eval pass, one graph, sets every gate's
    # last_active to True, also when it runs again after more training.
    model = converted(family, "row_subset", seed=0)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(2):
        model.train()
        model(images())
        assert not all(bool(g.last_active.all()) for g in stochastic_depth_gates(model))
        model.eval()
        with torch.no_grad():
            compiled(images())
        assert all(g.last_active.shape == () and bool(g.last_active) for g in stochastic_depth_gates(model))
    assert counter.frame_count == 1
    if isinstance(model, StochasticResNet):
        assert model.active_blocks.all()


@pytest.mark.parametrize("make", [lambda: StochasticResNet.cifar(20, seed=0), lambda: converted_resnet18()],
                         ids=["StochasticResNet", "converted-resnet18"])
def test_an_eval_model_compiles_as_one_graph_and_exports(make):
    model = make()
    x, y = batch(4, size=16)
    F.cross_entropy(model(x), y).backward()  # a training pass first: BatchNorm statistics moved
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        exported = torch.export.export(model, (x,)).module()(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)
