"""Steer a world model live in the browser: a Gradio client of :class:`mmbench2_lab.session.RolloutSession`.

    mmbench2-lab app                          # the bundled model on http://127.0.0.1:7860
    mmbench2-lab app --checkpoint DIR --task walker-walk --port 7861

Every browser tab gets its own session (``gr.State``). Arrows and WASD steer (held keys step the model at
~10 fps through a ``gr.Timer``), space pauses, R resets; a "run" toggle keeps stepping without keys. The
frame's border ring shows the hallucination state (grey stable, amber drifting, red hallucinating), a
predictor map can be tinted over it, the real simulator can run beside the model, and guarded mode
re-anchors the model on the real frame when it hallucinates. Errors (an unknown task, a bad action, a
simulator that fails) are shown in the page; the app keeps running.

The same handlers are the app's HTTP API (``gradio_client``): ``/start``, ``/step``, ``/pause``,
``/reset``, ``/switch_task``, ``/set_mode``.
"""
from __future__ import annotations

import functools
import html
from typing import Optional

import gradio as gr
import numpy as np

from mmbench2_lab.calibration import per_frame_trace_figure
from mmbench2_lab.hallucination import PAPER_THRESHOLDS
from mmbench2_lab.predictors import PREDICTORS
from mmbench2_lab.session import STATE_COLOURS, RolloutSession, StepResult, overlay
from mmbench2_lab.tasks import domains, tasks

DEFAULT_TASK = "cheetah-run"
SCALE = 4  # display frames enlarged (nearest) so that 64x64 model frames are visible
TRACE_STEPS = 100  # steps of predictor history in the live plot
PLOT_EVERY = 5  # redraw the plot every this many steps (plotly redraws are the browser's slowest part)
MAPS = ("none",) + PREDICTORS

# Keyboard: held steering keys go into the hidden #keys-held box (the timer reads it); space and R click
# the pause and reset buttons. Keys typed into text fields are left alone.
KEY_JS = """
() => {
  const STEER = new Set(["ArrowRight", "ArrowLeft", "ArrowUp", "ArrowDown", "a", "d", "w", "s"]);
  const held = new Set();
  const inField = (e) => {
    const t = e.target;
    return t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable);
  };
  const name = (e) => (e.key.length === 1 ? e.key.toLowerCase() : e.key);
  const push = () => {
    const box = document.querySelector("#keys-held textarea, #keys-held input");
    if (!box) return;
    box.value = Array.from(held).sort().join(",");
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };
  const click = (id) => { const b = document.getElementById(id); if (b) b.click(); };
  window.addEventListener("keydown", (e) => {
    if (inField(e)) return;
    const k = name(e);
    if (STEER.has(k)) {
      e.preventDefault();
      if (!held.has(k)) { held.add(k); push(); }
    } else if (k === " ") {
      e.preventDefault();
      if (!e.repeat) click("pause-btn");
    } else if (k === "r" && !e.repeat) {
      click("reset-btn");
    }
  });
  window.addEventListener("keyup", (e) => { if (held.delete(name(e))) push(); });
  window.addEventListener("blur", () => { if (held.size) { held.clear(); push(); } });
}
"""

CSS = """
#state-badge { font-family: monospace; padding: 6px 10px; border-radius: 6px; color: white; }
#model-frame img, #real-frame img { image-rendering: pixelated; }
"""


# -- views ------------------------------------------------------------------------------------------
def status_html(session: RolloutSession, r: StepResult) -> str:
    """The state badge (``data-state`` for scripts) and the step's numbers."""
    colour = "#%02x%02x%02x" % STATE_COLOURS[r.state]
    extra = [f"step {r.step}", f"task {session.task}"]
    if r.reward is not None:
        extra.append(f"reward {r.reward:+.3f}")
    if session.guarded:
        extra.append(f"re-anchors {session.reanchors}")
    if r.paused:
        extra.append("paused")
    return (f'<div id="state-badge" data-state="{r.state}" data-step="{r.step}" style="background:{colour}">'
            f'{html.escape(r.state)} | {html.escape(" · ".join(extra))}'
            f'{"<br>" + html.escape(r.summary()) if r.values else ""}</div>')


