"""What every view shares: a plotly figure built once, shown in an ``Output``, and the colours.

The figure is a plain ``go.Figure`` (``FigureWidget`` needs anywidget and bloats saved
notebooks). Observers change its traces in place with ``fig.batch_update()`` and then call
:meth:`FigureView.refresh`, which puts the figure's plotly mime bundle into the ``Output`` widget's
``outputs`` trait. Setting that trait is synchronous and needs no running frontend, so tests can
move a slider and read ``view.figure.data[i]`` straight away.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import time
from pathlib import Path

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio

from emloc.errors import EmlocError
from emloc.stages import VARIANT_SPECS

# One colour per role, used by every view: the emulator (and anything activation-aware) is orange,
# the original model blue, the corrected transfer green.
COLOURS = {
    "original": "#1f77b4",
    "emulator": "#ff7f0e",
    "whitened": "#ff7f0e",
    "plain": "#7f7f7f",
    "before": "#d62728",
    "after": "#2ca02c",
    "clamped": "#9467bd",
    "zero_shot": "#7f7f7f",
    "emulator_lora": "#ff7f0e",
    "transfer_uncorrected": "#d62728",
    "transfer_corrected": "#2ca02c",
    "full_lora": "#1f77b4",
}
VARIANT_LABELS = {variant.name: variant.label for variant in VARIANT_SPECS}
"""Every evaluated variant of the registry (:data:`emloc.stages.VARIANT_SPECS`) by its label."""
_VARIANT_ROLES = {**COLOURS, "emulator": "#fdbf6f"}
_SPARE_COLOURS = ("#8c564b", "#e377c2", "#17becf", "#bcbd22")
VARIANT_COLOURS = {variant.name: _VARIANT_ROLES.get(variant.name, _SPARE_COLOURS[i % len(_SPARE_COLOURS)])
                   for i, variant in enumerate(VARIANT_SPECS)}
"""A colour for every variant of the registry: its role's colour, the emulator alone in light orange (else it
would share emulator_lora's orange), and a spare colour for a variant added later, so no view misses one."""
TEMPLATE = "plotly_white"
_MIME = pio.renderers["plotly_mimetype"]


def new_figure(**layout) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(template=TEMPLATE, margin=dict(l=60, r=20, t=60, b=50), hovermode="closest",
                         **layout)
    return figure


def figures_dir() -> Path:
    """Where the "Save HTML" button writes: ``runs/figures`` beside the notebooks' run directory."""
    from emloc.notebook import notebook_run_dir
    return notebook_run_dir().parent / "figures"


def find_chromium() -> str | None:
    """A chromium/chrome executable for kaleido: ``$BROWSER_PATH``, else one on ``PATH``."""
    candidates = [os.environ.get("BROWSER_PATH"),
                  *(shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))]
    return next((c for c in candidates if c and Path(c).exists()), None)


class FigureView(widgets.VBox):
    """Controls above a figure. Subclasses build ``self.figure`` and wire the controls' observers.

    Every view can be taken home: :meth:`save_html` (self-contained interactive HTML), :meth:`save_png`
    (static, through kaleido and a local chromium) and a "Save HTML" button under the controls.
    """

    def __init__(self, figure: go.Figure, controls: list[widgets.Widget], **kwargs):
        self.figure = figure
        self.output = widgets.Output()
        self.save_button = widgets.Button(description="Save HTML", icon="download",
                                          layout=widgets.Layout(width="120px"),
                                          tooltip="write this figure as a standalone interactive HTML file")
        self.saved_label = widgets.HTML("")
        self.save_button.on_click(self._on_save)
        save_row = widgets.HBox([self.save_button, self.saved_label])
        super().__init__([*controls, self.output, save_row], **kwargs)
        self.refresh()

    def save_html(self, path: str | os.PathLike) -> Path:
        """Write the current figure as one standalone HTML file (plotly's JS inlined: works offline, no
        CDN)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.write_html(path, include_plotlyjs=True, full_html=True)
        return path

    def save_png(self, path: str | os.PathLike, scale: float = 2.0) -> Path:
        """Write the current figure as a PNG through kaleido and a local chromium (nothing is downloaded)."""
        if importlib.util.find_spec("kaleido") is None:
            raise EmlocError("PNG export needs kaleido: `pip install kaleido` (it uses the local chromium), "
                             "or use save_html")
        chromium = find_chromium()
        if chromium is None:
            raise EmlocError("PNG export needs a chromium browser: `apt-get install chromium` "
                             "(or set BROWSER_PATH), or use save_html")
        os.environ.setdefault("BROWSER_PATH", chromium)  # kaleido finds the browser through it
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.figure.write_image(path, format="png", scale=scale)
        return path

    def default_filename(self) -> str:
        """``<view>-<YYYYmmdd-HHMMSS>.html``, e.g. ``spectrumexplorer-20250101-093000.html``."""
        return (f"{re.sub(r'[^a-z0-9]+', '', type(self).__name__.lower())}-"
                f"{time.strftime('%Y%m%d-%H%M%S')}.html")

    def _on_save(self, _button=None) -> None:
        try:
            path = self.save_html(figures_dir() / self.default_filename())
            self.saved_label.value = f"saved <code>{path}</code>"
        except (OSError, EmlocError) as error:
            self.saved_label.value = f"<span style='color:#d62728'>could not save: {error}</span>"

    def trace(self, key: str):
        """The trace whose ``meta`` is ``key`` (legend names are for people; keys are for code and tests)."""
        return next(t for t in self.figure.data if t.meta == key)

    def refresh(self) -> None:
        """Show the current figure: replace the ``Output``'s content with its plotly mime bundle."""
        bundle = _MIME.to_mimebundle(self.figure.to_dict())
        bundle["text/plain"] = f"<plotly figure: {self.figure.layout.title.text or 'untitled'}>"
        self.output.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)


def stat_line(text: str) -> widgets.HTML:
    return widgets.HTML(value=text, layout=widgets.Layout(margin="0 0 0 10px"))
