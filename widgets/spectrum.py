"""Spectrum explorer: the singular values of ``W`` (plain) and of ``W S`` (whitened), per module."""
from __future__ import annotations

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emloc.svd_emulator import EmulatorFactors
from emloc.reports import rank_summary, spectrum_curves
from widgets._base import COLOURS, TEMPLATE, FigureView, stat_line

KINDS = {"plain": "plain SVD of W", "whitened": "activation-aware (whitened W S)"}


class SpectrumExplorer(FigureView):
    """Pick a layer and module type; move the rank slider to see kept energy and relative error.

    Traces (keys for ``view.trace(key)``): ``sigma plain``, ``sigma whitened`` (``sigma_i / sigma_1``, log
    scale), ``rank`` (the slider's rank on the left), ``error plain``, ``error whitened`` (relative error of
    keeping ``k``), ``at rank`` (both errors at the slider's rank), ``ratio rank`` (the rank ``rho`` picks).
    """

    def __init__(self, factors: EmulatorFactors):
        self.factors = factors
        report = factors.report
        self.rows = {(int(row.layer), row.type): row for row in report.itertuples(index=False)}
        layers, types = sorted({k[0] for k in self.rows}), list(dict.fromkeys(report["type"]))
        self.layer_slider = widgets.SelectionSlider(options=layers, value=layers[0], description="layer",
                                                    continuous_update=False)
        self.type_dropdown = widgets.Dropdown(options=types, value=types[0], description="module")
        self.rank_slider = widgets.IntSlider(min=0, max=1, value=1, description="rank r",
                                             layout=widgets.Layout(width="500px"))
        self.stats = stat_line("")
        figure = self._empty_figure()
        controls = [widgets.HBox([self.layer_slider, self.type_dropdown]), self.rank_slider, self.stats]
        super().__init__(figure, controls)
        self._load_module()
        self.layer_slider.observe(self._on_module, "value")
        self.type_dropdown.observe(self._on_module, "value")
        self.rank_slider.observe(self._on_rank, "value")

    @property
    def module(self) -> str:
        return self._row().module

    def _row(self):
        """The selected report row; for a module left dense (e.g. the last down_proj) the nearest layer's."""
        layer, kind = self.layer_slider.value, self.type_dropdown.value
        return self.rows.get((layer, kind)) or min(
            (row for (_, t), row in self.rows.items() if t == kind), key=lambda row: abs(row.layer - layer))


    def _empty_figure(self) -> go.Figure:
        figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
            "singular values (normalised, log scale)", "relative error of keeping the top k"))
        for kind in KINDS:
            figure.add_trace(go.Scatter(name=KINDS[kind], meta=f"sigma {kind}", legendgroup=kind,
                                        mode="lines", line_color=COLOURS[kind],
                                        hovertemplate=f"{KINDS[kind]}<br>i = %{{x}}<br>σ_i/σ_1 = %{{y:.3g}}"
                                                      f"<extra></extra>"),
                             row=1, col=1)
        figure.add_trace(go.Scatter(name="slider rank", meta="rank", mode="lines",
                                    line=dict(color="black", dash="dot"), showlegend=False,
                                    hovertemplate="slider rank r = %{x}<extra></extra>"), row=1, col=1)
        for kind, label in (("plain", "weight error ‖W−W'‖/‖W‖"),
                            ("whitened", "calibration error ‖(W−W')X‖/‖WX‖")):
            figure.add_trace(go.Scatter(name=label, meta=f"error {kind}", legendgroup=kind, mode="lines",
                                        showlegend=False,
                                        line_color=COLOURS[kind],
                                        hovertemplate=f"{label}<br>k = %{{x}}<br>error = %{{y:.3f}}"
                                                      f"<extra></extra>"),
                             row=1, col=2)
        figure.add_trace(go.Scatter(name="errors at the slider rank", meta="at rank", mode="markers",
                                    showlegend=False,
                                    marker=dict(size=10, color=[COLOURS["plain"], COLOURS["whitened"]],
                                                line=dict(color="black", width=1)),
                                    hovertemplate="r = %{x}<br>error = %{y:.3f}<extra></extra>"),
                         row=1, col=2)
        figure.add_trace(go.Scatter(name="rank chosen by ρ", meta="ratio rank", mode="lines",
                                    line=dict(color="black", dash="dash"),
                                    hovertemplate="rank chosen by ρ: %{x}<extra></extra>"), row=1, col=2)
        figure.update_xaxes(title_text="index i", row=1, col=1)
        figure.update_yaxes(title_text="σ_i / σ_1", type="log", row=1, col=1)
        figure.update_xaxes(title_text="rank k", row=1, col=2)
        figure.update_yaxes(title_text="relative error", range=[0, 1.02], row=1, col=2)
        figure.update_layout(template=TEMPLATE, height=420, margin=dict(l=60, r=20, t=80, b=50),
                             legend=dict(orientation="h", y=-0.18), title_text="Singular value spectra")
        return figure

    def _on_module(self, _change=None) -> None:
        self._load_module()

    def _load_module(self) -> None:
        row = self._row()
        spectra = self.factors.spectra[row.module]
        self.curves = {kind: spectrum_curves(spectra[kind]) for kind in KINDS}
        n = len(self.curves["whitened"]["sigma"])
        with self.rank_slider.hold_trait_notifications():
            self.rank_slider.max = n
            self.rank_slider.value = min(int(row.rank), n)
        with self.figure.batch_update():
            for kind, curves in self.curves.items():
                self.trace(f"sigma {kind}").update(x=list(range(1, len(curves["sigma"]) + 1)),
                                                   y=curves["normalised"])
                self.trace(f"error {kind}").update(x=list(range(len(curves["error"]))), y=curves["error"])
            self.trace("ratio rank").update(x=[row.rank, row.rank], y=[0, 1])
            self.figure.layout.title.text = (f"Singular value spectra of {row.module} "
                                             f"(W: {row.out_features} x {row.in_features})")
        self._update_rank()

    def _on_rank(self, _change=None) -> None:
        self._update_rank()

    def _update_rank(self) -> None:
        row = self._row()
        r = self.rank_slider.value
        summary = {kind: rank_summary(c, r, row.out_features, row.in_features)
                   for kind, c in self.curves.items()}
        floor = float(min(c["normalised"][-1] for c in self.curves.values()))
        with self.figure.batch_update():
            self.trace("rank").update(x=[max(r, 1), max(r, 1)], y=[max(floor, 1e-12), 1])
            self.trace("at rank").update(x=[r, r],
                                         y=[summary["plain"]["error"], summary["whitened"]["error"]])
        self.stats.value = _stats_html(row, summary)
        self.refresh()


def _stats_html(row, summary: dict) -> str:
    w, p = summary["whitened"], summary["plain"]
    return (f"<b>r = {w['rank']}</b> keeps {100 * w['parameter_share']:.1f}% of W's parameters "
            f"(ρ ≈ {w['ratio']:.2f}) · "
            f"<span style='color:{COLOURS['whitened']}'>activation-aware: "
            f"kept energy {100 * w['kept_energy']:.1f}%, "
            f"calibration error {w['error']:.3f}</span> · "
            f"<span style='color:{COLOURS['plain']}'>plain SVD: kept energy {100 * p['kept_energy']:.1f}%, "
            f"weight error {p['error']:.3f}</span><br>"
            f"ratio ρ = {row.ratio:g} picks r = {row.rank} (break-even r = {row.break_even_rank:.0f}: "
            f"below it u v is smaller than W)")


def spectrum_explorer(factors: EmulatorFactors) -> SpectrumExplorer:
    """The spectrum explorer for an emulator's factors (``run.factors()``)."""
    return SpectrumExplorer(factors)
