"""Interactive views (ipywidgets + plotly) over emloc results. They read core results and call core
functions; they never re-implement the math.

Each factory takes a result object and returns an ``ipywidgets`` container holding its plotly figure
(``view.figure``) and its controls (e.g. ``view.rank_slider``), so tests can set ``.value`` and read
the trace data without a browser.
"""
from widgets.correction import CorrectionInspector, correction_inspector
from widgets.error_map import ErrorMap, error_map
from widgets.fidelity import FidelityView, fidelity_view
from widgets.results import ResultsBoard, results_board
from widgets.samples import (SampleGallery, dreambooth_summary_figure, image_grid, sample_gallery,
                             timestep_error_figure)
from widgets.spectrum import SpectrumExplorer, spectrum_explorer
from widgets.training import TrainingMonitor, training_monitor

__all__ = ["spectrum_explorer", "error_map", "training_monitor", "correction_inspector", "results_board",
           "fidelity_view", "sample_gallery", "SpectrumExplorer", "ErrorMap", "TrainingMonitor",
           "CorrectionInspector", "ResultsBoard", "FidelityView", "SampleGallery", "image_grid",
           "timestep_error_figure", "dreambooth_summary_figure"]
