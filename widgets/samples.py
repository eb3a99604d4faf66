"""Sample gallery: what each variant of a denoiser run draws, digit by digit, side by side.

One row per evaluated variant, one column per digit (the held-out subject marked), each cell a stored sample
(``results.json``'s ``samples``, written by the evaluation: nothing is sampled here, so moving a control is
instant). Given several runs (ratios, methods), a menu switches between them.
"""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from emloc.denoiser import HELD_OUT_DIGIT, IMAGE_SIZE, mosaic, stored_samples
from emloc.errors import EmlocError
from widgets._base import VARIANT_LABELS, FigureView, new_figure, stat_line

GAP = 1
"""Blank pixels between two samples."""


class SampleGallery(FigureView):
    """A run menu (when several runs are given) and a slider over the stored samples of each digit.

    Trace (``view.trace("samples")``): one greyscale heatmap of the whole grid (``z`` in ``[0, 1]``, white
    ink on black as the digits are drawn; NaN between cells). :meth:`grid` gives the shown samples as
    ``(variants, digits, 8, 8)``.
    """

    def __init__(self, results_by_run: dict[str, dict]):
        missing = [name for name, results in results_by_run.items() if "samples" not in results]
        if not results_by_run or missing:
            raise EmlocError(f"run {missing[0] if missing else '(none)'} has no stored samples: evaluate a "
                             f"denoiser run (model digits-dit) first")
        self.results_by_run = results_by_run
        names = list(results_by_run)
        self.run_dropdown = widgets.Dropdown(options=names, value=names[0], description="run",
                                             layout=widgets.Layout(width="420px"))
        per_digit = min(next(iter(r["samples"].values()))["per_digit"] for r in results_by_run.values())
        self.sample_slider = widgets.IntSlider(value=1, min=1, max=per_digit, description="sample",
                                               continuous_update=False)
        self.stats = stat_line("")
        controls = [widgets.HBox([self.run_dropdown, self.sample_slider])] if len(names) > 1 else [
            self.sample_slider]
        super().__init__(self._empty_figure(), [*controls, self.stats])
        self.update()
        self.run_dropdown.observe(self.update, "value")
        self.sample_slider.observe(self.update, "value")

    def _empty_figure(self) -> go.Figure:
        figure = new_figure(height=140 + 75 * len(next(iter(self.results_by_run.values()))["samples"]))
        figure.add_trace(go.Heatmap(meta="samples", colorscale="gray", zmin=0, zmax=1, showscale=False,
                                    hovertemplate="%{z:.2f}<extra></extra>"))
        figure.update_yaxes(autorange="reversed", scaleanchor="x", showgrid=False, zeroline=False)
        figure.update_xaxes(showgrid=False, zeroline=False, side="top")
        return figure

    @property
    def results(self) -> dict:
        return self.results_by_run[self.run_dropdown.value]

    def variants(self) -> list[str]:
        return list(self.results["samples"])

    def grid(self) -> np.ndarray:
        """The shown samples: ``(variants, digits, 8, 8)`` in ``[0, 1]``."""
        k = self.sample_slider.value - 1  # the slider counts from 1
        return np.stack([stored_samples(self.results["samples"][v])[:, k] for v in self.variants()])

    def update(self, _change=None) -> None:
        grid, variants = self.grid(), self.variants()
        digits = self.results["samples"][variants[0]]["digits"]
        step = IMAGE_SIZE + GAP
        centres = [i * step + (IMAGE_SIZE - 1) / 2 for i in range(max(len(digits), len(variants)))]
        with self.figure.batch_update():
            self.trace("samples").update(z=mosaic(grid, GAP))
            self.figure.update_xaxes(tickvals=centres[:len(digits)],
                                     ticktext=[f"<b>{d} (subject)</b>" if d == HELD_OUT_DIGIT else str(d)
                                               for d in digits])
            self.figure.update_yaxes(tickvals=centres[:len(variants)],
                                     ticktext=[VARIANT_LABELS.get(v, v) for v in variants])
            self.figure.layout.title.text = (f"Sample {self.sample_slider.value} of each digit, per "
                                             f"variant ({self.run_dropdown.value})")
        figures = self.results["variants"]
        self.stats.value = " · ".join(
            f"<b>{VARIANT_LABELS.get(v, v)}</b>: subject {figures[v]['subject_fidelity']:.0%}, prior "
            f"{figures[v]['prior_preservation']:.0%}" for v in variants if v in figures)
        self.refresh()


