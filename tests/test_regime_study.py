"""regime_study.py: the map recomputes from the run files (change one, the verdict changes), against
scipy's paired t interval; and a tiny run evaluated again from its checkpoint."""

import json

import pytest
import scipy.stats
import torch
from test_compare_runs import write_run
from test_train import cifar_argv, fake_cifar  # noqa: F401  (the fixture)
from test_train_vit import vit_argv

import regime_study
import run_statistics
import train
from resnet_with_stochastic_depth import stochastic_depth_gates, stochastic_depth_state
from stochastic_depth.evaluation_network import keep_blocks


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


# ---------------------------------------------------------------------------------- the schedule map


def write_arms(root, errors_by_arm, depth=20, size=5504, **config):
    """Runs of each arm (plain, sd, early, late) in one cell, one per seed, with the given final test errors."""
    for arm, errors in errors_by_arm.items():
        schedule = {"early": "early", "late": "late"}.get(arm, "constant")
        for seed, error in enumerate(errors):
            write_run(root / f"d{depth}-n{size}" / f"{arm}-seed{seed}", seed, error, plain=arm == "plain", depth=depth,
                      drop_schedule=schedule, epoch_s=10.0 if arm == "plain" else 8.0, **config)  # fmt: skip


def test_the_schedule_map_compares_every_arm_with_plain_and_adjusts_by_holm(tmp_path):
    plain = [0.100, 0.110, 0.105, 0.098, 0.102]
    errors = {"plain": plain, "sd": [e + 0.02 + 0.002 * i for i, e in enumerate(plain)],  # clearly worse
              "early": [e - 0.001 * (-1) ** i for i, e in enumerate(plain)],  # no difference
              "late": [e - 0.004 + 0.001 * i for i, e in enumerate(plain)]}  # fmt: skip
    write_arms(tmp_path, errors)
    rows = regime_study.schedule_map(tmp_path)
    assert [r["arm"] for r in rows] == ["sd", "early", "late"] and all(r["seeds"] == [0, 1, 2, 3, 4] for r in rows)
    p_values = [scipy.stats.ttest_rel([100 * e for e in errors[r["arm"]]], [100 * e for e in plain]).pvalue for r in rows]
    assert [r["p_value"] for r in rows] == pytest.approx(p_values)
    # Holm by hand: the smallest p times 3, the next times 2 (at least the first), the largest times 1 (at least both).
    order = sorted(range(3), key=lambda i: p_values[i])
    expected = [0.0] * 3
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * p_values[i]))
        expected[i] = running
    assert [r["p_value_holm"] for r in rows] == pytest.approx(expected)
    verdicts = {r["arm"]: r["verdict"] for r in rows}
    assert verdicts["sd"] == "higher" and verdicts["early"] == "no difference detectable"
    assert "early stochastic depth" in regime_study.schedule_verdict(rows[1]) and "80% power at" in regime_study.schedule_verdict(rows[1])
    assert all(r["failed_runs"] == [] for r in rows)
    assert "| ResNet-20 | sd | 5 |" in regime_study.schedule_table(rows)


def test_a_cell_too_noisy_for_the_goal_says_how_many_seeds_would_reach_it(tmp_path):
    plain = [0.10, 0.11, 0.10, 0.12, 0.11]
    noisy = [e + d for e, d in zip(plain, [0.0, 0.04, -0.04, 0.02, -0.02])]  # differences' sd: sqrt(10) points
    write_arms(tmp_path, {"plain": plain, "sd": [e + 0.001 for e in plain], "late": noisy})
    rows = {r["arm"]: r for r in regime_study.schedule_map(tmp_path)}
    needed = run_statistics.pairs_to_detect(10 ** 0.5, regime_study.DETECTABLE_GOAL_POINTS)
    assert rows["late"]["seeds_for_goal"] == needed and needed > 5
    assert f"; {needed} paired seeds would detect 3 points" in regime_study.schedule_verdict(rows["late"])
    assert f"| {needed} |" in regime_study.schedule_table([rows["late"]])
    assert rows["sd"]["seeds_for_goal"] == 2  # every difference the same: two seeds detect any size
    assert "paired seeds would detect" not in regime_study.schedule_verdict(rows["sd"])


