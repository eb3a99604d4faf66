"""Take-home figures and pages: a view saves standalone HTML (and PNG when kaleido can), and an executed
notebook exported to HTML draws its plotly figures in chromium with the network blocked."""
import importlib.util
import re
import shutil

import nbformat
import pytest

import widgets
from emloc import export
from emloc.errors import EmlocError
from test_browser import CHROMIUM_ARGS

HISTORY = {"emulator": [(1, 2.5), (2, 1.75), (3, 1.125)], "original": [(1, 2.25), (2, 1.5)]}


def _no_remote_script(text):
    """No script or stylesheet is fetched: no ``<script src=...>`` at all, no remote ``<link>``.

    (plotly.js itself names URLs in its defaults, e.g. map tiles; those are not fetched for these figures.)"""
    assert not re.findall(r"<script[^>]*\ssrc=", text)
    assert not export.REMOTE_LINK.search(text)


def test_save_html_is_standalone(tmp_path):
    view = widgets.training_monitor(HISTORY)
    path = view.save_html(tmp_path / "figures" / "loss.html")
    text = path.read_text(encoding="utf-8")
    _no_remote_script(text)
    assert text.count("Plotly.newPlot") == 1 and len(text) > 1_000_000  # plotly.js itself is inside
    assert '"meta":"emulator"' in text and "1.125" in text and "LoRA training loss" in text


def test_save_button_writes_under_runs_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("EMLOC_NOTEBOOK_RUN", str(tmp_path / "runs" / "notebooks"))
    view = widgets.training_monitor(HISTORY)
    assert view.save_button in view.children[-1].children
    view.save_button.click()
    (saved,) = (tmp_path / "runs" / "figures").glob("trainingmonitor-*.html")
    assert str(saved) in view.saved_label.value
    assert "1.125" in saved.read_text(encoding="utf-8")


def test_save_png_or_a_one_line_reason(tmp_path):
    view = widgets.training_monitor(HISTORY)
    if importlib.util.find_spec("kaleido") is None or widgets._base.find_chromium() is None:
        with pytest.raises(EmlocError) as error:
            view.save_png(tmp_path / "loss.png")
        assert "\n" not in str(error.value) and "save_html" in str(error.value)
        assert not (tmp_path / "loss.png").exists()
        pytest.skip("kaleido or chromium is missing here: checked the one-line error instead of a PNG")
    path = view.save_png(tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_notebook_expands_widget_views():
    state = {"a": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_b", "IPY_MODEL_c", "IPY_MODEL_a"]}},
             "b": {"model_name": "HTMLModel", "state": {"value": "<b>r = 3</b>"}},
             "c": {"model_name": "OutputModel", "state": {"outputs": [
                 {"output_type": "display_data", "data": {export.PLOTLY: {"data": [{"y": [1, 2]}], "layout": {}}}}]}}}
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("view")
    cell.outputs = [nbformat.v4.new_output("display_data", data={export.WIDGET_VIEW: {"model_id": "a"}, "text/plain": "VBox()"})]
    notebook.cells = [cell]
    notebook.metadata["widgets"] = {export.WIDGET_STATE: {"state": state}}
    static = export.static_notebook(notebook)
    assert "widgets" not in static.metadata and "widgets" in notebook.metadata  # the input is not changed
    texts = [o["data"]["text/html"] for o in static.cells[0].outputs]
    assert texts[0] == "<div class='emloc-widget-text'><b>r = 3</b></div>"
    assert "Plotly.newPlot" in texts[1] and len(texts) == 2  # the cycle back to 'a' is not followed


CELLS = [
    "import plotly.graph_objects as go\nimport widgets\n"
    "go.Figure(go.Scatter(x=[0, 1, 2], y=[3, 1, 2], name='plain plotly'))",
    f"widgets.training_monitor({HISTORY!r})",
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell("# Take-home check\nWith $x^2$ math."),
                      *map(nbformat.v4.new_code_cell, CELLS)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, folder / "take_home.ipynb")
    assert export.main(["--out", str(folder / "html"), str(folder / "take_home.ipynb")]) == 0
    return folder / "html" / "take_home.html"


def test_exported_page_has_plotly_inline_once(exported):
    text = exported.read_text(encoding="utf-8")
    _no_remote_script(text)
    assert text.count("Plotly.newPlot") == 2  # the plain figure and the widget's figure
    assert text.count("plotly.js v") == 1  # the library's banner: inlined once
    assert "1.125" in text and "finished: 3 steps" in text  # the widget's trace data and its text line


def test_exported_page_draws_offline_in_chromium(exported, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed: `apt-get install -y chromium` (.ci/run does it) to run this check")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    blocked = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            def only_files(route):
                if route.request.url.startswith(("file:", "data:")):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            page.route("**/*", only_files)
            page.goto(exported.as_uri())
            page.locator(".main-svg").first.wait_for(state="attached", timeout=30_000)
            drawn = page.evaluate("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                                  ".map(d => d.data.map(t => t.y.length))")
            page.screenshot(path=str(tmp_path / "take_home.png"), full_page=True)
        finally:
            browser.close()
    assert drawn[0] == [3] and sorted(drawn[1]) == [2, 3]
    assert not [url for url in blocked if "plot" in url or url.endswith(".js")], blocked


def test_failing_cell_is_one_plain_line(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("open('no_such_results.json')")])
    with pytest.raises(EmlocError) as error:
        export.execute(notebook, tmp_path, timeout=120)
    message = str(error.value)
    assert "FileNotFoundError" in message and "no_such_results.json" in message
    assert "\x1b" not in message and "\n" not in message
