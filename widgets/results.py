"""Results board: the variants' accuracy (with the share of the loss gap they closed) or loss, and memory."""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from emloc.reports import memory_table, variant_summary
from widgets._base import COLOURS, TEMPLATE, VARIANT_COLOURS, VARIANT_LABELS, FigureView, stat_line

METRICS = {"accuracy": "exact-match accuracy", "loss": "response-token loss"}
GAP = "share of the zero-shot → full-LoRA loss gap closed"
# the gap bars are drawn within these bounds so one far-off variant (the emulator without LoRA can be at
# -200%) does not squash the others; the label and the hover keep the true value
GAP_SHOWN = (-0.5, 1.5)


def _share(value: float, digits: int = 1) -> str:
    """``0.953 -> '95.3%'``; NaN (no gap defined) -> ``'n/a'``."""
    return "n/a" if value != value else f"{value:.{digits}%}"


class ResultsBoard(FigureView):
    """``metric`` (accuracy or loss) chooses the left panel; the right panel shows parameters and weight
    memory of the original model and the emulator. Next to each accuracy bar, a hatched bar shows the share of
    the zero-shot -> full-LoRA loss gap the variant closed (``loss_gap_closed``: 0 = zero-shot, 1 = full
    LoRA), which tells what a short training taught a variant while every accuracy is still 0. Intervals
    (:func:`emloc.reports.variant_summary`, the sweeps' seed-level statistics): Student-t over seeds, each
    seed one observation; for one seed, Wilson over its test items (``correct``, per seed from
    :func:`emloc.evaluation.item_correctness`, counts them) and no interval on the loss.

    Traces: ``variants`` (bars with error bars), ``gap`` (loss gap closed; hidden for the loss metric),
    ``memory`` (bars, MB).
    """

    def __init__(self, results: dict | list[dict], correct: dict | list[dict] | None = None):
        self.results = [results] if isinstance(results, dict) else list(results)
        self.summary = variant_summary(self.results, correct)
        self.memory = memory_table(self.results[0])
        self.metric = widgets.ToggleButtons(options=[(label, key) for key, label in METRICS.items()],
                                            value="accuracy", description="metric",
                                            style={"button_width": "auto"})  # full labels
        self.stats = stat_line(self._stats_text())
        super().__init__(self._figure(), [self.metric, self.stats])
        self.update()
        self.metric.observe(self.update, "value")


    def _figure(self) -> go.Figure:
        n = len(self.summary)
        figure = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.1,
                               subplot_titles=(f"the {n} variants on the test split", "weights in memory"))
        labels = [VARIANT_LABELS.get(v, v) for v in self.summary.index]
        colours = [VARIANT_COLOURS[v] for v in self.summary.index]
        figure.add_trace(go.Bar(name="accuracy", meta="variants", x=labels, marker_color=colours,
                                offsetgroup="metric", showlegend=False), row=1, col=1)
        gap = self.summary["loss_gap_closed"].to_numpy(dtype=float)
        shown = np.clip(gap, *GAP_SHOWN)
        labels_gap = [_share(g, 0) + (" ▼" if g < GAP_SHOWN[0] else " ▲" if g > GAP_SHOWN[1] else "")
                      for g in gap]
        figure.add_trace(go.Bar(name="loss gap closed", meta="gap", x=labels, y=shown, customdata=gap,
                                offsetgroup="gap",
                                marker=dict(color=colours, opacity=0.55,
                                            pattern=dict(shape="/", fgcolor="#333")),
                                text=labels_gap, textposition="outside", constraintext="none",
                                cliponaxis=False,
                                hovertemplate="%{x}<br>closed %{customdata:.1%} of the zero-shot → "
                                "full-LoRA loss gap<br>(0 = zero-shot, 1 = LoRA on the original)"
                                "<extra></extra>",
                                showlegend=False), row=1, col=1)
        memory = self.memory
        figure.add_trace(go.Bar(name="memory", meta="memory", x=list(memory.index),
                                y=memory["megabytes"].to_numpy(), showlegend=False,
                                marker_color=[COLOURS[m] for m in memory.index],
                                text=[f"{p / 1e6:.1f} M params" for p in memory["parameters"]],
                                textposition="auto",
                                hovertemplate="%{x}: %{y:.1f} MB<br>%{text}<extra></extra>"), row=1, col=2)
        figure.update_yaxes(title_text="MB (weights)", row=1, col=2)
        figure.update_layout(template=TEMPLATE, height=480, margin=dict(l=60, r=20, t=80, b=120),
                             barmode="group", bargroupgap=0.05)
        return figure

    def update(self, _change=None) -> None:
        metric, table = self.metric.value, self.summary
        y = table[metric].to_numpy()
        plus, minus = table[f"{metric}_high"].to_numpy() - y, y - table[f"{metric}_low"].to_numpy()
        kinds = table["interval" if metric == "accuracy" else "loss_interval"]
        hover = [f"{METRICS[metric]} {v:.3f}<br>95% interval [{lo:.3f}, {hi:.3f}] ({kind})<br>"
                 f"{seeds} seed(s), {n} test items<br>loss gap closed: {_share(gap)}"
                 for v, lo, hi, kind, seeds, n, gap in zip(y, table[f"{metric}_low"], table[f"{metric}_high"],
                                                           kinds, table["seeds"], table["n"],
                                                           table["loss_gap_closed"])]
        with_gap = metric == "accuracy"
        with self.figure.batch_update():
            self.trace("variants").update(y=y, error_y=dict(type="data", array=plus, arrayminus=minus,
                                                            visible=True),
                                          hovertext=hover,
                                          hovertemplate="%{x}<br>%{hovertext}<extra></extra>")
            self.trace("gap").visible = with_gap
            self.figure.update_yaxes(title_text=f"{METRICS[metric]} (solid) and<br>loss gap closed (hatched)"
                                     if with_gap else METRICS[metric], row=1, col=1,
                                     range=self._range(metric))
            self.figure.layout.title.text = (f"Results: {METRICS[metric]} and the {GAP} per variant"
                                             if with_gap else f"Results: {METRICS[metric]} per variant")
        self.refresh()

    def _range(self, metric: str) -> list[float] | None:
        """Accuracy and the gap share on one axis: at least [0, 1], wider (up to :data:`GAP_SHOWN`) when a
        variant closed less than none of the gap or more than all of it, with room for the percentage
        labels."""
        if metric != "accuracy":
            return None
        gap = self.summary["loss_gap_closed"].dropna().clip(*GAP_SHOWN)
        low = min(0.0, float(gap.min()) - 0.15) if len(gap) else 0.0
        high = max(1.0, float(gap.max())) + 0.15 if len(gap) else 1.0
        return [low, high]

    def _stats_text(self) -> str:
        memory = self.memory
        seeds = len(self.results)
        interval = {"t": "Student-t over seeds",
                    "wilson": "Wilson over test items (one seed)"}[self.summary["interval"].iloc[0]]
        return (f"{seeds} seed(s), {int(self.summary['n'].iloc[0])} test items each, "
                f"95% accuracy intervals: {interval} · "
                f"emulator {memory.loc['emulator', 'parameters'] / 1e6:.1f} M vs original "
                f"{memory.loc['original', 'parameters'] / 1e6:.1f} M parameters "
                f"({100 * memory.loc['emulator', 'share_of_original']:.0f}%, "
                f"{memory.loc['emulator', 'megabytes']:.0f} MB vs "
                f"{memory.loc['original', 'megabytes']:.0f} MB)")


def results_board(results: dict | list[dict], correct: dict | list[dict] | None = None) -> ResultsBoard:
    """The results board for ``run.results()``, or a list of results (one per seed).

    ``correct=item_correctness(run.results(), run.data)`` (a list, one per seed, for several runs;
    :func:`emloc.evaluation.item_correctness`) gives a single seed's Wilson interval its exact item count.
    """
    return ResultsBoard(results, correct)
