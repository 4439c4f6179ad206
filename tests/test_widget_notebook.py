"""SteeringWidget driven from code, and notebook 05 end to end under papermill (tiny random model, Atari)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _session_fixtures import OTHER_TASK, TASK, save_tiny_world_model, tiny_world_model
from mmbench2_lab.session import RolloutSession

pytest.importorskip("ipywidgets")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "05_interactive_rollouts.ipynb"


@pytest.fixture
def widget(threads_1):
    from mmbench2_lab.widget import SteeringWidget
    with RolloutSession(tiny_world_model(), TASK) as session:
        yield SteeringWidget(session, map_name="u_r")


def test_widget_step_refreshes_the_frame_the_state_and_the_traces(widget):
    before = widget.frame.value
    for n in range(1, 3):
        r = widget.step(keys={"ArrowUp"})
        assert widget.frame.value != before
        before = widget.frame.value
        assert r.state in widget.state_label.value and f"step {n}" in widget.state_label.value
        assert r.maps, "the u_r overlay asks the session for maps"
        assert [len(t.y) for t in widget.plot.data[::2]] == [n] * 3  # one point per step and predictor


def test_widget_controls_show_errors_and_follow_the_task(widget):
    widget._guard(widget.step, np.zeros(2))  # what a button does with a bad action
    assert "ValueError" in widget.error.value and widget.session.last.step == 0
    assert len(widget.sliders.children) == 3
    widget.task.value = OTHER_TASK  # the dropdown switches the session's task
    assert widget.session.task == OTHER_TASK and widget.error.value == ""
    widget.sliders.children[0].value = 1.0
    widget.play.value += 1  # a Play tick steps with the sliders
    assert widget.session.last.step == 1 and widget.session.last.action[0] > 0
    widget.side_by_side.value = True
    assert widget.real_frame.layout.display is None and widget.real_frame.value


def test_notebook_05_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    import papermill as pm

    model_dir = save_tiny_world_model(tmp_path / "model")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "05_out.ipynb"
    pm.execute_notebook(str(NOTEBOOK), str(out), kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
                        parameters=dict(model=model_dir, task=TASK, unseen_task=OTHER_TASK, steps=4,
                                        out_dir=str(tmp_path / "runs")))
    nb = nbformat.read(out, as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "after 4 steps" in text and "re-anchors in 4 steps" in text
    assert (tmp_path / "runs" / f"{OTHER_TASK}_guarded.mp4").stat().st_size > 0
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 2  # the traces and the model-beside-real grid


def test_notebook_05_is_committed_without_outputs():
    import nbformat
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.outputs and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
