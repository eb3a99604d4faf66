"""Correction inspector: per-layer misalignment before vs after the LoRA correction, and the clamp."""
from __future__ import annotations

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from emloc.correction import reclamp_report
from emloc.reports import compensation_by_layer, misalignment_by_layer
from widgets._base import COLOURS, TEMPLATE, FigureView, stat_line

ALL = "all modules"


class CorrectionInspector(FigureView):
    """A ``lambda`` slider (log scale; "no clamp" turns it off) recomputes the correction report from the
    saved ``B~`` and ``D`` (:func:`emloc.correction.reclamp_report`) and redraws per layer:
    misalignment ``s ||D - D_applied|| / ||W' Q + s B~||`` before (``D_applied = 0``) and after, and the
    share of LoRA columns the clamp scaled down.

    Traces: ``before``, ``after`` (top), ``clamped`` (middle, % of columns), and the diagnostics of the
    saved report (bottom, independent of ``lambda``): ``coefficient`` (the share ``c`` of the emulator's
    error ``(W - W') Q`` the learned update ``s B~`` compensates; 1 = all of it) and ``cosine``.
    """

    def __init__(self, report: pd.DataFrame, tensors: dict[str, torch.Tensor], clamp: float | None = 3.0):
        self.saved_report, self.tensors = report, tensors
        # base 3 with exponents on a 0.1 grid from -2.1: lambda = 1 and the official 3 are slider positions
        # (base 10 snapped 3 to 3.16 in the browser); the range is about 0.1 .. 100
        self.lambda_slider = widgets.FloatLogSlider(value=clamp or 3.0, base=3, min=-2.1, max=4.2, step=0.1,
                                                    description="clamp λ", readout_format=".3g",
                                                    layout=widgets.Layout(width="500px"))
        self.no_clamp = widgets.Checkbox(value=clamp is None, description="no clamp (λ = ∞)")
        self.type_dropdown = widgets.Dropdown(options=[ALL, *dict.fromkeys(report["type"])], value=ALL,
                                              description="modules")
        self.stats = stat_line("")
        controls = [widgets.HBox([self.lambda_slider, self.no_clamp]), self.type_dropdown, self.stats]
        super().__init__(self._empty_figure(report), controls)
        self.update()
        for control in (self.lambda_slider, self.no_clamp, self.type_dropdown):
            control.observe(self.update, "value")

    @property
    def lam(self) -> float | None:
        return None if self.no_clamp.value else float(self.lambda_slider.value)


    def _empty_figure(self, report: pd.DataFrame) -> go.Figure:
        figure = make_subplots(rows=3, cols=1, shared_xaxes=True, row_heights=[0.45, 0.25, 0.3],
                               vertical_spacing=0.07,
                               subplot_titles=("misalignment of original + adapter vs fine-tuned emulator, "
                                               "on span(A)",
                                               "LoRA columns scaled down by the clamp",
                                               "how much of the emulator's error the adapter learned "
                                               "(1 = all)"))
        for name, label in (("before", "before correction (B A as trained)"),
                            ("after", "after correction (A', B^)")):
            figure.add_trace(go.Scatter(name=label, meta=name, mode="lines+markers", line_color=COLOURS[name],
                                        hovertemplate=f"{label}<br>layer %{{x}}<br>%{{y:.4f}}"
                                                      f"<extra></extra>"),
                             row=1, col=1)
        figure.add_trace(go.Bar(name="clamped columns", meta="clamped", marker_color=COLOURS["clamped"],
                                showlegend=False,
                                hovertemplate="layer %{x}: %{y:.1f}% of columns clamped<br>%{text}"
                                              "<extra></extra>"),
                         row=2, col=1)
        for name, label, colour in (("coefficient", "c: s B~ ≈ c (W − W')Q", COLOURS["emulator"]),
                                    ("cosine", "cos(s B~, (W − W')Q)", COLOURS["plain"])):
            figure.add_trace(go.Scatter(name=label, meta=name, mode="lines+markers", line_color=colour,
                                        hovertemplate=f"{label}<br>layer %{{x}}: %{{y:.3g}}<extra></extra>"),
                             row=3, col=1)
        figure.add_hline(y=1.0, line_dash="dot", line_color="#aaaaaa", row=3, col=1)
        figure.update_yaxes(title_text="s‖D − D_applied‖ / ‖W'Q + sB~‖", row=1, col=1,
                            rangemode="tozero")
        figure.update_yaxes(title_text="% clamped", range=[0, 100], row=2, col=1)
        figure.update_yaxes(title_text="c, cosine", row=3, col=1)
        figure.update_xaxes(title_text="layer", row=3, col=1)
        if report["layer"].nunique() <= 12:
            figure.update_xaxes(dtick=1)
        figure.update_layout(template=TEMPLATE, height=720, margin=dict(l=70, r=20, t=120, b=50),
                             legend=dict(orientation="h", y=1.09, x=1, xanchor="right", yanchor="bottom"),
                             title=dict(y=0.99, yanchor="top"))  # title at the very top, the legend below it
        return figure

    def report(self) -> pd.DataFrame:
        """The per-module correction report at the current ``lambda`` (a pandas DataFrame, for export)."""
        return reclamp_report(self.tensors, self.saved_report, self.lam)

    def update(self, _change=None) -> None:
        self.lambda_slider.disabled = self.no_clamp.value
        report = self.report()
        module_type = None if self.type_dropdown.value == ALL else self.type_dropdown.value
        layers = misalignment_by_layer(report, module_type)
        x = list(layers.index)
        text = [f"{m} of {n} modules touched" for m, n in zip(layers["modules_clamped"], layers["modules"])]
        with self.figure.batch_update():
            self.trace("before").update(x=x, y=layers["misalignment_before"].to_numpy())
            self.trace("after").update(x=x, y=layers["misalignment_after"].to_numpy())
            self.trace("clamped").update(x=x, y=100 * layers["clamped_share"].to_numpy(), text=text)
            if "update_mismatch_coefficient" in self.saved_report:
                learned = compensation_by_layer(self.saved_report, module_type)
                self.trace("coefficient").update(x=list(learned.index),
                                                 y=learned["update_mismatch_coefficient"].to_numpy())
                self.trace("cosine").update(x=list(learned.index),
                                            y=learned["update_mismatch_cosine"].to_numpy())
            lam = "no clamp" if self.lam is None else f"λ = {self.lam:.3g}"
            self.figure.layout.title.text = f"LoRA correction ({lam}): misalignment per layer"
        touched = int((report["clamped_columns"] > 0).sum())
        self.stats.value = (f"{lam}: the clamp touched {touched} of {len(report)} modules and "
                            f"{int(report['clamped_columns'].sum())} of {int(report['columns'].sum())} "
                            f"LoRA columns · "
                            f"mean misalignment {report['misalignment_before'].mean():.4f} before → "
                            f"{report['misalignment_after'].mean():.4f} after")
        self.refresh()


def correction_inspector(report: pd.DataFrame, tensors: dict[str, torch.Tensor],
                         clamp: float | None = 3.0) -> CorrectionInspector:
    """The inspector for a correction: ``run.correction_report()``, ``run.correction_tensors()`` and
    the clamp it was made with (``run.config.correction.clamp``)."""
    return CorrectionInspector(report, tensors, clamp)
