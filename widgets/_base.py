"""What every view shares: a plotly figure built once, shown in an ``Output``, and the colours.

The figure is a plain ``go.Figure`` (DESIGN §7: ``FigureWidget`` needs anywidget and bloats saved
notebooks). Observers change its traces in place with ``fig.batch_update()`` and then call
:meth:`FigureView.refresh`, which puts the figure's plotly mime bundle into the ``Output`` widget's
``outputs`` trait. Setting that trait is synchronous and needs no running frontend, so tests can
move a slider and read ``view.figure.data[i]`` straight away.
"""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
import plotly.io as pio

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
VARIANT_LABELS = {
    "zero_shot": "zero-shot original",
    "emulator_lora": "emulator + LoRA",
    "transfer_uncorrected": "original + LoRA (no correction)",
    "transfer_corrected": "original + corrected LoRA",
    "full_lora": "LoRA on the original",
}
TEMPLATE = "plotly_white"
_MIME = pio.renderers["plotly_mimetype"]


def new_figure(**layout) -> go.Figure:
    figure = go.Figure()
    figure.update_layout(template=TEMPLATE, margin=dict(l=60, r=20, t=60, b=50), hovermode="closest", **layout)
    return figure


class FigureView(widgets.VBox):
    """Controls above a figure. Subclasses build ``self.figure`` and wire the controls' observers."""

    def __init__(self, figure: go.Figure, controls: list[widgets.Widget], **kwargs):
        self.figure = figure
        self.output = widgets.Output()
        super().__init__([*controls, self.output], **kwargs)
        self.refresh()

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
