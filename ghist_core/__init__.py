"""GHIST Studio core: slide I/O, segmentation, expression prediction, cohort analysis.

Everything the app shows is computed here; this package never imports Streamlit.
"""

__version__ = "0.1.0"
