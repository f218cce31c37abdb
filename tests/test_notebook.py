"""notebooks/kaggle_t4.ipynb, executed headless with nbclient on the CPU with the tiny model (its
CPU_SMOKE_TEST flag), so the notebook cannot rot: every cell runs, and its outputs are the benchmark's table,
a finished training run inside the budget, the curve displayed inline, and a submission.json written by
`evaluation.py --submission` from the trained model that the validator accepts."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from submission import check_submission_file

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kaggle_t4.ipynb"


def outputs(cell) -> tuple[str, list[str]]:
    """The text a cell printed, and the MIME types of what it displayed."""
    text, shown = [], []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            text.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            shown += list(output.data)
            text.append(output.data.get("text/plain", ""))
    return "".join(text), shown


@pytest.mark.slow
def test_the_kaggle_notebook_runs_headless_on_cpu_with_the_tiny_model(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    assert "CPU_SMOKE_TEST = False" in parameters.source and "OUTPUT_DIR = None" in parameters.source
    parameters.source = (parameters.source.replace("CPU_SMOKE_TEST = False", "CPU_SMOKE_TEST = True")
                         .replace("OUTPUT_DIR = None", f"OUTPUT_DIR = {str(tmp_path / 'out')!r}"))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    code = [c for c in notebook.cells if c.cell_type == "code"]
    printed = {i: outputs(c) for i, c in enumerate(code)}
    everything = "".join(text for text, _ in printed.values())
    assert "RECOMMENDED EPOCH COUNTS" in everything
    assert "Training finished" in everything
    assert any("image/png" in shown for _, shown in printed.values())  # the curve, inline
    predicted = printed[len(code) - 1][0]
    assert "evaluation.py --model" in predicted and "--submission" in predicted and "--check" in predicted

    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())
    run = out / "run"
    assert (run / "model" / "tokenizer.json").is_file() and (run / "training_curves.png").is_file()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs and all(r["kind"] != "epoch" or r["loss"] > 0 for r in epochs)

    challenges = ROOT / "data" / "examples" / "kaggle" / "example_challenges.json"
    answered = check_submission_file(out / "submission.json", challenges)
    assert answered == {task_id: len(task["test"]) for task_id, task in json.loads(challenges.read_text()).items()}
