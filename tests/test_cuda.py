"""CUDA checks of the stochastic-depth ResNets; skipped on machines without a GPU.

(torch.compile with inductor on CUDA is also tested in test_compile.py.)
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from resnet_with_stochastic_depth import StochasticResNet
from stochastic_depth.compilation import compile_branches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")



@pytest.fixture(autouse=True)
def full_float32_precision():
    """Compare against the CPU in full float32 precision: TF32 off for each of these tests only."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def model_and_batch(mode="batch", size=16, n=32):
    torch.manual_seed(0)
    model = StochasticResNet.cifar(14, mode=mode, p_last=0.5, seed=1)
    x = torch.randn(n, 3, size, size)
    y = torch.randint(10, (n,))
    return model, x, y


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_cuda_matches_cpu_with_the_same_seed(mode):
    model, x, y = model_and_batch(mode)
    on_gpu = copy.deepcopy(model).cuda()
    for _ in range(3):
        out_cpu, out_gpu = model(x), on_gpu(x.cuda())
        assert torch.equal(model.active_blocks, on_gpu.active_blocks)  # the draws stay on the CPU generator
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=1e-4, rtol=1e-4)
        F.cross_entropy(out_gpu, y.cuda()).backward()
    model.eval(), on_gpu.eval()
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(x.cuda()).cpu(), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_training_step_never_waits_for_the_gpu(mode):
    model, x, y = model_and_batch(mode)
    model.cuda()
    x, y = x.cuda(), y.cuda()
    F.cross_entropy(model(x), y).backward()  # warm-up: cuDNN autotuning may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            F.cross_entropy(model(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The debug mode misses some waits (a copy from pageable memory, for one): keep the GPU
    # busy for about a second and check that a whole step was queued before it finished.
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    F.cross_entropy(model(x), y).backward()
    assert not torch.cuda.current_stream().query(), "the step waited for the GPU"
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["batch", "row", "row_subset"])
def test_cuda_autocast(dtype, mode):
    model, x, y = model_and_batch(mode)
    model.cuda().to(memory_format=torch.channels_last)
    x = x.cuda().to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y.cuda())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("mode", ["row", "row_subset"])
def test_the_gpu_draws_what_the_cpu_draws(mode):
    # Decisions are drawn on the host from the pass's key, whatever the input's device.
    model, x, y = model_and_batch(mode)
    twin = copy.deepcopy(model).cuda()
    out, out_cuda = model(x), twin(x.cuda())
    assert torch.equal(model.active_blocks, twin.active_blocks.cpu())
    torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-4, rtol=1e-4)


def test_compile_branches_with_inductor_matches_eager(assert_trains_alike):
    model, x, y = model_and_batch("row_subset")
    model.cuda()
    compiled = compile_branches(copy.deepcopy(model), backend="inductor")
    assert_trains_alike(model, compiled, x.cuda(), y.cuda(), atol=1e-3, grad_atol=1e-2)
