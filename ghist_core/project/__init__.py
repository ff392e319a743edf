"""The project store: one SQLite database per project folder, slides, runs, results, clinical tables.

``Project`` (in :mod:`.store`) is the one object callers hold; each job has its own module:
:mod:`.db` (connections, migrations), :mod:`.slides` (patients, slides), :mod:`.runs` (the run
state machine), :mod:`.results`, :mod:`.clinical_tables`, :mod:`.uploads` (browser uploads),
:mod:`.overview` (what the pages count), :mod:`.files` (safe names, verified copies).
"""

from ghist_core.project.files import sanitize_filename
from ghist_core.project.runs import RunRecord, RunStatus, is_resumable
from ghist_core.project.slides import SlideRecord
from ghist_core.project.store import Project

__all__ = ["Project", "RunRecord", "RunStatus", "SlideRecord", "is_resumable", "sanitize_filename"]
