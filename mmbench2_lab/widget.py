"""Steer a world model inside JupyterLab: an ipywidgets client of :class:`~mmbench2_lab.session.RolloutSession`.

    session = RolloutSession(load_pretrained("bundled"), "walker-walk")
    SteeringWidget(session)            # the last expression of a cell displays it
    widget.step(keys={"ArrowRight"})   # or drive it from code (papermill runs it this way)

Click the frame, then hold arrows / WASD (key capture needs ipyevents), or use the key buttons, the action
sliders and Step; Play steps continuously. The frame's border ring is the hallucination state (grey
stable, amber drifting, red hallucinating), the overlay dropdown tints a predictor's pixel map onto it, and
the plot traces the normalised predictors against the paper's thresholds.
"""
from __future__ import annotations

import io
from typing import Iterable, Optional

import ipywidgets as widgets
import numpy as np

from mmbench2_lab.calibration import per_frame_trace_figure
from mmbench2_lab.hallucination import PAPER_THRESHOLDS
from mmbench2_lab.predictors import PREDICTORS
from mmbench2_lab.session import KEY_BINDINGS, STATE_COLOURS, RolloutSession, StepResult, overlay

TRACE_STEPS = 100  # steps of predictor history in the plot
_ARROWS = {"ArrowRight": "→", "ArrowLeft": "←", "ArrowUp": "↑", "ArrowDown": "↓"}


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


