"""The multi-seed study: its statistics against known answers, and its jobs' caching, resuming and executors."""

import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future

import numpy as np
import pytest
from scipy import stats

import run_statistics
import study

# A study small enough for this CPU: a CIFAR ResNet-8, a few iterations, a 300-image evaluation set.
TINY = dict(layout="cifar", depth=8, iterations=8, batch_size=16, evaluations=2, subnetworks=3, eval_samples=300)


class RecordingExecutor:
    """Runs each job at once in this process and remembers what was submitted."""

    def __init__(self):
        self.seeds = []

    def submit(self, fn, *args):
        self.seeds.append(args[1])
        future = Future()
        future.set_result(fn(*args))
        return future


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Two seeds of an A/A comparison (p_L = 1.0) and a real one (p_L = 0.5), computed once."""
    output_dir = tmp_path_factory.mktemp("study")
    settings = study.StudySettings(p_lasts=(1.0, 0.5), **TINY)
    results = study.run_study(settings, 2, output_dir, device="cpu", progress=False)
    return settings, output_dir, results


def deterministic_part(result):
    """A result without what measures wall-clock time."""
    kept = {k: v for k, v in result.items() if k not in ("started_at", "finished_at", "wall_s", "threads")}
    kept["history"] = {name: {m: v for m, v in metrics.items() if m != "step_time"}
                       for name, metrics in result["history"].items()}
    return kept


# ---------------------------------------------------------------- statistics


def test_a_a_comparison_gives_exactly_zero_with_a_zero_width_interval(tiny_study):
    settings, _, results = tiny_study
    aa = study.summarize(results)["comparisons"][0]
    assert aa["p_last"] == 1.0
    assert aa["per_seed_differences"] == [0.0, 0.0]
    assert aa["accuracy_difference"] == 0.0 and aa["ci95"] == [0.0, 0.0]
    assert aa["verdict"] == "no difference" and aa["min_detectable_difference"] == 0.0
    # The networks compute the same thing, so every per-iteration test accuracy is equal too.
    for r in results:
        assert r["history"]["p_L=1"]["test_acc"] == r["history"]["ResNet"]["test_acc"]
    assert aa["fluctuation"]["second_half"]["ratio"]["ci95"] == [1.0, 1.0]
    line = study.verdict_lines(study.summarize(results))["accuracy"][0]
    assert "no difference" in line and "[+0.00, +0.00]" in line


def test_the_speed_line_says_longer_when_the_step_is_slower(tiny_study):
    _, _, results = tiny_study
    summary = study.summarize(results)
    summary["comparisons"][0]["step_time_ratio"] = {"mean": 1.02, "ci95": [1.01, 1.03], "n": 2, "verdict": "above 1"}
    assert "(2% longer)" in study.verdict_lines(summary)["speed"][0]


def test_a_synthetic_shift_of_known_size_is_detected_and_bracketed():
    rng = np.random.default_rng(0)
    plain = rng.normal(97.0, 0.5, size=8)
    for shift, verdict in [(1.0, "better"), (-1.0, "worse")]:
        stochastic = plain + shift + rng.normal(0, 0.2, size=8)
        result = study.paired_difference(stochastic, plain)
        assert result["verdict"] == verdict
        # The interval's own coverage is tested below; here: centred on the shift within 4.5 standard errors.
        assert abs(result["mean"] - shift) < 4.5 * 0.2 / math.sqrt(8)
    small = study.paired_difference(plain + rng.normal(0, 0.5, size=8), plain)
    assert small["verdict"] == "no difference" and small["min_detectable"] > 0


def test_the_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    trials, n, true_mean = 4000, 5, 0.3
    covered = 0
    for _ in range(trials):
        low, high = study.paired_difference(rng.normal(true_mean, 1.0, n), np.zeros(n))["ci95"]
        covered += low <= true_mean <= high
    sigma = math.sqrt(0.95 * 0.05 / trials)
    assert abs(covered / trials - 0.95) < 4.5 * sigma


def test_the_minimum_detectable_difference_is_detected_80_percent_of_the_time():
    rng = np.random.default_rng(2)
    n, sd, trials = 5, 1.0, 4000
    effect = study.minimum_detectable_difference(sd, n)
    assert 1.5 < effect < 2.0  # about (t_0.975 + t_0.8) sd / sqrt(n) = (2.78 + 0.94) / 2.24
    detected = sum(stats.ttest_1samp(rng.normal(effect, sd, n), 0).pvalue < 0.05 for _ in range(trials))
    assert abs(detected / trials - 0.8) < 4.5 * math.sqrt(0.8 * 0.2 / trials)


def test_the_detectable_difference_of_many_pairs_approaches_the_normal_formula():
    # scipy's noncentral t is NaN far in its lower tail; the detectable size must still come out
    normal = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) / math.sqrt(1000)
    assert run_statistics.minimum_detectable_difference(1.0, 1000) == pytest.approx(normal, rel=0.01)


@pytest.mark.parametrize("sd, target", [(1.0, 1.0), (3.5, 3.0), (0.5, 2.0), (5.0, 1.0)])
def test_pairs_to_detect_is_the_first_number_of_pairs_that_reaches_the_target(sd, target):
    n = run_statistics.pairs_to_detect(sd, target)
    assert run_statistics.minimum_detectable_difference(sd, n) <= target
    fewer = run_statistics.minimum_detectable_difference(sd, n - 1)
    assert math.isnan(fewer) or fewer > target


def test_pairs_to_detect_says_none_when_no_study_size_is_enough():
    assert run_statistics.pairs_to_detect(1.0, 0.01) is None  # about 78,000 pairs
    assert run_statistics.pairs_to_detect(float("nan"), 1.0) is None
    assert run_statistics.pairs_to_detect(0.0, 1.0) == 2


def test_holm_adjustment_against_a_hand_computed_case():
    assert study.holm_adjusted([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_paired_ratio_is_a_geometric_mean_with_an_interval():
    rng = np.random.default_rng(3)
    base = rng.uniform(1, 2, 10)
    result = study.paired_ratio(2 * base * np.exp(rng.normal(0, 0.05, 10)), base)
    assert result["mean"] == pytest.approx(2.0, rel=0.05)
    assert result["ci95"][0] < 2.0 < result["ci95"][1] and result["verdict"] == "above 1"
    assert study.paired_ratio([1.0, float("nan")], [1.0, 2.0])["n"] == 1  # undefined pairs are left out


def test_fluctuation_measures_the_noise_around_a_trend_and_separates_the_shared_part():
    rng = np.random.default_rng(4)
    trend = np.linspace(0.5, 0.99, 20000)
    shared, own_a, own_b = (rng.normal(0, sd, 20000) for sd in (0.03, 0.01, 0.02))
    a, b = trend + shared + own_a, trend + shared + own_b
    assert run_statistics.fluctuation(a) == pytest.approx(math.hypot(0.03, 0.01), rel=0.03)
    assert run_statistics.shared_fluctuation(a, b) == pytest.approx(0.03**2, rel=0.05)
    assert run_statistics.own_fluctuation(a, b) == pytest.approx(0.01, rel=0.1)
    assert run_statistics.own_fluctuation(b, a) == pytest.approx(0.02, rel=0.1)


def test_spread_is_the_sample_standard_deviation_and_fluctuation_ignores_the_trend():
    values = [0.1, 0.4, 0.2, 0.7]
    assert run_statistics.spread(values) == pytest.approx(np.std(values, ddof=1))
    assert math.isnan(run_statistics.spread([0.5]))
    rising = np.linspace(0.0, 1.0, 50)  # a trend without noise: a wide spread, no fluctuation
    assert run_statistics.spread(rising) > 0.25 and run_statistics.fluctuation(rising) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- what summarize needs


def test_the_flop_floors_are_counted_when_a_run_is_made(tiny_study):
    settings, _, results = tiny_study
    floors = study.flop_floors(settings)
    assert list(floors) == ["p_L=1", "p_L=0.5"] and floors["p_L=1"] == pytest.approx(1.0)
    assert all(r["flop_floors"] == floors for r in results)
    assert [c["flop_floor"] for c in study.summarize(results)["comparisons"]] == list(floors.values())


def test_the_committed_runs_floors_file_holds_what_counting_gives():
    folder = study.Path(study.__file__).parent / "results" / "study"
    (runs,) = (folder / "runs").iterdir()
    settings = study.StudySettings.from_dict(json.loads((runs / "seed-0.json").read_text())["settings"])
    # Committed on another machine: numerically equal, not bit for bit (see assert_json_close).
    assert_json_close(json.loads(study.flop_floors_path(folder, settings).read_text()), study.flop_floors(settings))


def test_summarize_needs_only_the_stored_files_not_torch(tmp_path):
    # The committed study, summarized where torch cannot be imported, gives the committed summary.
    root = study.Path(study.__file__).parent
    script = (
        "import importlib.abc, json, pathlib, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'torch':\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import study_summary\n"
        "(runs,) = pathlib.Path('results/study/runs').iterdir()\n"
        "floors = json.loads((runs / 'flop_floors.json').read_text())\n"
        "results = [json.loads(p.read_text()) | {'flop_floors': floors} for p in sorted(runs.glob('seed-*.json'))]\n"
        "print(json.dumps(study_summary.summarize(results)))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    written = study.write_summary(json.loads(completed.stdout), tmp_path)
    committed = json.loads((root / "results" / "study" / "study_summary.json").read_text())
    assert_json_close(json.loads(written.read_text()), committed)


def assert_json_close(actual, expected, rel=1e-9, path="$"):
    """`actual` equals `expected` (parsed JSON), floats within `rel` relative difference.

    For numbers computed here against a file committed from another machine: numpy's sums
    are not bit-identical across CPUs (pairwise summation and SIMD width depend on the
    processor), so the 16th digit can move; 1e-9 still catches any real change.
    """
    if isinstance(expected, float) or isinstance(actual, float):
        assert isinstance(actual, int | float) and isinstance(expected, int | float), (path, actual, expected)
        assert math.isclose(actual, expected, rel_tol=rel, abs_tol=1e-12), (path, actual, expected)
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (path, actual, expected)
        for key in expected:
            assert_json_close(actual[key], expected[key], rel, f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), (path, actual, expected)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_json_close(a, e, rel, f"{path}[{i}]")
    else:
        assert actual == expected, (path, actual, expected)


def test_assert_json_close_tolerates_the_last_digits_only():
    summary = {"mean": 0.985331989714745, "ci95": [0.8617066629060227, 1.0], "verdict": "no difference", "n": 5}
    assert_json_close({**summary, "mean": 0.9853319897147451, "ci95": [0.8617066629060228, 1.0]}, summary)
    for changed in ({"mean": 0.98533200}, {"ci95": [0.8617066629060227]}, {"verdict": "helps"}, {"n": 6}):
        with pytest.raises(AssertionError):
            assert_json_close({**summary, **changed}, summary)


# ---------------------------------------------------------------- jobs


def test_same_settings_twice_compute_nothing_and_give_the_same_numbers(tiny_study):
    settings, output_dir, results = tiny_study
    executor = RecordingExecutor()
    again = study.run_study(settings, 2, output_dir, executor=executor, progress=False)
    assert executor.seeds == []
    assert again == results
    first, second = study.summarize(results), study.summarize(again)
    assert json.dumps(first) == json.dumps(second)
    assert study.verdict_lines(first) == study.verdict_lines(second)


def test_a_study_killed_mid_way_computes_only_the_missing_runs(tiny_study, tmp_path):
    settings, output_dir, results = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    study.result_path(copy, settings, 1).unlink()  # seed 1 never finished
    kept = study.result_path(copy, settings, 0).stat().st_mtime_ns
    executor = RecordingExecutor()
    resumed = study.run_study(settings, 3, copy, executor=executor, progress=False)
    assert executor.seeds == [1, 2]
    assert study.result_path(copy, settings, 0).stat().st_mtime_ns == kept
    assert deterministic_part(resumed[1]) == deterministic_part(results[1])


def test_a_killed_study_process_resumes_with_only_the_missing_runs(tmp_path):
    settings = study.StudySettings(p_lasts=(0.5,), **TINY)
    command = [sys.executable, str(study.Path(study.__file__)), "--seeds", "3", "--device", "cpu",
               "--output-dir", str(tmp_path), "--p-lasts", "0.5",
               *[f"--{name.replace('_', '-')}={value}" for name, value in TINY.items()]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = study.result_path(tmp_path, settings, 0)
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.kill()  # SIGKILL: no clean-up, as when a machine is lost
    process.wait()
    assert first.exists(), "the first run never finished"
    done = study.missing_seeds(settings, range(3), tmp_path)
    assert 0 not in done
    executor = RecordingExecutor()
    results = study.run_study(settings, 3, tmp_path, executor=executor, progress=False)
    assert executor.seeds == done
    assert [r["seed"] for r in results] == [0, 1, 2]


def test_an_interrupted_job_resumes_from_its_checkpoint_with_the_same_result(tiny_study, tmp_path, monkeypatch):
    settings, _, results = tiny_study
    evaluate = study._evaluate
    calls = []

    def evaluate_then_die(*args):
        calls.append(1)
        if len(calls) == len(settings.model_names) + 1:  # in the second evaluation point
            raise KeyboardInterrupt
        return evaluate(*args)

    monkeypatch.setattr(study, "_evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        study.run_seed(settings, 0, tmp_path, device="cpu")
    checkpoint = study.result_path(tmp_path, settings, 0).with_name("seed-0.checkpoint.pt")
    assert checkpoint.exists() and not study.result_path(tmp_path, settings, 0).exists()

    monkeypatch.setattr(study, "_evaluate", evaluate)
    resumed = study.run_seed(settings, 0, tmp_path, device="cpu")
    assert deterministic_part(resumed) == deterministic_part(results[0])
    assert not checkpoint.exists()


def test_the_verdict_follows_the_result_files(tiny_study, tmp_path):
    settings, output_dir, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    before = study.summarize(study.load_results(settings, [0, 1], copy))["comparisons"][1]
    for seed, gain in [(0, 0.30), (1, 0.32)]:  # the p_L = 0.5 network ends 30 points ahead
        path = study.result_path(copy, settings, seed)
        result = json.loads(path.read_text())
        final = result["evaluations"]["accuracy"]
        final["p_L=0.5"][-1] = final["ResNet"][-1] + gain
        path.write_text(json.dumps(result))
    after = study.summarize(study.load_results(settings, [0, 1], copy))["comparisons"][1]
    assert after["accuracy_difference"] == pytest.approx(31.0)
    assert after["verdict"] == "better" != before["verdict"]


def test_two_local_workers_run_two_jobs_at_the_same_time(tmp_path):
    settings = study.StudySettings(p_lasts=(0.5,), **TINY)
    results = study.run_study(settings, 2, tmp_path, workers=2, device="cpu", progress=False)
    (a_start, a_end), (b_start, b_end) = ((r["started_at"], r["finished_at"]) for r in results)
    assert max(a_start, b_start) < min(a_end, b_end), "the two jobs did not overlap"
    assert [r["threads"] for r in results] == [max(1, (study.os.cpu_count() or 1) // 2)] * 2  # a share of the CPU each


def test_submitit_runs_the_jobs_as_local_processes(tmp_path):
    submitit = pytest.importorskip("submitit")
    settings = study.StudySettings(p_lasts=(0.5,), **TINY)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    results = study.run_study(settings, 1, tmp_path, executor=executor, device="cpu", progress=False)
    assert results[0]["seed"] == 0 and len(results[0]["history"]["ResNet"]["test_acc"]) == settings.iterations


def test_bad_settings_fail_up_front_naming_the_value():
    with pytest.raises(ValueError, match="depth 6n \\+ 2.*got 9"):
        study.StudySettings(layout="cifar", depth=9)
    with pytest.raises(ValueError, match="p_last must be a probability in \\[0, 1\\], got 1.5"):
        study.StudySettings(p_lasts=(0.5, 1.5))
    with pytest.raises(ValueError, match="p_lasts must be a list of numbers, got the string '\\[0.5\\]'"):
        study.StudySettings(p_lasts="[0.5]")
    with pytest.raises(ValueError, match="distinct"):
        study.StudySettings(p_lasts=(0.5, 0.5))
    with pytest.raises(ValueError, match="evaluations \\(700\\) cannot exceed iterations \\(600\\)"):
        study.StudySettings(evaluations=700)
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        study.StudySettings(dataset="cifar10")


def test_a_result_file_of_other_settings_is_refused_by_name(tiny_study, tmp_path):
    settings, output_dir, _ = tiny_study
    copy = tmp_path / "study"
    shutil.copytree(output_dir, copy)
    path = study.result_path(copy, settings, 0)
    result = json.loads(path.read_text())
    result["settings"]["iterations"] = 9
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="seed-0.json holds a run of other settings"):
        study.load_results(settings, [0], copy)


def test_estimate_uses_finished_runs_when_there_are_some(tiny_study):
    settings, output_dir, results = tiny_study
    assert study.estimate_job_seconds(settings, output_dir) == pytest.approx(np.median([r["wall_s"] for r in results]))


def test_sampled_subnetworks_keep_blocks_as_drawn_and_restore_the_model(tiny_study):
    settings, _, _ = tiny_study
    model = settings.build_models(seed=0)["p_L=0.5"]
    trained = model.survival_probabilities
    with study.keep_blocks(model, [0, 2], unscaled=True):
        assert model.survival_probabilities == [1.0, 0.0, 1.0]
    assert model.survival_probabilities == trained
