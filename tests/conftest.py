"""Shared test setup: a headless matplotlib backend and MNIST loaded once per session."""

import matplotlib
import pytest

matplotlib.use("Agg")  # tests only; the notebook keeps its inline backend

import utils  # noqa: E402  (after choosing the backend)


@pytest.fixture(scope="session")
def mnist():
    """The vendored MNIST as ``(train, test)``, loaded once for all tests."""
    return utils.load_mnist()