def traces_figure(session: RolloutSession, fps: float):
    """The last TRACE_STEPS steps' normalised predictors against the paper's thresholds."""
    fig = per_frame_trace_figure(session.traces(TRACE_STEPS), PAPER_THRESHOLDS, fps=fps)
    fig.update_layout(height=420, margin=dict(l=40, r=10, t=50, b=30))
    return fig


def frame_image(r: StepResult, map_name: str) -> np.ndarray:
    heat = r.maps.get(map_name) if map_name != "none" else None
    return overlay(r.frame, heat, r.state, scale=SCALE)


def real_image(r: StepResult) -> Optional[np.ndarray]:
    return None if r.real_frame is None else overlay(r.real_frame, scale=SCALE)


def task_choices(domain: str) -> tuple[list[str], list[str]]:
    """(runnable, unavailable) task names of a domain."""
    from mmbench2_lab.envs import is_runnable
    names = [t.name for t in tasks(domain)]
    runnable = [n for n in names if is_runnable(n)]
    return runnable, [n for n in names if n not in runnable]


def unavailable_text(domain: str) -> str:
    runnable, missing = task_choices(domain)
    if not runnable:
        return f"No {domain} task runs here (simulator not installed or not supported): " + ", ".join(missing)
    if not missing:
        return f"All {len(runnable)} {domain} tasks run here."
    return f"Unavailable here ({len(missing)}, simulator not installed or not supported): " + ", ".join(missing)


