"""Training monitor: LoRA loss curves, emulator vs original model, live or from a finished history."""
from __future__ import annotations

import time

import ipywidgets as widgets

from widgets._base import COLOURS, FigureView, new_figure, stat_line

MODELS = {"emulator": "LoRA on the emulator", "original": "LoRA on the original model"}


class TrainingMonitor(FigureView):
    """Pass :meth:`on_loss` as ``on_loss`` to ``emloc.notebook.ensure`` / ``pipeline.run_pipeline``
    (``on_loss(which, step, loss)``), or :meth:`callback` to ``pipeline.train`` (``on_loss(step, loss)``).

    Traces ``emulator`` and ``original`` hold ``(step, loss)``; ``progress[which]`` is a progress bar.
    """

    def __init__(self, total_steps: int | None = None, loss_label: str = "training loss (response tokens)"):
        self.total_steps = total_steps
        self.points: dict[str, list[tuple[int, float]]] = {which: [] for which in MODELS}
        self._started: dict[str, float] = {}
        self.progress = {which: widgets.IntProgress(value=0, min=0, max=total_steps or 1, description=which,
                                                    bar_style="info", layout=widgets.Layout(width="420px"))
                         for which in MODELS}
        self.stats = {which: stat_line("waiting") for which in MODELS}
        figure = new_figure(title_text="LoRA training loss", height=400, legend=dict(orientation="h", y=-0.2))
        for which, label in MODELS.items():
            figure.add_scatter(name=label, meta=which, x=[], y=[], mode="lines+markers",
                               line_color=COLOURS[which], marker_size=4,
                               hovertemplate=f"{label}<br>step %{{x}}<br>loss %{{y:.4f}}<extra></extra>")
        figure.update_xaxes(title_text="optimizer step")
        figure.update_yaxes(title_text=loss_label)
        rows = [widgets.HBox([self.progress[w], self.stats[w]]) for w in MODELS]
        super().__init__(figure, rows)


    def on_loss(self, which: str, step: int, loss: float) -> None:
        """Add one logged loss of model ``which`` ('emulator' or 'original') and redraw."""
        if which not in MODELS:
            raise ValueError(f"which must be one of {list(MODELS)}, got {which!r}")
        now = time.perf_counter()
        self._started.setdefault(which, now)
        self.points[which].append((int(step), float(loss)))
        done = len(self.points[which])
        pace = (now - self._started[which]) / max(done - 1, 1)
        self._show(which, f"step {step}{self._of()}, loss {loss:.4f}, {pace:.2f} s/step")

    def callback(self, which: str):
        """``on_loss(step, loss)`` for ``pipeline.train(run, which, on_loss=...)``."""
        return lambda step, loss: self.on_loss(which, step, loss)

    def show_history(self, which: str, summary: dict | list) -> None:
        """Draw a finished run: ``summary`` is ``run.history(which)`` or a ``[(step, loss), ...]`` list."""
        history = summary["history"] if isinstance(summary, dict) else summary
        self.points[which] = [(int(s), float(loss)) for s, loss in history]
        if self.total_steps is None and history:
            self.total_steps = max(s for s, _ in self.points[which])
        text = f"finished: {len(history)} steps, final loss {history[-1][1]:.4f}" if history else "no steps"
        if isinstance(summary, dict) and "seconds_per_step" in summary:
            text += f", {summary['seconds_per_step']:.2f} s/step"
        self._show(which, text, finished=True)

    def _of(self) -> str:
        return f"/{self.total_steps}" if self.total_steps else ""

    def _show(self, which: str, text: str, finished: bool = False) -> None:
        steps, losses = zip(*self.points[which]) if self.points[which] else ((), ())
        with self.figure.batch_update():
            self.trace(which).update(x=list(steps), y=list(losses))
        bar = self.progress[which]
        bar.max = max(self.total_steps or len(steps), 1)
        bar.value = bar.max if finished else min(len(steps), bar.max)
        bar.bar_style = "success" if finished or bar.value >= bar.max else "info"
        self.stats[which].value = f"<span style='color:{COLOURS[which]}'>{MODELS[which]}</span>: {text}"
        self.refresh()


def training_monitor(histories: dict | None = None, total_steps: int | None = None,
                     loss_label: str = "training loss (response tokens)") -> TrainingMonitor:
    """A loss monitor. ``histories``: ``{'emulator': run.history('emulator'), ...}`` to render finished
    runs; otherwise an empty monitor to feed live through :meth:`TrainingMonitor.on_loss`. ``loss_label``:
    the y axis (what the loss is)."""
    monitor = TrainingMonitor(total_steps, loss_label)
    for which, summary in (histories or {}).items():
        monitor.show_history(which, summary)
    return monitor