def test_a_run_that_fails_the_training_criterion_is_reported_and_kept(tmp_path):
    plain = [0.10, 0.11, 0.10, 0.12, 0.11]
    late = [0.10, 0.11, 0.10, 0.12, 0.11]
    late[3] = 0.11 + 0.051  # its training error (test error - 0.01) 5.1 points above the arm's median 10%
    write_arms(tmp_path, {"plain": plain, "late": late})
    (row,) = regime_study.schedule_map(tmp_path)
    assert row["failed_runs"] == ["late-seed3"]
    failing = [c for c in row["criterion"] if not c["passed"]]
    assert failing[0]["train_error"] == pytest.approx(15.1) and failing[0]["arm_median"] == pytest.approx(10.0)
    assert row["errors"]["final test error"]["treatment"][3] == pytest.approx(16.1)  # kept in the comparison
    assert "late-seed3" in regime_study.schedule_verdict(row)
    # 4.9 points above the median passes.
    path = tmp_path / "d20-n5504" / "late-seed3" / "metrics.json"
    run = json.loads(path.read_text())
    run["epochs"][-1]["train_error"] = 0.10 + 0.049
    path.write_text(json.dumps(run))
    assert regime_study.schedule_map(tmp_path)[0]["failed_runs"] == []


def test_an_early_schedule_run_is_evaluated_again_with_the_drop_scale_it_ended_with(fake_cifar, tmp_path):  # noqa: F811
    out = tmp_path / "d8-n80" / "early-seed0"
    result = train.main(cifar_argv(fake_cifar, out, "--epochs", "2", "--p-last", "0.2", "--drop-schedule", "early",
                                   "--drop-switch", "0.5"))  # fmt: skip
    model, _, data = regime_study.load_trained(out)
    # train.py evaluated the model after the last step, at drop_scale 0 (every block at full strength): so does this.
    assert stochastic_depth_state(model).drop_scale == 0.0
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), result.model.eval()(x))
    error, _ = regime_study._error(model, data.test, data.preprocess)
    assert error == json.loads((out / "metrics.json").read_text())["summary"]["final_test_error"]
    assert regime_study.cells(tmp_path)[8, 80]["early"].keys() == {0}


def test_only_a_cell_with_every_arm_and_seed_is_complete(tmp_path):
    write_arms(tmp_path, {"plain": [0.1] * 5, "sd": [0.1] * 5, "early": [0.1] * 5, "late": [0.1] * 4})
    status = regime_study.schedule_status(tmp_path)
    assert status["d20-n5504"] == {"finished": 19, "expected": 20, "complete": False, "missing": ["late-seed4"]}
    assert status["d56-n5504"]["finished"] == 0 and len(status["d56-n5504"]["missing"]) == 20
    write_arms(tmp_path / "more", {"late": [0.1] * 5})
    (tmp_path / "more" / "d20-n5504" / "late-seed4").rename(tmp_path / "d20-n5504" / "late-seed4")
    assert regime_study.schedule_status(tmp_path)["d20-n5504"]["complete"]


