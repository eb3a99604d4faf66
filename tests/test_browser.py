"""A real browser: JupyterLab renders a widget notebook, a slider moved with the keyboard updates it.

Uses Debian's ``chromium`` (installed with apt-get when missing) driven by Python ``playwright`` through
its executable path; no browser is downloaded. Skips only when chromium cannot be installed.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

# The notebook the browser runs: a slider over the rank k, the relative error curve of a spectrum
# (emloc.lowrank.relative_error_curve) as a plotly figure with a marker at k, and a readout label.
CELLS = [
    "import ipywidgets as widgets\nimport plotly.graph_objects as go\nimport torch\nfrom IPython.display import display\n"
    "from emloc.lowrank import relative_error_curve",
    "sigma = torch.linspace(3.0, 0.1, 24) ** 2\ncurve = relative_error_curve(sigma).tolist()\n"
    "slider = widgets.IntSlider(value=4, min=0, max=len(sigma), description='rank k')\n"
    "readout = widgets.Label()\nreadout.add_class('emloc-readout')\nplot = widgets.Output()\n\n"
    "def draw(change=None):\n"
    "    k = slider.value\n"
    "    fig = go.Figure([go.Scatter(y=curve, name='relative error'),\n"
    "                     go.Scatter(x=[k], y=[curve[k]], mode='markers', marker_size=12, name='kept rank')])\n"
    "    fig.update_layout(height=300, width=600, margin=dict(l=40, r=10, t=30, b=40), xaxis_title='rank k')\n"
    "    readout.value = f'k = {k}: relative error {curve[k]:.4f}'\n"
    "    plot.clear_output(wait=True)\n"
    "    with plot:\n"
    "        display(fig)\n\n"
    "slider.observe(draw, names='value')\ndraw()\ndisplay(widgets.VBox([slider, readout, plot]))",
]


def _chromium() -> str:
    """Path of Debian's chromium, installing it with apt-get when missing; skip only if that fails."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root): "
                    "run `apt-get install -y chromium` to enable the browser test")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"chromium could not be installed with apt-get ({type(exc).__name__}): the browser test needs it")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get ran but no chromium executable appeared: the browser test needs it")
    return found


def _playwright():
    """``playwright.sync_api`` from PyPI (installed into this environment when missing; never its browser download)."""
    try:
        from playwright import sync_api
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "playwright"], check=True, timeout=600)
        from playwright import sync_api
    return sync_api


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer {url} within {timeout} s")


def _write_notebook(folder: Path) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    path = folder / "widget_check.ipynb"
    nbformat.write(notebook, path)
    return path


def _start_lab(root: Path, runtime: Path, port: int, token: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
               "--LabApp.expose_app_in_browser=True", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    settings = runtime / "settings"
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))  # no "get notified about news?" toast over the page
    env = dict(os.environ, PYTHONPATH=pythonpath, JUPYTER_RUNTIME_DIR=str(runtime), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(runtime / "workspaces"), PLOTLY_RENDERER="plotly_mimetype")
    log = open(runtime / "lab.log", "wb")
    return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)


KERNEL_IDLE = """() => {
  const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = widget && widget.sessionContext && widget.sessionContext.session && widget.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle';
}"""
MARKER_X = """() => {
  const plot = document.querySelector('.jp-RenderedPlotly.js-plotly-plot');
  return plot && plot.data && plot.data.length > 1 ? plot.data[1].x[0] : null;
}"""
SHOWS_RANK = """(k) => {
  const plot = document.querySelector('.jp-RenderedPlotly.js-plotly-plot');
  const label = document.querySelector('.emloc-readout');
  return !!plot && !!plot.data && plot.data.length > 1 && plot.data[1].x[0] === k
    && !!label && label.innerText.startsWith(`k = ${k}:`);
}"""



@contextlib.contextmanager
def lab_page(chromium: str, sync_api, root: Path, runtime: Path, notebook: str, profile: Path, height: int,
             idle_timeout: int):
    """A JupyterLab server on ``root`` and a chromium page with ``notebook`` open and its kernel idle; both are
    stopped afterwards whatever happens."""
    port, token = _free_port(), secrets.token_hex(16)
    lab = _start_lab(root, runtime, port, token)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", lab)
        with sync_api.sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": height})
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook}?token={token}&reset", timeout=60_000)
                page.wait_for_function(KERNEL_IDLE, timeout=idle_timeout)
                yield page
            finally:
                context.close()
    finally:
        lab.terminate()
        try:
            lab.wait(timeout=20)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait()


def test_widget_notebook_in_real_browser(tmp_path):
    chromium = _chromium()
    sync_api = _playwright()
    root, runtime = tmp_path / "notebooks", tmp_path / "runtime"
    root.mkdir()
    runtime.mkdir()
    notebook = _write_notebook(root)
    screenshot = tmp_path / "screenshot.png"
    with lab_page(chromium, sync_api, root, runtime, notebook.name, tmp_path / "profile", 900, 90_000) as page:
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        slider = page.locator(".widget-slider").first
        slider.wait_for(state="attached", timeout=90_000)
        page.locator(".jp-RenderedPlotly .main-svg").first.wait_for(state="attached", timeout=60_000)
        readout = page.locator(".emloc-readout").first
        readout.wait_for(state="attached", timeout=30_000)
        before_text, before_x = readout.inner_text(), page.evaluate(MARKER_X)
        assert before_text.startswith("k = 4:"), before_text
        assert before_x == 4

        handle = slider.locator(".noUi-handle").first
        handle.scroll_into_view_if_needed()
        handle.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        page.wait_for_function(SHOWS_RANK, arg=7, timeout=30_000)
        after_text = readout.inner_text()
        assert after_text != before_text
        page.locator(".jp-RenderedPlotly").first.scroll_into_view_if_needed()
        page.screenshot(path=str(screenshot))
    assert screenshot.stat().st_size > 10_000
    _keep_screenshot(screenshot)


