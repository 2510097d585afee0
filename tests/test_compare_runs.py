"""compare_runs.py: pairing train.py runs by seed, its intervals against scipy, and its refusals."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats

import compare_runs

ROOT = Path(__file__).resolve().parents[1]

CONFIG = {"dataset": "fashion-mnist", "depth": 20, "epochs": 2, "lr": 0.1, "plain": True, "p_last": 1.0,
          "survival_rule": "linear", "dropped_update": "decay", "parameters": 1000, "seed": 0,
          "output_dir": "x", "device": "cpu"}


def write_run(folder, seed, test_error, *, plain=True, epoch_s=10.0, **config):
    folder.mkdir(parents=True)
    config = {**CONFIG, "plain": plain, "p_last": 1.0 if plain else 0.5, "seed": seed,
              "output_dir": str(folder), **config}
    epochs = [{"epoch": e, "train_error": test_error - 0.01, "test_error": test_error} for e in (1, 2)]
    summary = {"epochs_done": 2, "final_test_error": test_error, "best_val_epoch": 2, "best_val_error": test_error,
               "test_error_at_best_val": test_error, "median_epoch_time_s": epoch_s}
    (folder / "metrics.json").write_text(json.dumps({"config": config, "summary": summary, "epochs": epochs}))
    return folder


def groups(tmp_path, control_errors, treatment_errors, treatment_epoch_s=7.5):
    control = [write_run(tmp_path / f"plain-{s}", s, e) for s, e in enumerate(control_errors)]
    treatment = [write_run(tmp_path / f"sd-{s}", s, e, plain=False, epoch_s=treatment_epoch_s)
                 for s, e in enumerate(treatment_errors)]
    return control, treatment


def test_paired_difference_and_interval_match_scipys_paired_t(tmp_path):
    control_errors, treatment_errors = [0.090, 0.100, 0.095], [0.140, 0.152, 0.141]
    result = compare_runs.compare(*groups(tmp_path, control_errors, treatment_errors))
    assert result["seeds"] == [0, 1, 2] and result["treatment"]["p_last"] == 0.5
    d = result["errors"]["test error at best val. epoch"]["difference_points"]
    points = [100 * (t - c) for t, c in zip(treatment_errors, control_errors)]
    mean = sum(points) / 3
    low, high = scipy.stats.t.interval(0.95, 2, loc=mean, scale=scipy.stats.sem(points))
    assert d["mean"] == pytest.approx(mean) and d["ci95"] == pytest.approx([low, high])
    assert compare_runs.verdict_text(d) == d["verdict"] == "higher"  # the treatment's error is higher, its interval above 0
    ratio = result["epoch_time_ratio"]
    assert ratio["mean"] == pytest.approx(0.75) and ratio["n"] == 3


def test_no_detectable_difference_says_how_small_a_difference_was_detectable(tmp_path, capsys):
    control, treatment = groups(tmp_path, [0.10, 0.11, 0.09, 0.10], [0.11, 0.09, 0.10, 0.105])
    result = compare_runs.compare(control, treatment)
    verdict = compare_runs.verdict_text(result["errors"]["final test error"]["difference_points"])
    assert verdict.startswith("no difference detectable (80% power at ")
    compare_runs.main(["--control", *map(str, control), "--treatment", *map(str, treatment),
                       "--out", str(tmp_path / "c.json")])
    assert "no difference detectable" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["seeds"] == [0, 1, 2, 3]


def test_one_seed_gives_no_interval_and_no_verdict(tmp_path):
    result = compare_runs.compare(*groups(tmp_path, [0.09], [0.14]))
    d = result["errors"]["final test error"]["difference_points"]
    assert d["mean"] == pytest.approx(5.0) and all(math.isnan(v) for v in d["ci95"])
    assert compare_runs.verdict_text(d) == "one seed: no interval, no verdict"


@pytest.mark.parametrize(
    "change, message",
    [
        ("missing", r"treatment: .*sd-1/metrics.json not found: is .*sd-1 the --output-dir of a finished train.py run"),
        ("seeds", r"the control runs have seeds \[0, 1\] and the treatment runs \[0, 5\]: each seed needs one run of each"),
        ("setting", r"control: .*plain-0 and .*plain-1 differ in lr: the runs of a group must differ only in their seed"),
        ("across", r"control and treatment runs differ in depth, not only in the model"),
        ("unfinished", r"treatment: .*sd-1 stopped after 1 of 2 epochs; resume it"),
        ("duplicate", r"control: .*plain-0 and .*plain-dup both have seed 0; give one run per seed"),
    ],
)
def test_runs_that_cannot_be_compared_are_refused_with_the_reason(tmp_path, change, message):
    control = [write_run(tmp_path / "plain-0", 0, 0.1), write_run(tmp_path / "plain-1", 1, 0.1, lr=0.05 if change == "setting" else 0.1)]
    treatment = [write_run(tmp_path / "sd-0", 0, 0.12, plain=False, depth=56 if change == "across" else 20)]
    seed = 5 if change == "seeds" else 1
    if change == "missing":
        treatment.append(tmp_path / "sd-1")
    else:
        treatment.append(write_run(tmp_path / "sd-1", seed, 0.12, plain=False, depth=56 if change == "across" else 20))
    if change == "unfinished":
        metrics = json.loads((tmp_path / "sd-1" / "metrics.json").read_text())
        metrics["summary"]["epochs_done"] = 1
        (tmp_path / "sd-1" / "metrics.json").write_text(json.dumps(metrics))
    if change == "duplicate":
        control.append(write_run(tmp_path / "plain-dup", 0, 0.1))
    with pytest.raises(ValueError, match=message):
        compare_runs.compare(control, treatment)
    with pytest.raises(SystemExit, match="compare_runs.py: "):
        compare_runs.main(["--control", *map(str, control), "--treatment", *map(str, treatment)])


def test_runs_are_compared_without_torch(tmp_path):
    # compare_runs and its statistics must work where only the runs' files are. The finder below
    # makes ``import torch`` raise ImportError. (``sys.modules['torch'] = None`` would too, but
    # scipy.stats takes any entry there for the imported module and fails on None.)
    control, treatment = groups(tmp_path, [0.090, 0.100, 0.095], [0.140, 0.152, 0.141])
    script = (
        "import importlib.abc, json, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'torch':\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import compare_runs\n"
        f"result = compare_runs.compare({list(map(str, control))!r}, {list(map(str, treatment))!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(json.dumps(result))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == compare_runs.compare(control, treatment)


def test_a_run_finished_after_a_max_steps_stop_compares_with_the_others(tmp_path):
    # --max-steps then --resume is how time-limited cluster jobs run; it changes nothing compared.
    control, treatment = groups(tmp_path, [0.09, 0.10], [0.14, 0.15])
    metrics = json.loads((treatment[1] / "metrics.json").read_text())
    metrics["config"].update(max_steps=50, channels_last=True)
    (treatment[1] / "metrics.json").write_text(json.dumps(metrics))
    assert compare_runs.compare(control, treatment)["seeds"] == [0, 1]


def test_out_is_strict_json_and_a_missing_folder_is_named_before_comparing(tmp_path, capsys):
    control, treatment = groups(tmp_path, [0.09], [0.14])
    out = tmp_path / "comparison.json"
    compare_runs.main(["--control", *map(str, control), "--treatment", *map(str, treatment), "--out", str(out)])
    written = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert written["errors"]["final test error"]["difference_points"]["ci95"] == [None, None]  # one seed
    with pytest.raises(SystemExit):
        compare_runs.main(["--control", *map(str, control), "--treatment", *map(str, treatment),
                           "--out", str(tmp_path / "missing" / "c.json")])
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "missing").exists()


def test_a_run_from_before_the_drop_schedule_options_compares_with_one_after(tmp_path):
    # Runs whose config lacks drop_schedule and drop_switch trained with the constant schedule: in one group
    # with runs that store it, and against an early-schedule group (a model setting, which may differ).
    control = [write_run(tmp_path / "plain-0", 0, 0.10), write_run(tmp_path / "plain-1", 1, 0.11)]
    old = write_run(tmp_path / "sd-0", 0, 0.12, plain=False)
    new = write_run(tmp_path / "sd-1", 1, 0.13, plain=False, drop_schedule="constant", drop_switch=0.25)
    assert compare_runs.compare(control, [old, new])["treatment"]["drop_schedule"] == "constant"
    early = [write_run(tmp_path / f"early-{s}", s, 0.1, plain=False, drop_schedule="early") for s in (0, 1)]
    assert compare_runs.compare(control, early)["treatment"]["drop_schedule"] == "early"
    odd = write_run(tmp_path / "sd-9", 1, 0.13, plain=False, drop_schedule="late")
    with pytest.raises(ValueError, match="differ in drop_schedule"):
        compare_runs.compare(control, [old, odd])
