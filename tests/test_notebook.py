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