class SteeringWidget(widgets.VBox):
    """Live frame (and the real one, side by side), controls, state label and predictor traces for one
    session. ``step`` drives it from code exactly as the buttons do."""

    def __init__(self, session: RolloutSession, *, map_name: str = "none", scale: int = 4, fps: float = 10.0):
        import plotly.graph_objects as go

        from mmbench2_lab.envs import is_runnable
        from mmbench2_lab.tasks import all_tasks

        self.session, self.scale = session, int(scale)
        self.held: set[str] = set()
        self.frame = widgets.Image(format="png", layout=widgets.Layout(width=f"{session.size * self.scale}px"))
        self.real_frame = widgets.Image(format="png", layout=widgets.Layout(width=f"{session.size * self.scale}px",
                                                                            display="none"))
        self.state_label = widgets.HTML()
        self.error = widgets.HTML()
        self.overlay = widgets.Dropdown(options=("none",) + PREDICTORS, value=map_name, description="overlay")
        self.overlay.observe(lambda _: self._overlay_changed(), "value")
        runnable = [t.name for t in all_tasks() if is_runnable(t.name)]
        self.task = widgets.Dropdown(options=runnable, value=session.task if session.task in runnable else None,
                                     description="task")
        self.task.observe(lambda change: self._guard(self.switch_task, change["new"]), "value")
        self.side_by_side = widgets.Checkbox(value=session.side_by_side, description="real simulator beside")
        self.side_by_side.observe(lambda change: self._guard(self._set_side_by_side, change["new"]), "value")
        self.sliders = widgets.VBox()
        self._build_sliders()
        key_buttons = []
        for pos, neg in KEY_BINDINGS:
            for key in (neg, pos):
                b = widgets.Button(description=_ARROWS.get(key, key.upper()), tooltip=f"step holding {key}",
                                   layout=widgets.Layout(width="48px"))
                b.on_click(lambda _, k=key: self._guard(self.step, keys={k}))
                key_buttons.append(b)
        step_b = widgets.Button(description="Step (sliders)")
        step_b.on_click(lambda _: self._guard(self.step, self.slider_action()))
        pause_b = widgets.Button(description="Pause / resume")
        pause_b.on_click(lambda _: self._guard(self.toggle_pause))
        reset_b = widgets.Button(description="Reset")
        reset_b.on_click(lambda _: self._guard(self.reset))
        self.play = widgets.Play(interval=int(1000 / fps), max=10 ** 9, description="run")
        self.play.observe(lambda _: self._guard(self._tick), "value")
        self.plot = go.FigureWidget(self._traces_figure())
        self.plot.update_layout(height=360, margin=dict(l=40, r=10, t=40, b=30))
        frames = widgets.HBox([self.frame, self.real_frame])
        self._capture_keys(frames)
        super().__init__([
            widgets.HBox([self.task, self.overlay, self.side_by_side]),
            frames, self.state_label, self.error,
            widgets.HBox(key_buttons), widgets.HBox([self.play, step_b, pause_b, reset_b]), self.sliders, self.plot])
        self._show(session.last)

    # -- driving it ---------------------------------------------------------------------------------
    def step(self, action=None, *, keys: Optional[Iterable[str]] = None) -> StepResult:
        """One session step (see RolloutSession.step), then refresh the picture, label and traces."""
        self.session.maps = self.overlay.value != "none"
        return self._show(self.session.step(action, keys=keys))

    def reset(self) -> StepResult:
        return self._show(self.session.reset())

    def switch_task(self, task: str) -> StepResult:
        r = self.session.switch_task(task)
        self._build_sliders()
        return self._show(r)

    def toggle_pause(self) -> StepResult:
        self.session.toggle_pause()
        return self._show(self.session.last)

    def slider_action(self) -> np.ndarray:
        """The sliders' action over the task's dims, (action_dim,)."""
        return np.array([s.value for s in self.sliders.children], dtype=np.float32)

    # -- internals ----------------------------------------------------------------------------------
    def _tick(self):
        """Play: step with the held keys, else with the sliders."""
        return self.step(keys=self.held) if self.held else self.step(self.slider_action())

    def _guard(self, fn, *args, **kwargs):
        """Run a UI callback; show its error under the frame instead of losing it in the kernel log."""
        try:
            fn(*args, **kwargs)
            self.error.value = ""
        except Exception as err:
            self.error.value = f"<span style='color:#dc2626'><b>{type(err).__name__}:</b> {err}</span>"

    def _set_side_by_side(self, on: bool):
        return self._show(self.session.set_mode(side_by_side=on))

    def _overlay_changed(self):
        self.session.maps = self.overlay.value != "none"
        self._show(self.session.last)

    def _build_sliders(self):
        self.sliders.children = [widgets.FloatSlider(0.0, min=-1.0, max=1.0, step=0.05, description=f"a[{i}]",
                                                     continuous_update=False)
                                 for i in range(self.session.action_dim)]

    def _capture_keys(self, target):
        """Hold arrows / WASD over the frames (ipyevents); without ipyevents the buttons remain."""
        try:
            from ipyevents import Event
        except ImportError:
            return
        valid = {k for pair in KEY_BINDINGS for k in pair}
        self._events = Event(source=target, watched_events=["keydown", "keyup"], prevent_default_action=True)

        def on_key(event):
            key = event["key"] if len(event["key"]) > 1 else event["key"].lower()
            if key not in valid:
                return
            if event["type"] == "keydown" and key not in self.held:
                self.held.add(key)
                self._guard(self.step, keys=self.held)
            elif event["type"] == "keyup":
                self.held.discard(key)
        self._events.on_dom_event(on_key)

    def _traces_figure(self):
        return per_frame_trace_figure(self.session.traces(TRACE_STEPS), PAPER_THRESHOLDS, fps=10.0)

    def _show(self, r: StepResult) -> StepResult:
        heat = r.maps.get(self.overlay.value) if self.overlay.value != "none" else None
        self.frame.value = _png(overlay(r.frame, heat, r.state, scale=self.scale))
        show_real = r.real_frame is not None
        self.real_frame.layout.display = None if show_real else "none"
        if show_real:
            self.real_frame.value = _png(overlay(r.real_frame, scale=self.scale))
        colour = "#%02x%02x%02x" % STATE_COLOURS[r.state]
        self.state_label.value = (f"<span style='background:{colour};color:white;padding:2px 8px;border-radius:4px'>"
                                  f"{r.state}</span> step {r.step}{' (paused)' if r.paused else ''} &nbsp; {r.summary()}")
        new = self._traces_figure()
        with self.plot.batch_update():
            for old, fresh in zip(self.plot.data, new.data):
                old.x, old.y = fresh.x, fresh.y
        return r
