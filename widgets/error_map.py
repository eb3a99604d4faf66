"""Compression error map: per-layer relative error (or rank) of the emulator, layers x module types, for any
ratio and either rank allocation (uniform, or global within the same parameter budget)."""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emloc.allocation import allocation_at_ratio
from emloc.svd_emulator import EmulatorFactors
from emloc.reports import error_curves, errors_at_ranks, errors_at_ratio, layer_grid
from widgets._base import COLOURS, TEMPLATE, FigureView, stat_line

ERRORS = {"whitened": "calibration error ‖(W−W')X‖/‖WX‖ (activation-aware)",
          "plain": "weight error ‖W−W'‖/‖W‖ (plain SVD)"}
SHOW = {"error": "relative error per module", "rank": "rank per module",
        "rank_change": "rank change vs uniform per module"}
ALLOCATIONS = {"uniform": "uniform (every module keeps ρ)",
               "global": "global (same budget, least summed error)"}
# Colour scales that keep small values visible: no white at the low end; the change map is white at 0.
SCALES = {"error": "YlOrRd", "rank": "Viridis", "rank_change": "RdBu"}
COLOURBAR = {"error": "rel. error", "rank": "rank", "rank_change": "Δ rank"}


class ErrorMap(FigureView):
    """A ratio slider, a spectrum choice, the rank allocation and what to show; the heatmap and the
    savings bars follow instantly.

    The error curves of every module are read once from the cached spectra; a slider move only
    looks up the rank ``rho`` picks in each curve (uniform) or reruns the greedy allocation on the cached
    spectra (global, :func:`emloc.allocation.allocation_at_ratio`). Traces: ``error`` (heatmap,
    ``z[layer][type]``: the error, the rank, or the rank change vs uniform, per ``show_dropdown``) and
    ``saved`` (parameters saved per layer, in millions). The allocation starts at ``global`` when the
    report comes from a global build (it has ``rank_uniform``).
    """

    def __init__(self, factors: EmulatorFactors, ratio: float | None = None):
        self.report = factors.report
        self.spectra = factors.spectra
        self.curves = {kind: error_curves(factors.spectra, kind) for kind in ERRORS}
        start = float(ratio if ratio is not None else self.report["ratio"].iloc[0])
        self.ratio_slider = widgets.FloatSlider(min=0.05, max=0.95, step=0.05, value=round(start, 2),
                                                description="ratio ρ", readout_format=".2f",
                                                layout=widgets.Layout(width="500px"))
        self.kind_dropdown = widgets.Dropdown(options=[(label, kind) for kind, label in ERRORS.items()],
                                              value="whitened", description="error",
                                              layout=widgets.Layout(width="500px"))
        self.allocation_dropdown = widgets.Dropdown(
            options=[(label, key) for key, label in ALLOCATIONS.items()], description="allocation",
            value="global" if "rank_uniform" in self.report.columns else "uniform",
            layout=widgets.Layout(width="500px"))
        self.show_dropdown = widgets.Dropdown(options=[(label, key) for key, label in SHOW.items()],
                                              value="error",
                                              description="show", layout=widgets.Layout(width="500px"))
        self.stats = stat_line("")
        controls = [self.ratio_slider, self.kind_dropdown, self.allocation_dropdown, self.show_dropdown,
                    self.stats]
        super().__init__(self._empty_figure(), controls)
        self.update()
        for control in controls[:-1]:
            control.observe(self.update, "value")


    def _empty_figure(self) -> go.Figure:
        figure = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], shared_yaxes=True,
                               horizontal_spacing=0.03,
                               subplot_titles=("relative error per module", "parameters saved per layer"))
        figure.add_trace(go.Heatmap(name="relative error", meta="error", colorscale=SCALES["error"], zmin=0,
                                    colorbar=dict(title="rel. error", x=1.02, len=0.9),
                                    hovertemplate="layer %{y} · %{x}<br>%{text}<extra></extra>"),
                         row=1, col=1)
        figure.add_trace(go.Bar(name="parameters saved", meta="saved", orientation="h",
                                marker_color=COLOURS["emulator"],
                                hovertemplate="layer %{y}: %{x:.3f} M parameters saved<extra></extra>"),
                         row=1, col=2)
        figure.update_yaxes(title_text="layer", autorange="reversed",
                            dtick=1 if len(set(self.report["layer"])) <= 12 else 5,
                            row=1, col=1)
        figure.update_xaxes(title_text="module type", row=1, col=1)
        figure.update_xaxes(title_text="millions", row=1, col=2)
        figure.update_layout(template=TEMPLATE, height=520, showlegend=False,
                             margin=dict(l=60, r=90, t=80, b=50))
        return figure

    def table(self):
        """The per-module table at the current ratio and allocation (a pandas DataFrame, for export);
        ``rank_uniform`` is the rank the uniform rule gives."""
        rho, curves = self.ratio_slider.value, self.curves[self.kind_dropdown.value]
        uniform = errors_at_ratio(self.report, curves, rho)
        if self.allocation_dropdown.value == "uniform":
            return uniform.assign(rank_uniform=uniform["rank"])
        ranks = allocation_at_ratio(self.report, self.spectra, rho)
        return errors_at_ranks(self.report, curves, dict(zip(ranks["module"], ranks["rank_global"]))) \
            .assign(rank_uniform=uniform["rank"].to_numpy())

    def update(self, _change=None) -> None:
        rho, kind, show = self.ratio_slider.value, self.kind_dropdown.value, self.show_dropdown.value
        table = self.table().assign(rank_change=lambda t: t["rank"] - t["rank_uniform"])
        errors, ranks, uniform = (layer_grid(table, c) for c in ("error", "rank", "rank_uniform"))
        text = np.char.add(np.char.add("error ", np.char.mod("%.3f", errors.to_numpy())),
                           np.char.add(" · rank ", _rank_text(ranks)))
        text = np.char.add(text, np.char.add(" (uniform ", np.char.add(_rank_text(uniform), ")")))
        text = np.where(ranks.isna().to_numpy(), "left dense (not compressed)", text)
        z = layer_grid(table, show).to_numpy().astype(float)
        saved = table.groupby("layer")["params_saved"].sum().reindex(errors.index) / 1e6
        before, after = int(table["params_before"].sum()), int(table["params_after"].sum())
        with self.figure.batch_update():
            self.trace("error").update(z=z, x=list(errors.columns), y=list(errors.index), text=text,
                                       colorscale=SCALES[show], colorbar_title_text=COLOURBAR[show],
                                       **_colour_range(z, show))
            self.trace("saved").update(x=saved.to_numpy(), y=list(saved.index))
            self.figure.layout.annotations[0].text = SHOW[show]
            what = ERRORS[kind] if show == "error" else SHOW[show]
            self.figure.layout.title.text = (f"Emulator at ρ = {rho:.2f}, {self.allocation_dropdown.value} "
                                             f"allocation: {what}")
        self.stats.value = (f"ρ = {rho:.2f}: the compressed layers keep {after / 1e6:.2f} M of "
                            f"{before / 1e6:.2f} M parameters (saves {(before - after) / 1e6:.2f} M, "
                            f"{100 * (1 - after / before):.0f}%) · "
                            f"mean error {table['error'].mean():.3f}, worst {table['error'].max():.3f} "
                            f"({table.loc[table['error'].idxmax(), 'module']}), "
                            f"Σ error² {(table['error'] ** 2).sum():.3f}"
                            f" · {int((table['rank_change'] != 0).sum())} modules off the uniform rank")
        self.refresh()


def _colour_range(z: np.ndarray, show: str) -> dict:
    """From 0 to the largest value (small errors stay visible); the rank change symmetric around 0."""
    largest = float(np.nanmax(np.abs(z))) if z.size else 0.0
    if show == "rank_change":
        return {"zmin": -(largest or 1), "zmax": largest or 1}
    return {"zmin": 0, "zmax": largest or 1}


def _rank_text(grid) -> np.ndarray:
    """Ranks as text; a module left dense (no rank, NaN) shows as '-'."""
    return np.where(grid.isna().to_numpy(), "-", grid.fillna(0).to_numpy().astype(int).astype(str))


def error_map(factors: EmulatorFactors, ratio: float | None = None) -> ErrorMap:
    """The compression error map for an emulator's factors (``run.factors()``)."""
    return ErrorMap(factors, ratio)
