"""The notebook runs top to bottom, headless, and writes what it promises."""

import json
from pathlib import Path

import papermill

import utils

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "stochastic_depth.ipynb"
OUTPUTS = ["accuracy.png", "accuracy_zoomed.png", "loss_and_step_time.png", "history.json", "history.csv", "summary.json"]


def printed_text(notebook: dict) -> str:
    return "".join(
        "".join(output.get("text", ""))
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
    )


def test_notebook_runs_end_to_end_with_tiny_parameters(tmp_path):
    executed = tmp_path / "executed.ipynb"
    out = tmp_path / "out"
    papermill.execute_notebook(
        NOTEBOOK,
        executed,
        parameters=dict(layout="cifar", depth=8, iterations=6, batch_size=16, device="cpu", output_dir=str(out)),
        cwd=ROOT,
        kernel_name="python3",
        progress_bar=False,
    )
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    history = utils.History.load(out / "history.json")
    assert history.models == ["ResNet", "Stochastic"] and len(history) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ResNet"]["final_smoothed_test_acc"] == utils.ewm_mean(history["ResNet"]["test_acc"], 20)[-1]
    text = printed_text(json.loads(executed.read_text()))
    assert "identical initial weights: True" in text
    assert "Accuracy: the StochasticResNet ends" in text and "Speed: its median training step" in text


def test_committed_notebook_has_a_parameters_cell_and_the_outputs_of_a_clean_run():
    notebook = json.loads(NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert "parameters" in code_cells[1]["metadata"].get("tags", [])  # the first cell after the imports
    assert all(cell["execution_count"] is not None for cell in code_cells)
    assert not any(output["output_type"] == "error" for cell in code_cells for output in cell["outputs"])
    assert "Accuracy: the StochasticResNet ends" in printed_text(notebook)


STUDY_NOTEBOOK = ROOT / "stochastic_depth_study.ipynb"
STUDY_PLOTS = ["accuracy_curves.png", "accuracy_difference.png", "subnetworks.png", "tradeoff.png"]


def test_study_notebook_runs_end_to_end_and_a_second_run_computes_nothing(tmp_path):
    out = tmp_path / "study"
    parameters = dict(layout="cifar", depth=8, p_lasts=[1.0, 0.5], iterations=8, batch_size=16, seeds=2,
                      evaluations=2, subnetworks=2, eval_samples=200, device="cpu", output_dir=str(out))
    texts = []
    for run in range(2):
        executed = tmp_path / f"executed-{run}.ipynb"
        papermill.execute_notebook(STUDY_NOTEBOOK, executed, parameters=parameters, cwd=ROOT,
                                   kernel_name="python3", progress_bar=False)
        texts.append(printed_text(json.loads(executed.read_text())))
    first, second = texts
    assert "2 of 2 runs to compute on cpu" in first
    assert "all 2 runs of these settings are in" in second and "runs to compute on" not in second
    # Every printed verdict and answer repeats exactly (the timing lines are the stored ones, too).
    assert first.split("summary written to")[1] == second.split("summary written to")[1]
    for name in STUDY_PLOTS:
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "study_summary.json").read_text())
    assert [c["p_last"] for c in summary["comparisons"]] == [1.0, 0.5]
    assert summary["comparisons"][0]["ci95"] == [0.0, 0.0] and summary["comparisons"][0]["verdict"] == "no difference"
    for question in ("1. No accuracy gain?", "2. Much larger fluctuation?", "3. Does it fail to shrink?",
                     "4. Other survival probabilities?", "5. About 25% less training time"):
        assert question in second


def test_committed_study_notebook_shows_the_committed_study():
    notebook = json.loads(STUDY_NOTEBOOK.read_text())
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert "parameters" in code_cells[1]["metadata"].get("tags", [])
    assert all(cell["execution_count"] is not None for cell in code_cells)
    assert not any(output["output_type"] == "error" for cell in code_cells for output in cell["outputs"])
    text = printed_text(notebook)
    assert "all 5 runs of these settings are in results/study/runs/" in text
    # The committed summary is the one the notebook printed from the committed runs.
    summary = json.loads((ROOT / "results" / "study" / "study_summary.json").read_text())
    for comparison in summary["comparisons"]:
        assert f"difference {comparison['accuracy_difference']:+.2f} points" in text


REGIME_NOTEBOOK = ROOT / "regime_study.ipynb"


def test_regime_notebook_draws_the_committed_map_and_depth_curve_quickly_with_nothing_to_train(tmp_path):
    import time

    import regime_study

    start = time.perf_counter()
    executed = tmp_path / "regime.ipynb"
    papermill.execute_notebook(REGIME_NOTEBOOK, executed, cwd=ROOT, kernel_name="python3", progress_bar=False)
    assert time.perf_counter() - start < 120
    text = printed_text(json.loads(executed.read_text()))
    rows = regime_study.regime_map(ROOT / "results" / "regime-fashion-mnist")
    assert rows, "no committed cell with two or more seeds"
    for row in rows:
        assert regime_study.verdict(row, "test") in text
    # The committed notebook shows what the committed files say.
    committed = printed_text(json.loads(REGIME_NOTEBOOK.read_text()))
    for row in rows:
        assert regime_study.verdict(row, "test") in committed
    # The schedule map: how many runs of each cell are finished, as the files say, and the verdicts
    # of the complete cells (those alone), in the committed notebook too.
    schedules = ROOT / "results" / "schedules-fashion-mnist"
    status = regime_study.schedule_status(schedules)
    for cell, state in status.items():
        assert f"{cell}: {state['finished']} of {state['expected']} runs finished" in text
    for row in regime_study.schedule_map(schedules):
        line = regime_study.schedule_verdict(row)
        complete = status[f"d{row['depth']}-n{row['train_images']}"]["complete"]
        assert (line in text, line in committed) == (complete, complete), line
