"""Typed errors with messages a clinician can act on.

Every message says what went wrong and what to do next, in plain words; the
app shows ``str(error)`` as it is, so no traceback ever reaches the user.
"""

from __future__ import annotations


class GhistError(Exception):
    """Base of every error GHIST Studio raises on purpose."""


# --- slides -----------------------------------------------------------------
class SlideError(GhistError):
    """A slide could not be used."""


class UnsupportedSlideError(SlideError):
    """The file is not a slide format GHIST Studio can read."""


class CorruptSlideError(SlideError):
    """The file looks like a slide but its contents are damaged or truncated."""


class EmptyFileError(SlideError):
    """The file has no content (zero bytes)."""


class ImageTooLargeError(SlideError):
    """The image declares more pixels than is safe to decode (decompression bomb)."""


class UnsupportedPixelFormatError(SlideError):
    """The pixels are not 8-bit RGB-convertible (e.g. 16-bit or float images)."""


class MissingMppError(SlideError):
    """The slide does not say how many micrometres one pixel spans, and none was given."""


class InvalidMppError(SlideError, ValueError):
    """A micrometres-per-pixel value that is zero, negative or not a number."""


class NoTissueError(SlideError):
    """No tissue was found on the slide."""


class InvalidFileNameError(GhistError, ValueError):
    """An uploaded file name that cannot be made safe."""


# --- models and weights -----------------------------------------------------
class WeightsError(GhistError):
    """Model weights could not be found, fetched or trusted."""


class WeightsNotFoundError(WeightsError):
    """No weights for this model id in any of the places we look."""


class WeightsIntegrityError(WeightsError):
    """A weights file does not match the sha256 in its model card."""


class WeightsFormatError(WeightsError):
    """The weights are of the wrong kind for this model (shapes, keys or format)."""


class ModelCardError(WeightsFormatError):
    """A model card that is not a JSON object of the expected shape, or names files outside its folder."""


class ModelInputError(GhistError, ValueError):
    """Input to a model is unusable (wrong dtype, shape, empty, out of slide)."""


class UnknownGeneError(GhistError, KeyError):
    """Genes were requested that the model does not predict."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# --- project store ----------------------------------------------------------
class StoreError(GhistError):
    """The project store could not be read or written."""


class DiskFullError(StoreError, OSError):
    """Not enough free disk space to write a result (checked before writing, or hit while writing)."""


class ProjectNotFoundError(StoreError):
    """The folder is not a GHIST Studio project."""


class RunStateError(StoreError):
    """A run asked to move to a status its current one does not allow (e.g. a finished run requeued)."""


class RunWeightsChangedError(RunStateError):
    """A run's checkpoints were made by other weights than the ones now loaded: resuming it would
    mix two models' cells in one result, so a new run is needed."""


class SlideBusyError(StoreError):
    """Another process is running this slide now (one run per slide at a time)."""


class PipelineLimitError(GhistError, ValueError):
    """A run refused before any work because it would exceed a stated limit (e.g. too many blocks)."""


class RunCancelledError(GhistError):
    """The user cancelled a running analysis."""


# --- cohort / clinical -------------------------------------------------------
class ClinicalTableError(GhistError, ValueError):
    """A clinical table that cannot be used as it is."""


class SurvivalAnalysisError(GhistError, ValueError):
    """A survival analysis that cannot be computed on these data (e.g. one group only)."""


# --- exports and region import ----------------------------------------------
class ExportError(GhistError):
    """A prediction could not be exported in the format asked for."""


class RegionFileError(ExportError, ValueError):
    """A region (annotation) file that is not usable GeoJSON, or too large to read safely."""
