"""Interactive views (ipywidgets + plotly) over emloc results. They read core results and call core
functions; they never re-implement the math."""