def _keep_screenshot(screenshot: Path) -> None:
    """Copy the screenshot to runs/browser/ (gitignored) for a human to look at."""
    target = REPO / "runs" / "browser" / "screenshot.png"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)
    except OSError:
        pass


# ---- the suite's own notebooks (issue 14): 01 and 04 on the quick-preset run, a real control moved ---------

ALL_CELLS_RAN = """() => {
  const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const kernel = widget && widget.sessionContext && widget.sessionContext.session && widget.sessionContext.session.kernel;
  if (!kernel || !widget.content || !widget.content.model) return 'waiting';
  const cells = widget.content.model.cells;
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code' || !cell.sharedModel.getSource().trim()) continue;
    const error = cell.outputs.toJSON().find(o => o.output_type === 'error');
    if (error) return `error in cell ${i}: ${error.ename}: ${error.evalue}`;
    if (!cell.executionCount) return 'waiting';
  }
  return kernel.status === 'idle' ? 'done' : 'waiting';
}"""
TRACE = """(meta) => {
  for (const plot of document.querySelectorAll('.jp-RenderedPlotly.js-plotly-plot')) {
    const trace = plot.data && plot.data.find(t => t.meta === meta);
    if (trace) return JSON.stringify({x: trace.x, y: trace.y, title: plot.layout.title && plot.layout.title.text});
  }
  return null;
}"""
TRACE_CHANGED = """([meta, before]) => {
  for (const plot of document.querySelectorAll('.jp-RenderedPlotly.js-plotly-plot')) {
    const trace = plot.data && plot.data.find(t => t.meta === meta);
    if (trace) return JSON.stringify({x: trace.x, y: trace.y, title: plot.layout.title && plot.layout.title.text}) !== before;
  }
  return false;
}"""
# notebook, stage its run needs, slider label, trace whose data must change, keys to press
SUITE_NOTEBOOKS = [
    ("01_singular_value_spectra.ipynb", "build", "rank r", "at rank", ["ArrowRight"] * 3),
    ("04_lora_correction.ipynb", "correct", "clamp λ", "after", ["ArrowLeft"] * 12),
]


def _prepare_notebook_run(stage: str) -> None:
    """Finish the stages the notebook reads in the shared notebook run (the one nbval uses), reusing what exists."""
    from emloc.notebook import ensure, notebook_run
    ensure(notebook_run(), stage)


@pytest.mark.integration
@pytest.mark.parametrize("name, stage, label, meta, keys", SUITE_NOTEBOOKS, ids=[n[:2] for n, *_ in SUITE_NOTEBOOKS])
def test_suite_notebook_in_jupyterlab(tmp_path, name, stage, label, meta, keys):
    chromium = _chromium()
    sync_api = _playwright()
    _prepare_notebook_run(stage)
    root, runtime = tmp_path / "notebooks", tmp_path / "runtime"
    root.mkdir()
    runtime.mkdir()
    shutil.copyfile(REPO / "notebooks" / name, root / name)  # a copy: JupyterLab's autosave never touches the repo
    shots = REPO / "runs" / "browser"
    shots.mkdir(parents=True, exist_ok=True)
    stem = Path(name).stem
    with lab_page(chromium, sync_api, root, runtime, name, tmp_path / "profile", 1000, 120_000) as page:
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        status = page.wait_for_function(f"() => {{ const s = ({ALL_CELLS_RAN})(); return s === 'waiting' ? null : s; }}",
                                        timeout=600_000).json_value()
        assert status == "done", status
        slider = page.locator(".widget-slider", has_text=label).first
        slider.wait_for(state="attached", timeout=60_000)
        slider.scroll_into_view_if_needed()
        page.locator(".jp-RenderedPlotly .main-svg").first.wait_for(state="attached", timeout=60_000)
        before = page.evaluate(TRACE, meta)
        assert before is not None, f"no plotly trace with meta {meta!r} in the page"
        page.screenshot(path=str(shots / f"{stem}-before.png"))
        readout = slider.locator(".widget-readout").first.inner_text()
        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for key in keys:
            page.keyboard.press(key)
        page.wait_for_function(TRACE_CHANGED, arg=[meta, before], timeout=60_000)
        # every key press is one update in the kernel: let the last one land before reading and the screenshot
        page.wait_for_function(f"() => ({ALL_CELLS_RAN})() === 'done'", timeout=120_000)
        page.wait_for_timeout(1000)
        after = page.evaluate(TRACE, meta)
        assert slider.locator(".widget-readout").first.inner_text() != readout
        page.screenshot(path=str(shots / f"{stem}-after.png"))
    assert json.loads(after) != json.loads(before)
    assert (shots / f"{stem}-after.png").stat().st_size > 10_000
