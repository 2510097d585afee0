"""torch.compile of models with gates, against the same models eager: ``torch.compile(model)``
(the idiom) and regional compilation (``compile_branches``), for every converted family.

What dynamo captures, guards on and recompiles does not depend on the backend, so these tests
compile with backend="eager" (dynamo only) or "aot_eager" (also AOTAutograd's forward and
backward graphs), which compile no kernels; inductor compiles one tiny model. The families are
test_library_blocks.py's, small (a few blocks, 32x32 images), and this project's ResNets."""

import copy
import io

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
import torchvision
from test_library_blocks import FAMILIES, images
from timm.models.vision_transformer import VisionTransformer
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from resnet_with_stochastic_depth import StochasticResNet, add_stochastic_depth, stochastic_depth_gates
from stochastic_depth.compilation import compile_branches

MODES = ("batch", "row", "row_subset")
ALL_FAMILIES = {
    **FAMILIES,
    "StochasticResNet (CIFAR ResNet-14)": lambda: StochasticResNet.cifar(14, num_classes=10),
    "torchvision ResNet-18": lambda: add_stochastic_depth(torchvision.models.resnet18(num_classes=10), p_last=0.5),
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


def test_inductor_compiles_a_converted_convnext_in_a_row_mode():
    # The issue's ConvNeXt failed at its first compiled training step ("cannot determine truth
    # value of Relational") from layout checks on the dynamic batch of kept samples, now eager.
    eager = converted("torchvision ConvNeXt", "row_subset")
    compiled = torch.compile(copy.deepcopy(eager))
    assert_trains_alike(eager, compiled, images(4), labels(4), atol=1e-4, grad_atol=1e-3)
