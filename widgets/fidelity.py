"""Fidelity view: the emulator's end-to-end drift layer by layer next to its per-layer calibration error.

The picture of issue 12: each layer's calibration error is small (measured on the original model's
inputs), yet the residual stream drifts further with every layer, because each emulated layer reads
the drifted output of the ones before it.
"""
from __future__ import annotations

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from emloc.fidelity import fidelity_by_layer
from widgets._base import COLOURS, FigureView, new_figure, stat_line

ALL = "all modules"


class FidelityView(FigureView):
    """A module-type menu for the calibration error, a linear/log axis toggle and a KL readout.

    Traces (keys for ``view.trace(key)``): ``drift`` (``||h_l - h~_l|| / ||h_l||`` after layer ``l``),
    ``calibration mean`` and ``calibration max`` (per layer, over the chosen modules of the emulator
    report). :meth:`set_fidelity` swaps in another fidelity report (e.g. after a rebuild) in place.
    """

    def __init__(self, fidelity: dict, emulator_report: pd.DataFrame):
        self.fidelity, self.emulator_report = fidelity, emulator_report
        types = list(dict.fromkeys(emulator_report["type"]))
        self.type_dropdown = widgets.Dropdown(options=[ALL, *types], value=ALL, description="modules")
        self.scale = widgets.ToggleButtons(options=["linear", "log"], value="linear", description="y axis")
        self.stats = stat_line("")
        super().__init__(self._empty_figure(), [widgets.HBox([self.type_dropdown, self.scale]), self.stats])
        self.update()
        self.type_dropdown.observe(self.update, "value")
        self.scale.observe(self.update, "value")

    def _empty_figure(self) -> go.Figure:
        # the legend sits below the x-axis title, not on it
        figure = new_figure(height=460, legend=dict(orientation="h", y=-0.22, yanchor="top"),
                            xaxis_title="decoder layer", yaxis_title="relative error")
        figure.update_layout(margin_b=120)
        figure.add_trace(go.Scatter(name="end-to-end drift of the residual stream ‖h−h̃‖/‖h‖",
                                    meta="drift",
                                    mode="lines+markers", line_color=COLOURS["emulator"],
                                    hovertemplate="after layer %{x}: drift %{y:.4f}<extra></extra>"))
        figure.add_trace(go.Scatter(name="per-layer calibration error ‖(W−W')X‖/‖WX‖, mean",
                                    meta="calibration mean",
                                    mode="lines+markers", line_color=COLOURS["original"],
                                    hovertemplate="layer %{x}: mean calibration error %{y:.4f}"
                                                  "<extra></extra>"))
        figure.add_trace(go.Scatter(name="per-layer calibration error, max", meta="calibration max",
                                    mode="lines",
                                    line=dict(color=COLOURS["original"], dash="dot"),
                                    hovertemplate="layer %{x}: max calibration error %{y:.4f}"
                                                  "<extra></extra>"))
        return figure

    def table(self) -> pd.DataFrame:
        """Per layer: ``drift``, ``calibration_error_mean``, ``calibration_error_max`` (for export)."""
        module_type = None if self.type_dropdown.value == ALL else self.type_dropdown.value
        return fidelity_by_layer(self.fidelity, self.emulator_report, module_type)

    def set_fidelity(self, fidelity: dict, emulator_report: pd.DataFrame | None = None) -> None:
        """Show another fidelity report (and emulator report); the figure is updated in place."""
        self.fidelity = fidelity
        if emulator_report is not None:
            self.emulator_report = emulator_report
        self.update()

    def update(self, _change=None) -> None:
        table = self.table()
        layers = list(table.index)
        with self.figure.batch_update():
            self.trace("drift").update(x=layers, y=table["drift"].to_numpy())
            self.trace("calibration mean").update(x=layers, y=table["calibration_error_mean"].to_numpy())
            self.trace("calibration max").update(x=layers, y=table["calibration_error_max"].to_numpy())
            self.figure.layout.yaxis.type = self.scale.value
            self.figure.layout.title.text = (f"Small per-layer error, compounding end-to-end error "
                                             f"({self.type_dropdown.value})")
        self.stats.value = _kl_html(self.fidelity, table)
        self.refresh()


def _kl_html(fidelity: dict, table: pd.DataFrame) -> str:
    kl = fidelity["kl"]
    if not kl["all"]["tokens"]:
        return "no predicted tokens in the fidelity report: measure it on longer samples"
    parts = [f"<b>KL(original ‖ emulator)</b> per token: mean {kl['all']['mean']:.4f}, "
             f"median {kl['all']['median']:.4f}, p90 {kl['all']['p90']:.4f} "
             f"over {kl['all']['tokens']} tokens"]
    if kl["response"]["tokens"]:
        parts.append(f"on response tokens {kl['response']['mean']:.4f}")
    parts.append(f"same top-1 next token {100 * kl['all']['top1_agreement']:.1f}%")
    last = table.index[-1]
    parts.append(f"drift after the last layer {table.loc[last, 'drift']:.3f} vs mean calibration error "
                 f"{table['calibration_error_mean'].mean():.3f}")
    return " · ".join(parts)


def fidelity_view(fidelity: dict, emulator_report: pd.DataFrame) -> FidelityView:
    """The fidelity view for a fidelity report (``fidelity.json``) and the emulator's build report."""
    return FidelityView(fidelity, emulator_report)