def sample_gallery(results_by_run: dict[str, dict] | dict) -> SampleGallery:
    """A :class:`SampleGallery` of one run's results (``run.results()``) or of several, by name."""
    several = all(isinstance(value, dict) and "samples" in value for value in results_by_run.values())
    return SampleGallery(results_by_run if several else {"run": results_by_run})


def image_grid(images: np.ndarray, row_labels: list[str], column_labels: list[str] | None = None,
               title: str = "") -> go.Figure:
    """Images ``(rows, cols, 8, 8)`` in ``[0, 1]`` as one greyscale picture (e.g. the training images)."""
    rows, cols = images.shape[:2]
    step = IMAGE_SIZE + GAP
    figure = new_figure(height=110 + 60 * rows, title=title)
    figure.add_trace(go.Heatmap(z=mosaic(images, GAP), colorscale="gray", zmin=0, zmax=1, showscale=False,
                                hovertemplate="%{z:.2f}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", scaleanchor="x", showgrid=False, zeroline=False,
                        tickvals=[i * step + (IMAGE_SIZE - 1) / 2 for i in range(rows)], ticktext=row_labels)
    figure.update_xaxes(showgrid=False, zeroline=False, side="top", showticklabels=column_labels is not None,
                        tickvals=[j * step + (IMAGE_SIZE - 1) / 2 for j in range(cols)],
                        ticktext=column_labels or [])
    return figure


def timestep_error_figure(table) -> go.Figure:
    """:func:`emloc.denoiser.calibration_error_by_timestep` as a heatmap: one row per emulated linear (block
    by block), one column per timestep range, the colour its calibration error (from 0)."""
    grid = table.pivot_table(index="module", columns="low", values="error", sort=False)
    labels = dict(zip(table["low"], table["timesteps"]))
    figure = new_figure(height=160 + 14 * len(grid),
                        title="Calibration error ‖(W−W')X‖/‖WX‖ by timestep range",
                        xaxis_title="timesteps the inputs were noised at (0: nearly clean)")
    figure.add_trace(go.Heatmap(z=grid.to_numpy(), x=[labels[c] for c in grid.columns], y=list(grid.index),
                                colorscale="Viridis", zmin=0, colorbar_title="error",
                                hovertemplate="%{y}<br>timesteps %{x}: %{z:.3f}<extra></extra>"))
    figure.update_yaxes(autorange="reversed", type="category")
    figure.update_xaxes(type="category")
    return figure


def dreambooth_summary_figure(summary, metric: str = "subject_fidelity") -> go.Figure:
    """Bars with 95% intervals over seeds (``summary``: ``emloc.reports.seed_summary`` of the DreamBooth
    sweep, one row per point, variant and metric): one group per setting, one bar per variant."""
    from widgets._base import VARIANT_COLOURS
    shown = summary[summary["metric"] == metric]
    figure = new_figure(height=460, barmode="group", yaxis_title=metric.replace("_", " "),
                        title=f"{metric.replace('_', ' ')} per variant, mean over "
                              f"{int(shown['seeds'].max())} seeds with 95% intervals",
                        legend=dict(orientation="h", y=-0.25, yanchor="top"))
    figure.update_layout(margin_b=140)
    for variant, rows in shown.groupby("variant", sort=False):
        figure.add_trace(go.Bar(name=VARIANT_LABELS.get(variant, variant), meta=variant, x=rows["point"],
                                y=rows["mean"], marker_color=VARIANT_COLOURS.get(variant),
                                error_y=dict(type="data", symmetric=False, array=rows["high"] - rows["mean"],
                                             arrayminus=rows["mean"] - rows["low"])))
    return figure
