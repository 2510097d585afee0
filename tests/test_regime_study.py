"""regime_study.py: the map recomputes from the run files (change one, the verdict changes), against
scipy's paired t interval; and a tiny run evaluated again from its checkpoint."""

import json

import pytest
import scipy.stats
import torch
from test_compare_runs import write_run
from test_train import cifar_argv, fake_cifar  # noqa: F401  (the fixture)

import regime_study
import train


def write_cell(root, depth, size, plain_errors, sd_errors, plain_bn, sd_bn):
    cell = root / f"d{depth}-n{size}"
    for model, errors, bn in (("plain", plain_errors, plain_bn), ("sd", sd_errors, sd_bn)):
        for seed, (error, after) in enumerate(zip(errors, bn)):
            folder = write_run(cell / f"{model}-seed{seed}", seed, error, plain=model == "plain", depth=depth,
                               epoch_s=10.0 if model == "plain" else 7.0)
            evaluation = {"test_error": error, "train_error": error / 2, "test_error_bn": after, "train_error_bn": after / 2}
            (folder / "evaluation.json").write_text(json.dumps(evaluation))


def test_the_map_recomputes_from_the_files_and_follows_them(tmp_path):
    plain, sd = [0.20, 0.22, 0.21], [0.25, 0.26, 0.27]
    write_cell(tmp_path, 110, 5504, plain, sd, plain_bn=[0.20, 0.22, 0.21], sd_bn=[0.19, 0.215, 0.20])
    (row,) = regime_study.regime_map(tmp_path)
    assert (row["depth"], row["train_images"], row["seeds"]) == (110, 5504, [0, 1, 2])
    points = [100 * (s - p) for s, p in zip(sd, plain)]
    d = row["test"]["difference_points"]
    interval = scipy.stats.t.interval(0.95, 2, loc=sum(points) / 3, scale=scipy.stats.sem(points))
    assert d["mean"] == pytest.approx(5.0) and d["ci95"] == pytest.approx(list(interval))
    assert "higher with stochastic depth" in regime_study.verdict(row)
    bn = row["test_bn"]["difference_points"]
    assert bn["mean"] == pytest.approx(100 * (sum([0.19, 0.215, 0.20]) - sum(plain)) / 3)
    assert "lower with stochastic depth" in regime_study.verdict(row, "test_bn")
    assert (d["verdict"], bn["verdict"]) == ("higher", "lower")  # map.json words errors, not "better"
    assert row["step_time_ratio"]["mean"] == pytest.approx(0.7)
    assert "| 110 | 5,504 | 3 |" in regime_study.map_table([row])

    # One file changed: the plain seed 1 run was much worse; the verdict follows.
    path = tmp_path / "d110-n5504" / "plain-seed1" / "metrics.json"
    run = json.loads(path.read_text())
    run["summary"]["final_test_error"] = 0.40
    path.write_text(json.dumps(run))
    (row,) = regime_study.regime_map(tmp_path)
    assert "no difference detectable" in regime_study.verdict(row)


def test_a_cell_with_one_seed_is_left_out_and_an_unfinished_run_is_not_counted(tmp_path):
    write_cell(tmp_path, 20, 55000, [0.1, 0.1], [0.12, 0.13], [0.1, 0.1], [0.12, 0.13])
    path = tmp_path / "d20-n55000" / "sd-seed1" / "metrics.json"
    run = json.loads(path.read_text())
    run["summary"]["epochs_done"] = 1
    path.write_text(json.dumps(run))
    assert regime_study.cells(tmp_path)[20, 55000]["sd"].keys() == {0}
    assert regime_study.regime_map(tmp_path) == []


def test_a_trained_run_is_evaluated_again_from_its_checkpoint(fake_cifar, tmp_path):  # noqa: F811
    out = tmp_path / "d8-n80" / "sd-seed0"
    train.main(cifar_argv(fake_cifar, out, "--epochs", "1", "--image-size", "16"))
    model, config, data = regime_study.load_trained(out)
    assert config["image_size"] == 16 and data.test.images.shape[-1] == 16
    # The model as loaded gives the test error that metrics.json stored.
    error, _ = regime_study._error(model, data.test, data.preprocess)
    assert error == json.loads((out / "metrics.json").read_text())["summary"]["final_test_error"]
    result = regime_study.evaluate_run(out, curve=True)
    assert 0 <= result["test_error_bn"] <= 1 and result["statistics_images"] == 80
    curve = json.loads((out / "depth_curve.json").read_text())
    assert curve["blocks"] == 3 and [p["removed"] for p in curve["last"]] == [0, 1, 2]
    assert curve["last"][0]["test_error"] == pytest.approx(error)
    assert all(len(p["blocks_removed"]) == p["removed"] for p in curve["random"])
    summary = regime_study.curve_summary([curve])
    assert summary[0]["kept_fraction"] == 1.0 and summary[0]["time_ratio"] == pytest.approx(1.0)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
