"""Compression error map: per-layer relative error of the emulator, layers x module types, for any ratio."""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emloc.emulator import EmulatorFactors
from emloc.reports import error_curves, errors_at_ratio, layer_grid
from widgets._base import COLOURS, TEMPLATE, FigureView, stat_line

ERRORS = {"whitened": "calibration error ‖(W−W')X‖/‖WX‖ (activation-aware)",
          "plain": "weight error ‖W−W'‖/‖W‖ (plain SVD)"}


class ErrorMap(FigureView):
    """A ratio slider and a spectrum choice; the heatmap and the savings bars follow instantly.

    The error curves of every module are read once from the cached spectra; a slider move only
    looks up the rank ``rho`` picks in each curve. Traces: ``error`` (heatmap, ``z[layer][type]``)
    and ``saved`` (parameters saved per layer, in millions).
    """

    def __init__(self, factors: EmulatorFactors, ratio: float | None = None):
        self.report = factors.report
        self.curves = {kind: error_curves(factors.spectra, kind) for kind in ERRORS}
        start = float(ratio if ratio is not None else self.report["ratio"].iloc[0])
        self.ratio_slider = widgets.FloatSlider(min=0.05, max=0.95, step=0.05, value=round(start, 2),
                                                description="ratio ρ", readout_format=".2f",
                                                layout=widgets.Layout(width="500px"))
        self.kind_dropdown = widgets.Dropdown(options=[(label, kind) for kind, label in ERRORS.items()],
                                              value="whitened", description="error",
                                              layout=widgets.Layout(width="500px"))
        self.stats = stat_line("")
        super().__init__(self._empty_figure(), [self.ratio_slider, self.kind_dropdown, self.stats])
        self.update()
        self.ratio_slider.observe(self.update, "value")
        self.kind_dropdown.observe(self.update, "value")


    def _empty_figure(self) -> go.Figure:
        figure = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], shared_yaxes=True, horizontal_spacing=0.03,
                               subplot_titles=("relative error per module", "parameters saved per layer"))
        figure.add_trace(go.Heatmap(name="relative error", meta="error", colorscale="Oranges", zmin=0, zmax=1,
                                    colorbar=dict(title="rel. error", x=1.02, len=0.9),
                                    hovertemplate="layer %{y} · %{x}<br>%{text}<extra></extra>"), row=1, col=1)
        figure.add_trace(go.Bar(name="parameters saved", meta="saved", orientation="h", marker_color=COLOURS["emulator"],
                                hovertemplate="layer %{y}: %{x:.3f} M parameters saved<extra></extra>"), row=1, col=2)
        figure.update_yaxes(title_text="layer", autorange="reversed", dtick=1 if len(set(self.report["layer"])) <= 12 else 5,
                            row=1, col=1)
        figure.update_xaxes(title_text="module type", row=1, col=1)
        figure.update_xaxes(title_text="millions", row=1, col=2)
        figure.update_layout(template=TEMPLATE, height=520, showlegend=False, margin=dict(l=60, r=90, t=80, b=50))
        return figure

    def table(self):
        """The per-module table at the current ratio (a pandas DataFrame, for export)."""
        return errors_at_ratio(self.report, self.curves[self.kind_dropdown.value], self.ratio_slider.value)

    def update(self, _change=None) -> None:
        rho, kind = self.ratio_slider.value, self.kind_dropdown.value
        table = self.table()
        errors, ranks = layer_grid(table, "error"), layer_grid(table, "rank")
        text = np.char.add(np.char.add("error ", np.char.mod("%.3f", errors.to_numpy())),
                           np.char.add(" · rank ", ranks.to_numpy().astype(int).astype(str)))
        saved = table.groupby("layer")["params_saved"].sum().reindex(errors.index) / 1e6
        before, after = int(table["params_before"].sum()), int(table["params_after"].sum())
        with self.figure.batch_update():
            self.trace("error").update(z=errors.to_numpy(), x=list(errors.columns), y=list(errors.index), text=text)
            self.trace("saved").update(x=saved.to_numpy(), y=list(saved.index))
            self.figure.layout.title.text = f"Emulator at ρ = {rho:.2f}: {ERRORS[kind]}"
        self.stats.value = (f"ρ = {rho:.2f}: the compressed layers keep {after / 1e6:.2f} M of {before / 1e6:.2f} M "
                            f"parameters (saves {(before - after) / 1e6:.2f} M, {100 * (1 - after / before):.0f}%) · "
                            f"mean error {table['error'].mean():.3f}, worst {table['error'].max():.3f} "
                            f"({table.loc[table['error'].idxmax(), 'module']})")
        self.refresh()


def error_map(factors: EmulatorFactors, ratio: float | None = None) -> ErrorMap:
    """The compression error map for an emulator's factors (``run.factors()``)."""
    return ErrorMap(factors, ratio)