# -- the app ----------------------------------------------------------------------------------------
def build_app(world_model, *, task: str = DEFAULT_TASK, seed: int = 0, fps: float = 10.0,
              model_name: str = "") -> gr.Blocks:
    """The Blocks app for ``world_model``; each browser tab starts its own session on ``task``."""
    from mmbench2_lab.envs import is_runnable
    from mmbench2_lab.tasks import get_task

    start_domain = get_task(task).domain
    if not is_runnable(task):
        raise ValueError(f"task {task!r} cannot run here; `mmbench2-lab tasks --runnable` lists those that can")

    def new_session() -> RolloutSession:
        return RolloutSession(world_model, task, seed=seed)

    def view(session: RolloutSession, r: StepResult, map_name: str, *, plot: bool = True, error: str = ""):
        """Values for OUTPUTS: session, model frame, real frame, status, plot, error."""
        return (session, frame_image(r, map_name), gr.update(value=real_image(r), visible=session.side_by_side),
                status_html(session, r), traces_figure(session, fps) if plot else gr.skip(), error)

    def shielded(handler):
        """Show any error in the page instead of failing the event; start a session if there is none."""
        @functools.wraps(handler)
        def run(session, *args):
            try:
                session = new_session() if session is None else session
                return handler(session, *args)
            except Exception as err:  # the app must outlive any bad input
                return (session, gr.skip(), gr.skip(), gr.skip(), gr.skip(),
                        f"**{type(err).__name__}:** {err}")
        return run

    @shielded
    def start(session, map_name):
        return view(session, session.last, map_name)

    @shielded
    def step(session, keys, action, map_name):
        session.maps = map_name != "none"
        if action and action.strip():
            r = session.step([float(v) for v in action.replace(",", " ").split()])
        else:
            r = session.step(keys=[k for k in keys.split(",") if k] if keys else [])
        return view(session, r, map_name, plot=r.step % PLOT_EVERY == 0)

    @shielded
    def pause(session, map_name):
        session.toggle_pause()
        return view(session, session.last, map_name, plot=False)

    @shielded
    def reset(session, map_name):
        return view(session, session.reset(), map_name)

    @shielded
    def switch_task(session, task_name, map_name):
        return view(session, session.switch_task((task_name or "").strip()), map_name)

    @shielded
    def set_mode(session, side_by_side, guarded_mode, map_name):
        return view(session, session.set_mode(side_by_side=side_by_side, guarded=guarded_mode), map_name)

    def choose_domain(domain):
        runnable, _ = task_choices(domain)
        return gr.update(choices=runnable, value=None), unavailable_text(domain)

    # Every step's picture is a file in Gradio's cache: delete those older than 10 minutes, every 5.
    with gr.Blocks(title="mmbench2-lab: steer a world model", delete_cache=(300, 600)) as demo:
        holder = gr.State(None, delete_callback=lambda s: s.close() if s is not None else None)
        gr.Markdown("## Steer a world model\n"
                    f"Model: `{model_name or 'in memory'}`. Hold **arrows / WASD** to steer (ArrowRight/Left: "
                    "action dim 0, ArrowUp/Down: dim 1, D/A: dim 2, W/S: dim 3), **space** pauses, **R** "
                    "resets. The border ring is the hallucination state: grey stable, amber drifting, red "
                    "hallucinating (the paper's thresholds on the normalised predictors).")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    frame = gr.Image(label="world model", elem_id="model-frame", format="png", type="numpy",
                                     interactive=False, buttons=[], height=300)
                    real = gr.Image(label="real simulator", elem_id="real-frame", format="png", type="numpy",
                                    interactive=False, buttons=[], height=300, visible=False)
                status = gr.HTML(elem_id="status")
                error = gr.Markdown(elem_id="error-box")
                with gr.Row():
                    run = gr.Checkbox(label=f"run ({fps:g} fps without keys)", elem_id="run-toggle")
                    pause_btn = gr.Button("Pause (space)", elem_id="pause-btn")
                    reset_btn = gr.Button("Reset (R)", elem_id="reset-btn")
                    step_btn = gr.Button("Step once", elem_id="step-btn")
            with gr.Column(scale=2):
                domain = gr.Dropdown(domains(), value=start_domain, label="domain", elem_id="domain")
                task_box = gr.Dropdown(task_choices(start_domain)[0], value=task, label="task",
                                       elem_id="task-dropdown", allow_custom_value=True)
                unavailable = gr.Markdown(unavailable_text(start_domain), elem_id="unavailable")
                map_name = gr.Radio(list(MAPS), value="none", label="map overlay (where the model is unsure)",
                                    elem_id="map-overlay")
                side = gr.Checkbox(label="real simulator beside the model", elem_id="side-by-side")
                guard = gr.Checkbox(label="guarded: re-anchor on the real frame when hallucinating",
                                    elem_id="guarded")
                action = gr.Textbox(label="or type an action (the task's dims, comma-separated)",
                                    elem_id="action-box", placeholder="e.g. 0.5, -1, 0")
        plot = gr.Plot(label="predictors", elem_id="traces")
        keys = gr.Textbox(elem_id="keys-held", visible="hidden")
        timer = gr.Timer(1.0 / fps, active=False)

        outputs = [holder, frame, real, status, plot, error]
        demo.load(start, [holder, map_name], outputs, api_name="start")
        step_btn.click(step, [holder, keys, action, map_name], outputs, api_name="step")
        timer.tick(step, [holder, keys, action, map_name], outputs, api_visibility="private", trigger_mode="once",
                   show_progress="hidden")
        pause_btn.click(pause, [holder, map_name], outputs, api_name="pause", show_progress="hidden")
        reset_btn.click(reset, [holder, map_name], outputs, api_name="reset")
        task_box.input(switch_task, [holder, task_box, map_name], outputs, api_name="switch_task")
        domain.input(choose_domain, domain, [task_box, unavailable], api_visibility="private")
        side.input(set_mode, [holder, side, guard, map_name], outputs, api_name="set_mode")
        guard.input(set_mode, [holder, side, guard, map_name], outputs, api_visibility="private")
        # Held keys or the run toggle switch the timer on; releasing everything switches it off.
        for trigger in (keys.change, run.change):
            trigger(lambda k, r: gr.Timer(active=bool(k) or r), [keys, run], timer, api_visibility="private",
                    show_progress="hidden")
    demo.queue(default_concurrency_limit=16)
    return demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve ``demo`` (127.0.0.1 unless ``host`` says otherwise) with the keyboard handler."""
    return demo.launch(server_name=host, server_port=port, js=KEY_JS, css=CSS, prevent_thread_lock=not block,
                       footer_links=["api"], quiet=not block)
