"""Take-home notebooks: executed notebooks as static HTML whose plotly figures stay interactive offline
(issue 14).

``python -m emloc.export --out DIR notebooks/0*.ipynb`` executes each notebook (``--no-execute`` keeps the
outputs it already has) and writes ``DIR/<name>.html`` with nbconvert's HTML exporter. Each page carries
plotly.js once, inline, and no ``<script src>`` pointing at a CDN, so it opens without a server or internet:

- a plotly output (``application/vnd.plotly.v1+json``) becomes a ``<div>`` drawn by the inlined plotly.js;
- a widget (the suite's views) becomes what it showed when the notebook ran: its figures (from the
  saved widget state of its ``Output``) and its text lines. Sliders need a kernel, so they are left out;
- the CDN scripts of the HTML template (require.js, MathJax, the widget manager) are dropped: formulas
  stay as their TeX source.
"""
from __future__ import annotations

import contextlib
import copy
import html
import os
import re
import sys
from pathlib import Path

import plotly.io as pio

from emloc import io
from emloc.arguments import OneLineParser
from emloc.errors import EmlocError, report_errors

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
REMOTE_SCRIPT = re.compile(r"<script[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>\s*</script>", re.IGNORECASE)
REMOTE_LINK = re.compile(r"<link[^>]*\bhref=[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE)


def figure_html(figure: dict) -> str:
    """A plotly figure (its JSON dict) as a ``<div>`` + drawing script; expects plotly.js on the page."""
    return pio.to_html(figure, include_plotlyjs=False, full_html=False, validate=False,
                       config={"responsive": True})


def _static_output(data: dict) -> dict:
    """A display bundle the HTML exporter can show without JavaScript extensions."""
    if PLOTLY in data:
        return {"text/html": figure_html(data[PLOTLY]), "text/plain": data.get("text/plain", "plotly figure")}
    return data


def widget_bundles(model_id: str, state: dict, seen: set | None = None) -> list[dict]:
    """What a widget showed, from the notebook's saved widget state: the display bundles of every ``Output``
    inside it and the text of its ``HTML``/``Label`` widgets, in the order of its children."""
    seen = set() if seen is None else seen
    if model_id in seen or model_id not in state:
        return []
    seen.add(model_id)
    model = state[model_id]
    name, values = model.get("model_name", ""), model.get("state", {})
    if name == "OutputModel":
        return [_static_output(dict(out.get("data", {}))) for out in values.get("outputs", [])
                if out.get("output_type") in ("display_data", "execute_result")]
    if name in ("HTMLModel", "LabelModel") and values.get("value"):
        text = values["value"] if name == "HTMLModel" else html.escape(values["value"])
        return [{"text/html": f"<div class='emloc-widget-text'>{text}</div>", "text/plain": values["value"]}]
    bundles = []
    for child in values.get("children", []):
        if isinstance(child, str) and child.startswith("IPY_MODEL_"):
            bundles += widget_bundles(child[len("IPY_MODEL_"):], state, seen)
    return bundles


def static_notebook(notebook):
    """A copy of an executed notebook with plotly outputs and widget views turned into plain HTML outputs,
    and without widget state (whose renderer would come from a CDN)."""
    notebook = copy.deepcopy(notebook)
    state = notebook.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            if output.get("output_type") not in ("display_data", "execute_result"):
                outputs.append(output)
                continue
            data = dict(output.get("data", {}))
            if WIDGET_VIEW in data:
                bundles = widget_bundles(data[WIDGET_VIEW].get("model_id", ""), state)
                outputs += [{"output_type": "display_data", "data": b, "metadata": {}} for b in bundles]
                continue
            output["data"] = _static_output(data)
            outputs.append(output)
        cell.outputs = outputs
    return notebook


def execute(notebook, folder: Path, timeout: int = 1800, name: str | None = None):
    """Run every cell in a fresh ``python3`` kernel started in ``folder``; the widget state is kept.
    ``name`` (the notebook's file) is what a failing cell's one-line error names."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    # the kernel inherits it: figures as plotly JSON
    os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(folder)}})
    try:
        client.execute()
    except CellExecutionError as error:
        plain = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the kernel colours its traceback
        last = [line for line in plain.strip().splitlines() if line.strip()]
        raise EmlocError(f"a cell of {name or 'the notebook'} failed (run in {folder}: "
                         f"{last[-1][:200] if last else 'error'}): "
                         f"fix it or export the notebook with --no-execute; "
                         f"no page was written") from None
    return notebook


def page_html(notebook) -> str:
    """The HTML page of an executed notebook: plotly.js inline once, no CDN script or stylesheet."""
    from nbconvert import HTMLExporter
    from plotly.offline import get_plotlyjs
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(static_notebook(notebook))
    body = REMOTE_LINK.sub("", REMOTE_SCRIPT.sub("", body))
    if "Plotly.newPlot" in body:
        plotly_js = f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
        body = body.replace("</head>", plotly_js + "</head>", 1)
    return body


def notebook_page(source: str | Path, run_cells: bool = True) -> str:
    """The HTML page of one notebook (executed first unless ``run_cells`` is False); writes nothing."""
    import nbformat
    source = Path(source)
    if not source.is_file():
        raise EmlocError(f"notebook {source} does not exist: check the path; no page was written")
    try:
        notebook = nbformat.read(source, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for a broken file
        raise EmlocError(f"{source} is not a readable notebook ({type(exc).__name__}): check the file; "
                         f"no page was written") from None
    if run_cells:
        notebook = execute(notebook, source.resolve().parent, name=str(source))
    return page_html(notebook)


def export_notebooks(sources: list[str | Path], out_dir: str | Path, run_cells: bool = True) -> list[Path]:
    """Write ``out_dir/<name>.html`` for every notebook, or none: every page is made before the first is
    written, and a failure while writing removes the pages of this call that were not yet in place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EmlocError(f"--out {out_dir} is a file: give --out a folder for the HTML pages")
    stems = [Path(source).stem for source in sources]
    if len(set(stems)) != len(stems):
        raise EmlocError(f"two notebooks are named {next(s for s in stems if stems.count(s) > 1)}.ipynb: "
                         f"their pages would overwrite each other; export them into separate --out folders")
    pages = {out_dir / f"{Path(source).stem}.html": notebook_page(source, run_cells) for source in sources}
    with contextlib.ExitStack() as stack:
        for target, text in pages.items():
            stack.enter_context(io.atomic_path(target)).write_text(text, encoding="utf-8")
    return list(pages)


def export_notebook(source: str | Path, out_dir: str | Path, run_cells: bool = True) -> Path:
    """Write ``out_dir/<name>.html`` for one notebook (executed first unless ``run_cells`` is False)."""
    return export_notebooks([source], out_dir, run_cells)[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m emloc.export --out DIR [--no-execute] NOTEBOOK...``"""
    parser = OneLineParser(prog="emloc export",
                           description="executed notebooks as static HTML with interactive plotly figures")
    parser.add_argument("notebooks", nargs="+", help="notebooks to export")
    parser.add_argument("--out", required=True, help="folder for the HTML pages")
    parser.add_argument("--no-execute", action="store_true",
                        help="keep the notebooks' saved outputs instead of running them")

    def command() -> None:
        args = parser.parse_args(argv)
        for page in export_notebooks(args.notebooks, args.out, run_cells=not args.no_execute):
            print(page, flush=True)

    return report_errors(command)


if __name__ == "__main__":
    sys.exit(main())