def test_the_schedule_map_draws_the_deepest_cells_depth_curve_for_every_arm(tmp_path):
    write_arms(tmp_path, {arm: [0.1, 0.11] for arm in regime_study.ARMS}, depth=20)
    write_arms(tmp_path, {arm: [0.1, 0.11] for arm in regime_study.ARMS}, depth=56)
    for arm, error in zip(regime_study.ARMS, (0.10, 0.12, 0.11, 0.13)):
        curve = {"blocks": 27, "test_images": 10, "clock": "process",
                 "last": [{"removed": 0, "test_error": error, "seconds": 2.0},
                          {"removed": 3, "test_error": error + 0.2, "seconds": 1.8}],
                 "random": [{"removed": 3, "blocks_removed": [1, 5, 9], "test_error": error + 0.05, "seconds": 1.8}]}  # fmt: skip
        (tmp_path / "d56-n5504" / f"{arm}-seed0" / "depth_curve.json").write_text(json.dumps(curve))
    curves = regime_study.depth_curves(tmp_path, 56, 5504)
    assert {arm: len(c) for arm, c in curves.items()} == dict.fromkeys(regime_study.ARMS, 1)
    assert regime_study.curve_summary(curves["late"])[1]["last_error"] == pytest.approx(33.0)
    regime_study.write_schedule_map(tmp_path)
    assert (tmp_path / "depth_curve_d56-n5504.png").is_file() and not (tmp_path / "depth_curve_d20-n5504.png").exists()


def test_the_papers_claims_are_judged_by_the_verdicts_of_the_cells(tmp_path):
    plain = [0.100, 0.110, 0.105, 0.098, 0.102]
    write_arms(tmp_path, {"plain": plain, "sd": [e + 0.02 + 0.001 * i for i, e in enumerate(plain)],  # higher
                          "early": [e - 0.01 - 0.001 * i for i, e in enumerate(plain)]}, depth=20)  # lower
    write_arms(tmp_path, {"plain": plain, "sd": [e + 0.02 + 0.001 * i for i, e in enumerate(plain)],  # higher
                          "late": [e + 0.001 * (-1) ** i for i, e in enumerate(plain)]}, depth=56)  # no difference
    lines = regime_study.paper_claims(regime_study.schedule_map(tmp_path))
    assert len(lines) == 4
    huang, small_sd, small_early, large_late = lines
    assert huang.startswith("Huang et al. 2016") and "ResNet-56, sd" in huang and huang.endswith("contradicted")
    assert "ResNet-20, sd" in small_sd and small_sd.endswith("holds")
    assert "ResNet-20, early" in small_early and small_early.endswith("holds")
    assert "ResNet-56, late" in large_late and "not shown: no difference detectable (80% power at" in large_late
    assert regime_study.paper_claims([]) == []
    # with the deep cell pending, only the claims about the shallow one are judged
    shallow_only = [r for r in regime_study.schedule_map(tmp_path) if r["depth"] == 20]
    assert [line.split(":")[0] for line in regime_study.paper_claims(shallow_only)] == [
        "Liu et al. 2023, standard stochastic depth hurts small models",
        "Liu et al. 2023, early stochastic depth helps small models",
    ]


# ---------------------------------------------------------------------------------- the ViT cell

# The ViT cell's configs (results/vit-fashion-mnist/run_all.sh), for fake runs.
VIT_CONFIG = {"model": "vit", "p_last": None, "vit_layers": 12, "vit_width": 64, "vit_heads": 2,
              "vit_patch": 4, "optimizer": "adamw", "lr_schedule": "cosine"}  # fmt: skip


def write_vit_cell(root, errors_by_arm, plain_train_error):
    """A fake ViT cell d12-n5504 (the design's), with the plain runs' final training error set to `plain_train_error`."""
    write_arms(root, errors_by_arm, depth=12, **VIT_CONFIG)
    for seed in range(len(errors_by_arm["plain"])):
        set_train_error(root / "d12-n5504" / f"plain-seed{seed}", plain_train_error)


def set_train_error(folder, value):
    path = folder / "metrics.json"
    run = json.loads(path.read_text())
    run["epochs"][-1]["train_error"] = value
    path.write_text(json.dumps(run))


