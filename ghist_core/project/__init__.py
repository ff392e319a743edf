"""The project store: one SQLite database per project folder, slides, runs, results, clinical tables."""

from ghist_core.project.store import Project

__all__ = ["Project"]
