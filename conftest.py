"""Shared test setup: a headless matplotlib backend, MNIST loaded once per session, and a
check that two copies of a stochastic model train alike.

It sits at the repository root so that pytest puts the root on ``sys.path`` when it loads it:
the tests import this checkout's experiment modules (``training``, ``study``, ...), which are
not installed, and the library from the checkout, with ``pytest`` or ``python -m pytest``.
"""

import matplotlib
import pytest
import torch
import torch.nn.functional as F

matplotlib.use("Agg")  # tests only; the notebook keeps its inline backend

import utils  # noqa: E402  (after choosing the backend)


@pytest.fixture(scope="session")
def mnist():
    """The vendored MNIST as ``(train, test)``, loaded once for all tests."""
    return utils.load_mnist()


@pytest.fixture
def assert_trains_alike():
    """``check(reference, other, x, y, atol, grad_atol)``: `other` (a compiled copy, say) of a
    stochastic model draws the same blocks as `reference`, gives close outputs over three
    training passes, and ends with close gradients on the same parameters."""

    def check(reference, other, x, y, *, atol, grad_atol):
        for _ in range(3):
            out, other_out = reference(x), other(x)
            assert torch.equal(reference.active_blocks, other.active_blocks)
            torch.testing.assert_close(other_out, out, atol=atol, rtol=atol)
            F.cross_entropy(out, y).backward()
            F.cross_entropy(other_out, y).backward()
        for (name, a), b in zip(reference.named_parameters(), other.parameters()):
            assert (a.grad is None) == (b.grad is None), name
            assert a.grad is None or torch.allclose(b.grad, a.grad, atol=grad_atol, rtol=grad_atol), name

    return check