PLAIN = [0.180, 0.185, 0.178, 0.182, 0.181]
ARMS_OF_A_VIT = {"plain": PLAIN, "sd": [e + 0.02 + 0.002 * i for i, e in enumerate(PLAIN)],  # clearly higher
                 "early": [e - 0.001 * (-1) ** i for i, e in enumerate(PLAIN)],  # no difference
                 "late": [e - 0.01 - 0.001 * i for i, e in enumerate(PLAIN)]}  # clearly lower  # fmt: skip


def test_the_vit_cell_is_named_as_a_vit_and_its_claims_follow_whether_it_overfits(tmp_path):
    write_vit_cell(tmp_path, ARMS_OF_A_VIT, plain_train_error=0.001)  # 0.1% against ~18%: overfits
    rows = regime_study.schedule_map(tmp_path)
    assert {(r["model"], r["network"]) for r in rows} == {("vit", "ViT-12 (width 64)")}
    assert "| ViT-12 (width 64) | sd | 5 |" in regime_study.schedule_table(rows)
    assert regime_study.schedule_verdict(rows[0]).startswith("ViT-12 (width 64), 5,504 images, stochastic depth")
    fit = regime_study.fit_regime(regime_study.cells(tmp_path)[12, 5504])
    assert fit["regime"] == "overfits" and fit["train_error"] == pytest.approx([0.1] * 5)
    assert fit["gap_points"]["mean"] == pytest.approx(100 * sum(PLAIN) / 5 - 0.1)
    assert "the plain network overfits: final training error 0.10%, final test error 18.12%" in regime_study.fit_line("d12-n5504", fit)
    design = regime_study.SCHEDULE_DESIGNS["vit"]
    sd, early, late = regime_study.paper_claims(rows, design.cells, design.claims, {"d12-n5504": fit})
    assert sd.startswith("Liu et al. 2023, standard stochastic depth hurts a small ViT that underfits: ViT-12 (width 64), sd")
    assert "does not apply: the plain network overfits (final training error 0.10%, test error 18.12%); measured: test error higher" in sd
    assert "does not apply" in early and "measured: no difference detectable (80% power at" in early
    assert "late stochastic depth helps models that overfit" in late and late.endswith("holds")
    assert regime_study.paper_claims(rows, design.cells, design.claims, fits=None) == []  # a regime claim needs the fit

    # The same errors, the plain runs fitting their training images no better than half their test error: underfits.
    for seed in range(5):
        set_train_error(tmp_path / "d12-n5504" / f"plain-seed{seed}", 0.5 * PLAIN[seed] + 0.001)
    fit = regime_study.fit_regime(regime_study.cells(tmp_path)[12, 5504])
    assert fit["regime"] == "underfits"
    sd, early, late = regime_study.paper_claims(rows, design.cells, design.claims, {"d12-n5504": fit})
    assert sd.endswith("holds") and early.startswith("Liu et al. 2023, early") and "not shown: no difference" in early
    assert "does not apply: the plain network underfits" in late and late.endswith("measured: test error lower")


def test_the_vit_map_counts_the_vit_design_and_judges_only_a_complete_cell(tmp_path, capsys):
    write_vit_cell(tmp_path, {arm: errors[:4] for arm, errors in ARMS_OF_A_VIT.items()}, plain_train_error=0.001)
    regime_study.main(["schedules", "--root", str(tmp_path)])  # finds the runs are ViTs: the ViT design
    result = json.loads((tmp_path / "schedule_map.json").read_text())
    assert result["model"] == "vit" and list(result["status"]) == ["d12-n5504"]
    assert result["status"]["d12-n5504"]["finished"] == 16 and result["paper_claims"] == []
    assert result["fits"]["d12-n5504"]["regime"] == "overfits" and result["depth_curve"] is None
    assert "d12-n5504: 16 of 20 runs finished" in capsys.readouterr().out
    write_vit_cell(tmp_path / "more", {arm: errors for arm, errors in ARMS_OF_A_VIT.items()}, plain_train_error=0.001)
    for arm in regime_study.ARMS:
        (tmp_path / "more" / "d12-n5504" / f"{arm}-seed4").rename(tmp_path / "d12-n5504" / f"{arm}-seed4")
    result = regime_study.write_schedule_map(tmp_path, "vit")
    assert result["status"]["d12-n5504"]["complete"] and len(result["paper_claims"]) == 3
    markdown = (tmp_path / "schedule_map.md").read_text()
    assert "| ViT-12 (width 64) | late | 5 |" in markdown and result["paper_claims"][2] in markdown
    assert regime_study.fit_line("d12-n5504", result["fits"]["d12-n5504"]) in markdown
    with pytest.raises(ValueError, match="holds vit runs, not resnet runs"):
        regime_study.write_schedule_map(tmp_path, "resnet")


