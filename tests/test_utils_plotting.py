"""utils.draw and utils.draw_runs: lines, labels, legend, smoothing and clear errors."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

import utils


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def ewm_by_definition(values, span):
    """pandas' ewm(span).mean(), written out: weights (1 - alpha)**age over the finite values."""
    alpha = 2 / (span + 1)
    result = []
    for t in range(len(values)):
        pairs = [((1 - alpha) ** (t - i), v) for i, v in enumerate(values[: t + 1]) if math.isfinite(v)]
        weight = sum(w for w, _ in pairs)
        result.append(sum(w * v for w, v in pairs) / weight if pairs else math.nan)
    return result


def test_draw_with_the_seeds_arguments(tmp_path):
    rng = np.random.default_rng(0)
    resnet_acc = list(np.clip(np.linspace(0.5, 0.99, 200) + rng.normal(0, 0.05, 200), 0, 1))
    stochastic_acc = list(np.clip(np.linspace(0.4, 0.98, 150) + rng.normal(0, 0.05, 150), 0, 1))

    axis = utils.draw(resnet_acc, "ResNet", stochastic_acc, "Stochastic", window=20, type_data="accuracy")

    assert axis.get_xlabel() == "Iteration" and axis.get_ylabel() == "accuracy"
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["ResNet", "Stochastic"]
    smoothed = {line.get_label(): line for line in axis.get_lines() if not line.get_label().startswith("_")}
    raw = [line for line in axis.get_lines() if line.get_label().startswith("_")]
    assert len(smoothed) == 2 and len(raw) == 2
    np.testing.assert_allclose(smoothed["ResNet"].get_ydata(), ewm_by_definition(resnet_acc, 20))
    np.testing.assert_array_equal(raw[1].get_ydata(), stochastic_acc)
    assert list(smoothed["Stochastic"].get_xdata()[[0, -1]]) == [1, 150]  # curves keep their own lengths
    assert raw[0].get_alpha() < 1 and raw[0].get_color() == smoothed["ResNet"].get_color()

    axis.figure.savefig(tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_into_a_given_axis_with_bounds():
    figure, (left, right) = plt.subplots(1, 2)
    axis = utils.draw([3.0, 2.0, 1.0], "loss", window=1, type_data="loss", bound=[0, 10, 0, 4], axis=right)
    assert axis is right and not left.get_lines()
    assert axis.axis() == (0, 10, 0, 4)
    assert list(axis.get_lines()[0].get_ydata()) == [3.0, 2.0, 1.0]  # window=1: no smoothing


def test_draw_skips_non_finite_values_in_the_smoothing():
    values = [math.nan, 1.0, math.inf, 0.0, math.nan, 1.0]
    axis = utils.draw(values, "with gaps", window=3)
    smoothed = axis.get_lines()[0].get_ydata()
    assert math.isnan(smoothed[0])
    np.testing.assert_allclose(smoothed[1:], ewm_by_definition(values, 3)[1:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(first=[], first_label="empty"), "'empty': need a non-empty sequence"),
        (dict(first=[math.nan, math.nan], first_label="nan"), "'nan': no finite value"),
        (dict(first=[[1, 2], [3, 4]], first_label="2d"), r"'2d': need a non-empty sequence .* shape \(2, 2\)"),
        (dict(first=[1.0], first_label="a", second=[2.0]), "second_label is needed"),
        (dict(first=[1.0], first_label="a", window=0), "window must be at least 1"),
        (dict(first=[1.0], first_label="a", bound=[0, 1]), r"bound must be \[xmin, xmax, ymin, ymax\]"),
    ],
)
def test_draw_rejects_bad_input_before_drawing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        utils.draw(**kwargs)
    assert not plt.get_fignums()  # no half-drawn figure left behind


def test_draw_runs_mean_and_band(tmp_path):
    runs = {
        "ResNet": [[0.5, 0.6, 0.7, 0.8], [0.7, 0.8, 0.9, 1.0]],
        "Stochastic": [[0.4, 0.5, 0.6], [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]],
    }
    axis = utils.draw_runs(runs, window=1, type_data="accuracy")

    legend = [t.get_text() for t in axis.get_legend().get_texts()]
    assert legend == ["ResNet (mean ± 1 std, 2 runs)", "Stochastic (mean ± 1 std, 3 runs)"]
    np.testing.assert_allclose(axis.get_lines()[0].get_ydata(), [0.6, 0.7, 0.8, 0.9])
    band = axis.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.5) and band.max() == pytest.approx(1.0)  # mean ± 0.1
    assert len(axis.collections) == 2
    axis.figure.savefig(tmp_path / "runs.png")


def test_draw_runs_rejects_runs_of_different_lengths():
    with pytest.raises(ValueError, match=r"'ResNet': runs have different lengths \[2, 3\]"):
        utils.draw_runs({"ResNet": [[1, 2, 3], [1, 2]]})
    with pytest.raises(ValueError, match="'ResNet': no runs"):
        utils.draw_runs({"ResNet": []})
