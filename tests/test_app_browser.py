"""The Gradio app (`mmbench2-lab app`) served on loopback: driven by headless Chromium, by eight concurrent
API clients, and by bad input that must never take it down."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from _session_fixtures import OTHER_TASK, TASK, save_tiny_world_model
from mmbench2_lab.hallucination import STATES
from mmbench2_lab.session import STATE_COLOURS

pytest.importorskip("gradio")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """`mmbench2-lab app` on a free loopback port with a tiny model; yields (url, process)."""
    model_dir = save_tiny_world_model(tmp_path_factory.mktemp("model"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w+")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmbench2_lab.cli", "app", "--checkpoint", model_dir,
                             "--task", TASK, "--port", str(port), "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                proc.kill()
                pytest.fail(f"the app did not come up on {url}:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    yield url, proc
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.seek(0)
    assert "Traceback" not in log.read(), "the app logged an unhandled exception"
    log.close()


def client(url):
    from gradio_client import Client
    return Client(url, verbose=False)


def badge(html: str) -> dict:
    """data-state and data-step of the status badge."""
    import re
    m = re.search(r'data-state="(\w+)" data-step="(\d+)"', html)
    assert m, f"no state badge in {html!r}"
    return {"state": m.group(1), "step": int(m.group(2))}


# -- in a real browser --------------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`apt-get install -y chromium`, "
                                             "or run scripts/setup.sh as root)")
def test_browser_keys_step_the_model_show_the_state_and_switch_task(app, tmp_path):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    from PIL import Image
    url, _ = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#state-badge")

        def frame() -> tuple[bytes, dict]:
            """The model frame's PNG bytes and the badge, once steps have settled."""
            last = None
            while (now := page.get_attribute("#state-badge", "data-step")) != last:
                last = now
                time.sleep(0.7)
            src = page.get_attribute("#model-frame img", "src")
            return page.request.get(src).body(), {"state": page.get_attribute("#state-badge", "data-state"),
                                                  "step": int(last)}

        before, shown = frame()
        assert shown["step"] == 0
        page.locator("h2").click()  # focus the page, not a field
        page.keyboard.down("ArrowRight")
        page.wait_for_function("() => +document.querySelector('#state-badge').dataset.step >= 2")
        page.keyboard.up("ArrowRight")
        after, shown = frame()
        assert shown["step"] >= 2 and after != before
        # The frame's border ring is the badge's state colour.
        assert shown["state"] in STATES
        pixels = np.asarray(Image.open(io.BytesIO(after)).convert("RGB"))
        assert tuple(pixels[0, 0]) == tuple(pixels[-1, -1]) == STATE_COLOURS[shown["state"]]

        page.keyboard.press(" ")  # pause: held keys no longer step
        page.wait_for_function("() => document.querySelector('#state-badge').textContent.includes('paused')")
        page.keyboard.down("w")
        time.sleep(1.5)
        page.keyboard.up("w")
        assert frame()[1]["step"] == shown["step"]
        page.keyboard.press(" ")

        page.fill("#task-dropdown input", OTHER_TASK)
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => document.querySelector('#state-badge').textContent.includes('{OTHER_TASK}')")
        assert frame()[1]["step"] == 0

        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot))
        browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] >= 900 and pixels.var() > 100.0, "the screenshot is blank"


# -- over the API ------------------------------------------------------------------------------------
def test_eight_concurrent_sessions_all_keep_stepping(app):
    url, proc = app
    n_steps = 4

    def drive(i: int) -> list[dict]:
        c = client(url)
        out = []
        for _ in range(n_steps):
            image, _real, status, _plot, error = c.predict(["ArrowUp", "ArrowLeft", "d", ""][i % 4], "", "none",
                                                           api_name="/step")
            assert error == "", error
            assert os.path.getsize(image["path"] if isinstance(image, dict) else image) > 0
            out.append(badge(status))
        c.close()
        return out

    with ThreadPoolExecutor(8) as pool:
        runs = list(pool.map(drive, range(8), timeout=150))
    for run in runs:  # each client has its own session: its steps count 1, 2, 3, 4
        assert [b["step"] for b in run] == list(range(1, n_steps + 1))
        assert all(b["state"] in STATES for b in run)
    assert proc.poll() is None


def disconnect_mid_step(url: str) -> None:
    """Queue a step over HTTP, then open its result stream and drop the connection without reading."""
    body = json.dumps({"data": ["ArrowUp", "", "none"]}).encode()
    req = urllib.request.Request(url + "gradio_api/call/step", data=body, headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(req, timeout=30).read())["event_id"]
    host, port = url.split("//")[1].strip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"GET /gradio_api/call/step/{event_id} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())


def test_bad_input_is_shown_and_the_app_keeps_answering(app):
    url, proc = app
    c = client(url)
    *_, error = c.predict("atari-pongg", "none", api_name="/switch_task")
    assert "UnknownTaskError" in error and "Did you mean atari-pong" in error
    *_, error = c.predict("pygame-cartpole-balance", "none", api_name="/switch_task")
    assert "cannot run here" in error
    *_, error = c.predict("", "0, 0, 0, 1", "none", api_name="/step")  # 4 values for pong's 3 dims
    assert "ValueError" in error and "got 4" in error
    *_, error = c.predict("", "one, two", "none", api_name="/step")
    assert "ValueError" in error
    *_, error = c.predict("q", "", "none", api_name="/step")
    assert "unknown keys" in error
    # A padded 16-d action with values in the task's padding dims is fine: those dims are ignored.
    _, _, status, _, error = c.predict("", ",".join(["0.5"] * 16), "none", api_name="/step")
    assert error == "" and badge(status)["step"] == 1
    for _ in range(3):
        disconnect_mid_step(url)
    time.sleep(1.0)
    _, _, status, _, error = c.predict("ArrowUp", "", "none", api_name="/step")
    assert error == "" and badge(status)["step"] == 2  # the same session carried on
    assert proc.poll() is None
    c.close()
    assert urllib.request.urlopen(url, timeout=10).status == 200


# -- the command -------------------------------------------------------------------------------------
def test_app_command_binds_loopback_by_default():
    from mmbench2_lab.cli import build_parser
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.checkpoint, args.variant) == ("127.0.0.1", 7860, None, None)
    assert build_parser().parse_args(["app", "--variant", "combined", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_app_command_without_a_bundled_model_suggests_checkpoint(tmp_path, monkeypatch, capsys):
    import mmbench2_lab.checkpoints as checkpoints
    from mmbench2_lab.cli import main
    monkeypatch.setattr(checkpoints, "BUNDLED_DIR", tmp_path / "no-bundled-model")
    assert main(["app"]) == 2
    assert "--checkpoint DIR" in capsys.readouterr().err