def test_a_vit_run_is_evaluated_without_batchnorm_and_its_depth_curve_removes_whole_blocks(fake_cifar, tmp_path, capsys):  # noqa: F811
    cell = tmp_path / "d12-n5504"  # the ViT design's cell name, for `regime_study.py vit`; a tiny ViT of 4 blocks in it
    for arm, option in (("plain", "--plain"), ("sd", "--drop-path-rate=0.5")):
        train.main(vit_argv(fake_cifar, cell / f"{arm}-seed0", "--epochs", "1", "--vit-layers", "4", option))
    model, config, data = regime_study.load_trained(cell / "plain-seed0")
    # The plain ViT, unconverted in training, gets gates that never drop; its error is the one train.py measured.
    assert len(stochastic_depth_gates(model)) == 8 and {g.survival_prob for g in stochastic_depth_gates(model)} == {1.0}
    error, _ = regime_study._error(model, data.test, data.preprocess)
    assert error == json.loads((cell / "plain-seed0" / "metrics.json").read_text())["summary"]["final_test_error"]
    with keep_blocks(model, [1, 3]):
        odd_error, _ = regime_study._error(model, data.test, data.preprocess)

    regime_study.main(["vit", "--root", str(tmp_path)])
    out = capsys.readouterr().out
    assert "plain-seed0: test error" in out and "evaluation network's training error" in out and "depth curve" in out
    evaluation = json.loads((cell / "plain-seed0" / "evaluation.json").read_text())
    assert evaluation["batchnorm"] is False and "test_error_bn" not in evaluation and 0 <= evaluation["train_error"] <= 1
    curve = json.loads((cell / "plain-seed0" / "depth_curve.json").read_text())
    assert curve["blocks"] == 4 and [p["removed"] for p in curve["last"]] == [0, 1, 2, 3] and curve["random"] == []
    assert curve["last"][0]["test_error"] == error and curve["repeats"] == regime_study.VIT_CURVE_REPEATS
    assert [(p["name"], p["kept"], p["removed"]) for p in curve["patterns"]] == [("even", [0, 2], 2), ("odd", [1, 3], 2)]
    assert curve["patterns"][1]["test_error"] == odd_error
    assert (cell / "sd-seed0" / "depth_curve.json").is_file()
    result = json.loads((tmp_path / "schedule_map.json").read_text())
    assert result["depth_curve"]["runs"] == {"plain": 1, "sd": 1} and (tmp_path / "depth_curve_vit.png").is_file()
    assert [p["name"] for p in result["depth_curve"]["patterns"]["sd"]] == ["even", "odd"]
    summary = result["depth_curve"]["summary"]["plain"]
    assert summary[0]["time_ratio"] == pytest.approx(1.0) and summary[2]["last_error"] == pytest.approx(100 * curve["last"][2]["test_error"])
    assert "| every other (odd: 1, 3 kept) | 2 |" in (tmp_path / "schedule_map.md").read_text()
    # A second run evaluates nothing again: every run has its files.
    regime_study.main(["vit", "--root", str(tmp_path)])
    assert "test error" not in capsys.readouterr().out.split("| network |")[0]
