"""Slide → nuclei → GHIST prediction → ``.h5ad`` + grid summary, resumable.

The slide is cut into square *blocks* (about half a millimetre). Each block is
segmented (read with a margin so nuclei on its edge are whole; a nucleus
belongs to the block whose core holds its centroid), predicted, and written as
its own checkpoint file. A killed run restarts at the first missing block and,
since every block is computed the same way, ends with the same output as an
uninterrupted run. Memory depends on the block size, never on the slide size.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import anndata as ad
import numpy as np
import pandas as pd

from ghist_core import _keys as K
from ghist_core._types import ProgressCallback, ProgressEvent, ProgressEventCallback
from ghist_core.io.atomic import atomic_write_text, remove_temporaries
from ghist_core.io.safe_h5 import check_free_space, estimate_h5ad_bytes, write_h5_isolated
from ghist_core.errors import (GhistError, InvalidMppError, NoTissueError, RunCancelledError, RunWeightsChangedError,
                               StoreError)
from ghist_core.pipeline.eta import BlockEta, EtaPrior, prior_for
from ghist_core.pipeline.grid import DEFAULT_GRID_SIZES_UM, read_grid, write_grid
from ghist_core.pipeline.merge import median_nucleus_area, summarise_blocks, write_merged_h5ad
from ghist_core.pipeline.stain_check import slide_stain_record
from ghist_core.io.slide import Slide, open_slide
from ghist_core.paths import DEFAULT_SEGMENTER
from ghist_core.project import Project, RunStatus
from ghist_core.project.runs import PRE_CHECK_NUCLEUS_SCALE
from ghist_core.io.tiles import TileGrid
from ghist_core.imaging.tissue import boxes_tissue_fraction

STAGES: tuple[str, ...] = ("open", "tissue", "segment+predict", "write")
#: Longest side of the H&E overview stored in ``uns["spatial"]`` (scanpy's "hires" image).
HIRES_MAX_PX = 2000
#: Nucleus diameter (µm) scanpy draws when the cells have no area.
DEFAULT_NUCLEUS_DIAMETER_UM = 8.0
#: Share of the whole run each stage takes, for one overall progress bar.
_STAGE_WEIGHT = {"open": 0.02, "tissue": 0.03, "segment+predict": 0.9, "write": 0.05}


@dataclass
class PipelineConfig:
    """Settings recorded with every run so its output can be reproduced."""

    block_um: float = 512.0          # side of one checkpointed block
    margin_um: float = 24.0          # read around a block so edge nuclei are whole
    tissue_thumbnail_px: int = 1024  # longest side of the thumbnail the tissue mask uses
    min_tissue_fraction: float = 0.02  # a block with less tissue than this is skipped
    grid_sizes_um: tuple[float, ...] = DEFAULT_GRID_SIZES_UM
    batch_size: int = 16
    #: also run the model's other ensemble members for obs["expression_uncertainty"] (their spread
    #: per cell); X is unchanged. A run recorded before this setting resumes without it.
    uncertainty: bool = False
    #: the learned segmenter's ``nucleus_scale`` per block ("auto": the scale check, which segments
    #: blocks of large nuclei at 2/3; 1.0: as the slide's µm/px says). Every run records it (the app's
    #: queued runs too: ``worker.submit_run``); a run recorded before it resumes at 1.0, as its first
    #: blocks were made.
    nucleus_scale: float | str = "auto"

    @classmethod
    def from_params(cls, params: dict | None) -> "PipelineConfig":
        """The settings a run recorded (``params["pipeline"]``); one it does not hold predates it, so
        the run resumes as it began: the default, or ``nucleus_scale`` 1.0."""
        known = {k: v for k, v in (params or {}).items() if k in cls.__dataclass_fields__}
        if known.get("nucleus_scale") is None:  # as runs.run_nucleus_scale reads it
            known["nucleus_scale"] = PRE_CHECK_NUCLEUS_SCALE
        if "grid_sizes_um" in known:
            known["grid_sizes_um"] = tuple(float(v) for v in known["grid_sizes_um"])
        return cls(**known)


@dataclass
class PredictionResult:
    run_id: int
    slide_id: int
    h5ad_path: Path
    grid_path: Path
    n_cells: int
    timings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Block:
    index: int
    x_um: float
    y_um: float
    w_um: float
    h_um: float
    tissue_um2: float = 0.0  # tissue in the block's core (from the slide's tissue mask), for the time left


#: Makes the run's time-left estimator once the blocks are planned: ``(blocks, done flags) -> BlockEta``.
EtaFactory = Callable[[list[Block], list[bool]], BlockEta]


class _Reporter:
    """Turns stage fractions into overall progress + time left, and records them in the store.

    The time left comes from :class:`~ghist_core.pipeline.eta.BlockEta` (measured seconds per
    tissue area; made by :meth:`make_eta` once the blocks are planned), never from elapsed time
    over overall progress, which counted up while a block was running. It goes to the store as
    ``runs/<id>/eta.json`` (``project.overview.time_left`` reads it for the pages).
    """

    def __init__(self, project: Project | None, run_id: int | None, callback: ProgressEventCallback | None,
                 prior: EtaPrior | None = None, clock: Callable[[], float] = time.monotonic):
        self.project, self.run_id, self.callback = project, run_id, callback
        self.prior, self.clock = prior, clock
        self.eta: BlockEta | None = None
        self._last_store = -1e9
        self._eta_recorded = False
        self._run_dir = project.run_dir(run_id) if project is not None and run_id is not None else None
        if self._run_dir is not None:
            from ghist_core.project.overview import clear_time_left

            clear_time_left(self._run_dir)  # a previous attempt's estimate

    def make_eta(self, blocks: list[Block], done: list[bool]) -> BlockEta:
        """The estimator for this run's blocks (``done``: already checkpointed); the first block starts now."""
        self.eta = BlockEta([b.tissue_um2 for b in blocks], done=done, prior=self.prior, clock=self.clock)
        self.eta.begin()
        return self.eta

    def stage(self, name: str) -> ProgressCallback:
        """One stage's ``progress(fraction, message)``."""
        return lambda fraction, message="": self(name, fraction, message)

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        done = sum(_STAGE_WEIGHT[s] for s in STAGES[: STAGES.index(stage)])
        overall = min(1.0, done + _STAGE_WEIGHT[stage] * max(0.0, min(1.0, fraction)))
        if stage == "write" and self.eta is not None and not self.eta.in_tail:
            self.eta.begin_tail()
        est = self.eta.estimate() if self.eta is not None else None
        if stage == "write" and fraction >= 1:
            est = None
        event = ProgressEvent(stage, fraction, overall, message, *((est.mid_s, est.low_s, est.high_s) if est else ()))
        now = self.clock()
        first_eta = est is not None and not self._eta_recorded  # the pages show it as soon as it exists
        if self.project is not None and self.run_id is not None and (now - self._last_store > 0.5 or fraction >= 1
                                                                     or first_eta):
            self._last_store = now
            self.project.update_run(self.run_id, stage=stage, progress=overall, message=message)
            if est is not None and self._run_dir is not None:
                from ghist_core.project.overview import record_time_left

                record_time_left(self._run_dir, est)
                self._eta_recorded = True
        if self.callback is not None:
            self.callback(event)


#: Most blocks a slide may be cut into (tissue or not), checked before any work: 50,000 blocks of
#: 512 µm cover 131 cm², seven times a 75 × 25 mm glass slide. More means the µm/px is wrong
#: (``--mpp 250`` on the demo slide planned 592,569 blocks) or the block size is too small.
MAX_PLANNED_BLOCKS = 50_000


def check_block_plan(width_px: int, height_px: int, mpp: float, config: PipelineConfig) -> int:
    """The number of blocks the slide's grid has; :class:`InvalidMppError` (µm/px outside the
    plausible range) or :class:`PipelineLimitError` (more than :data:`MAX_PLANNED_BLOCKS`) first."""
    import math

    from ghist_core.errors import PipelineLimitError
    from ghist_core.io.slide import check_mpp

    mpp = check_mpp(mpp, "slide's µm per pixel")
    block = float(config.block_um)
    if not math.isfinite(block) or block < 32.0:
        raise PipelineLimitError(f"The block size {config.block_um!r} µm is too small; use at least 32 µm (default 512).")
    n = math.ceil(width_px * mpp / block) * math.ceil(height_px * mpp / block)
    if n > MAX_PLANNED_BLOCKS:
        raise PipelineLimitError(
            f"At {mpp:g} µm per pixel this {width_px:,} × {height_px:,} px slide would be "
            f"{width_px * mpp / 1000:,.0f} × {height_px * mpp / 1000:,.0f} mm and need {n:,} blocks of "
            f"{block:g} µm (limit {MAX_PLANNED_BLOCKS:,}). Check the µm per pixel: a 40x scan is about "
            "0.25, 20x about 0.5.")
    return n


def plan_blocks(slide: Slide, config: PipelineConfig) -> list[Block]:
    """Blocks covering tissue, in a fixed row-major order (the order checkpoints follow)."""
    check_block_plan(slide.dimensions[0], slide.dimensions[1], slide.mpp, config)
    w_um, h_um = slide.dimensions[0] * slide.mpp, slide.dimensions[1] * slide.mpp
    mask, downsample = slide.tissue_mask(config.tissue_thumbnail_px)
    if not mask.any():
        raise NoTissueError(
            "No tissue was found on this slide (it looks blank or overexposed). "
            "Check that the right file was uploaded."
        )
    # the one tile grid (io.tiles) on a 1 µm lattice: cores are the blocks, the halo their margin
    grid = TileGrid(w_um, h_um, float(config.block_um), float(config.margin_um), mpp=1.0)
    keep = grid.in_tissue(mask, downsample, slide.mpp, min_fraction=config.min_tissue_fraction)
    if not keep.any():
        raise NoTissueError("Too little tissue was found on this slide to analyse.")
    # each block's tissue (for the time left), from the same mask, once per slide
    frac = boxes_tissue_fraction(mask, grid.cores()[keep] / slide.mpp, downsample)
    return [Block(t.index, float(t.x0), float(t.y0), float(t.w), float(t.h), float(f * t.w * t.h))
            for t, f in zip(grid.iter(keep), frac)]


def _read_block(slide: Slide, block: Block, mpp: float, margin_um: float) -> tuple[np.ndarray, float, float]:
    """RGB of a block plus margin at ``mpp``; returns (rgb, origin_x_um, origin_y_um)."""
    w_um, h_um = slide.dimensions[0] * slide.mpp, slide.dimensions[1] * slide.mpp
    x0 = max(0.0, block.x_um - margin_um)
    y0 = max(0.0, block.y_um - margin_um)
    x1 = min(w_um, block.x_um + block.w_um + margin_um)
    y1 = min(h_um, block.y_um + block.h_um + margin_um)
    size = (max(1, int(round((x1 - x0) / mpp))), max(1, int(round((y1 - y0) / mpp))))
    loc = (int(round(x0 / slide.mpp)), int(round(y0 / slide.mpp)))
    rgb = slide.read_region_mpp(loc, size, mpp)
    return rgb, loc[0] * slide.mpp, loc[1] * slide.mpp


def segment_block(segmenter, block: Block, rgb: np.ndarray, origin: tuple[float, float], mpp: float,
                  nucleus_scale: float | str = 1.0) -> pd.DataFrame:
    """Nuclei whose centroid lies in the block's core, with centroids in slide µm.

    The block (with its margin) goes through the segmenter's own tiled loop, so
    seams inside a block are merged the same way as on a whole slide. ``nucleus_scale`` goes to
    a segmenter that takes it (the learned one).
    """
    from ghist_core.segmentation import ArraySlide

    kw = {"nucleus_scale": nucleus_scale} if hasattr(segmenter, "nucleus_scale") else {}
    if getattr(segmenter, "one_tile_per_block", False):
        # the block's margin is the network's context: one forward pass over the whole block,
        # not 2 x 2 overlapping tiles (3.4x the pixels for a 512 µm block)
        kw |= {"tile_px": -(-max(rgb.shape[:2]) // segmenter.stride) * segmenter.stride, "overlap_px": 0}
    cells = segmenter.segment_slide(ArraySlide(rgb, mpp), **kw).copy()
    cells["x_um"] = origin[0] + cells["x_um"].to_numpy()
    cells["y_um"] = origin[1] + cells["y_um"].to_numpy()
    core = (
        (cells["x_um"] >= block.x_um)
        & (cells["x_um"] < block.x_um + block.w_um)
        & (cells["y_um"] >= block.y_um)
        & (cells["y_um"] < block.y_um + block.h_um)
    )
    cells = cells.loc[core].reset_index(drop=True)
    cells["cell_id"] = np.int64(block.index) * 1_000_000 + np.arange(len(cells), dtype=np.int64)
    return cells


#: the weights that made a run's checkpoints, written before its first block
MADE_BY_FILE = "made_by.json"


def check_made_by(run_dir: Path, stamp: dict[str, str], recorded_weights_sha256: str = "") -> None:
    """Raise :class:`RunWeightsChangedError` when ``run_dir``'s checkpoints were made by other weights.

    Blocks are checkpointed one by one, so a run resumed after the weights changed (an update,
    another default segmenter) would merge cells from two models into one result. The stamp
    (:func:`stamp_made_by`) says which weights made them; a run from before stamps existed is
    judged by the model weights the store recorded for it (``recorded_weights_sha256``, when
    known). A run with no checkpoint yet has nothing to mix and always passes. Nothing is written.
    """
    if not _has_checkpoints(run_dir):
        return
    made_by = read_made_by(run_dir, recorded_weights_sha256)
    changed = made_by_changes(made_by, stamp)
    if changed:
        was = ", ".join(f"{k} {str(made_by[k])[:12]}" for k in changed)
        now = ", ".join(f"{k} {str(stamp[k])[:12]}" for k in changed)
        raise RunWeightsChangedError(
            f"This run's finished blocks were made with other weights ({was}; now {now}). "
            "Resuming would mix two models in one result: start a new run instead.")


def read_made_by(run_dir: Path, recorded_weights_sha256: str = "") -> dict[str, str]:
    """The stamp of ``run_dir`` (:func:`stamp_made_by`); for a run from before stamps, the model
    weights the store recorded (when known); else empty."""
    path = run_dir / MADE_BY_FILE
    try:
        made_by = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        made_by = {}
    if not isinstance(made_by, dict):
        made_by = {}
    if not made_by and recorded_weights_sha256:
        made_by = {"weights_sha256": recorded_weights_sha256}
    return made_by


def made_by_changes(made_by: dict[str, str], stamp: dict[str, str]) -> list[str]:
    """The fields of ``stamp`` that differ from what ``made_by`` recorded (unrecorded fields are not judged)."""
    return [k for k in made_by if k in stamp and made_by[k] != stamp[k]]


def stamp_now(model_id: str | None, segmenter_id: str | None) -> dict[str, str]:
    """The stamp a new run with these settings would get now, read from the sealed cards (the model's
    weights are hashed, no network is built): the model's sha256, the segmenter's name and sha256.
    Raises the typed weights errors of :func:`~ghist_core.weights.resolve.resolve_weights`."""
    from ghist_core.model.predict import MODEL_NAME
    from ghist_core.segmentation import ClassicalSegmenter
    from ghist_core.segmentation.model import segmenter_weights_path
    from ghist_core.weights.card import read_card, run_segmenter
    from ghist_core.weights.resolve import resolve_weights

    model = resolve_weights(model_id, name=MODEL_NAME, kind="ghist")
    name = run_segmenter(segmenter_id, model.card)
    if name == "classical":
        return {"weights_sha256": model.sha256, "segmenter": ClassicalSegmenter.name, "segmenter_sha256": ""}
    card = read_card(segmenter_weights_path(name).with_suffix(".json"))
    return {"weights_sha256": model.sha256, "segmenter": str(card.get("name", "learned")),
            "segmenter_sha256": str(card.get("sha256", ""))}


def stamp_made_by(run_dir: Path, stamp: dict[str, str]) -> None:
    """Record the weights about to make ``run_dir``'s blocks (kept once a block exists)."""
    path = run_dir / MADE_BY_FILE
    if path.exists() and _has_checkpoints(run_dir):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(stamp, indent=1, sort_keys=True))


def _block_path(run_dir: Path, block: Block) -> Path:
    return run_dir / "blocks" / f"block_{block.index:06d}.h5ad"


def _has_checkpoints(run_dir: Path) -> bool:
    """Whether any block of the run is checkpointed (the files :func:`_block_path` names)."""
    return any((run_dir / "blocks").glob("block_*.h5ad"))


def _prefetch(slide: Slide, blocks: list[Block], mpp: float, margin_um: float) -> Iterator[tuple[Block, np.ndarray, tuple[float, float]]]:
    """Decode the next block in a background thread while the current one computes."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ghist-read") as pool:
        futures = [pool.submit(_read_block, slide, blocks[0], mpp, margin_um)] if blocks else []
        for i, block in enumerate(blocks):
            if i + 1 < len(blocks):
                futures.append(pool.submit(_read_block, slide, blocks[i + 1], mpp, margin_um))
            rgb, ox, oy = futures[i].result()
            futures[i] = None  # release the decoded block
            yield block, rgb, (ox, oy)


def run_blocks(
    slide: Slide,
    blocks: list[Block],
    segmenter,
    model,
    run_dir: Path,
    config: PipelineConfig,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    *,
    slide_sha256: str = "",
    make_eta: EtaFactory | None = None,
) -> tuple[list[Path], dict]:
    """Segment and predict every one of ``blocks`` (:func:`plan_blocks`) not yet checkpointed in ``run_dir``.

    Per block only the block's own pixels are read: the slide's sha256 comes from the
    caller (the store hashed the file once when it was added) instead of being recomputed
    by every ``predict``, and the tissue mask is computed once, in :func:`plan_blocks`, by the
    caller (which also hands the blocks to the stain check).
    ``progress(fraction, message)`` follows the blocks; ``make_eta(blocks, done)`` (optional) gives
    the time-left estimator, told about each finished block before ``progress`` is called.
    """
    report = progress or (lambda fraction, message="": None)
    timings = {"read_s": 0.0, "segment_s": 0.0, "predict_s": 0.0}
    paths = [_block_path(run_dir, b) for b in blocks]
    remove_temporaries(run_dir / "blocks")  # a killed earlier attempt's; this process now owns the run
    done = [p.exists() for p in paths]
    todo = [b for b, d in zip(blocks, done) if not d]
    position = {b.index: i for i, b in enumerate(blocks)}
    n_done = len(blocks) - len(todo)
    eta = make_eta(blocks, done) if make_eta is not None else None
    report(n_done / max(1, len(blocks)), f"{n_done} of {len(blocks)} blocks already done")
    seg_mpp = float(getattr(segmenter, "mpp", slide.mpp))
    t_read = time.perf_counter()
    for block, rgb, origin in _prefetch(slide, todo, seg_mpp, config.margin_um):
        timings["read_s"] += time.perf_counter() - t_read
        if cancel is not None and cancel.is_set():
            raise RunCancelledError("The run was cancelled; finished blocks are kept and it can be resumed.")
        t = time.perf_counter()
        cells = segment_block(segmenter, block, rgb, origin, seg_mpp, config.nucleus_scale)
        timings["segment_s"] += time.perf_counter() - t
        t = time.perf_counter()
        options = {"uncertainty": True} if config.uncertainty else {}  # asked only when on: any model predicts without it
        adata = model.predict(slide, cells, batch_size=config.batch_size, slide_sha256=slide_sha256, **options)
        timings["predict_s"] += time.perf_counter() - t
        adata.uns.pop(K.UNS_GHIST, None)  # the card is added once, to the merged result
        if adata.n_obs and K.OBS_CELL_ID in adata.obs:  # slide-wide unique names: the merge copies blocks as they are
            adata.obs_names = K.obs_names_for(adata.obs[K.OBS_CELL_ID].to_numpy())
        write_h5_isolated(_block_path(run_dir, block), lambda p: adata.write_h5ad(p),
                          estimated_bytes=estimate_h5ad_bytes(adata), what=f"block {block.index}'s checkpoint")
        n_done += 1
        if eta is not None:
            eta.block_done(position[block.index])
        report(n_done / len(blocks), f"block {n_done} of {len(blocks)}: {adata.n_obs} cells")
        t_read = time.perf_counter()
    return paths, timings


def slide_image_uns(slide: Slide, library_id: str, median_area_um2: float | None,
                    max_px: int = HIRES_MAX_PX) -> dict:
    """``uns["spatial"]`` for scanpy/squidpy: the slide's H&E overview and its scale factors.

    ``obsm["spatial"]`` is in µm, so ``tissue_hires_scalef`` is overview pixels per µm and
    ``spot_diameter_fullres`` the median nucleus diameter in µm: then
    ``sc.pl.spatial(adata, img_key="hires", library_id=library_id)`` overlays the cells on the H&E.
    """
    thumb = slide.thumbnail(max_px)
    px_per_um = thumb.shape[1] / (slide.dimensions[0] * slide.mpp)
    diameter = (float(2.0 * np.sqrt(median_area_um2 / np.pi)) if median_area_um2
                else DEFAULT_NUCLEUS_DIAMETER_UM)
    holder = ad.AnnData()
    K.set_spatial_image(holder, library_id, thumb, px_per_um, diameter)
    return dict(holder.uns[K.UNS_SPATIAL])


def add_slide_image(adata: ad.AnnData, slide: Slide, library_id: str, max_px: int = HIRES_MAX_PX) -> None:
    """Store the slide's H&E overview in ``uns["spatial"][library_id]`` (in place; see :func:`slide_image_uns`)."""
    area = adata.obs["area_um2"].to_numpy(np.float64) if "area_um2" in adata.obs else np.zeros(0)
    adata.uns[K.UNS_SPATIAL] = slide_image_uns(slide, library_id, median_nucleus_area(area), max_px)


def library_id_for(slide_id: int) -> str:
    """The ``uns["spatial"]`` key of a project slide (unique within a project, so cohorts can be concatenated)."""
    return f"slide_{int(slide_id)}"


def results_dir(project: Project, slide_id: int) -> Path:
    return project.folder / "results" / f"slide_{slide_id}"


def check_segmenter_fits(model, segmenter) -> None:
    """Fail before any work when the model reads per-cell columns the segmenter does not write."""
    provided = {f"prob_{t}" for t in getattr(segmenter, "type_names", ())}
    missing = [c for c in getattr(model, "cell_inputs", ()) if c not in provided]
    if missing:
        from ghist_core.errors import ModelInputError

        raise ModelInputError(
            f"This GHIST model reads each nucleus' type probabilities from the learned segmenter ({', '.join(missing)}); "
            "the chosen segmenter does not provide them. Choose auto or a learned segmenter, or a model without cell inputs.")


def predict_slide(
    slide_id: int,
    project: Project,
    *,
    model_id: str | None = None,
    segmenter_id: str | None = None,
    device: str = "auto",
    progress: ProgressEventCallback | None = None,
    cancel: threading.Event | None = None,
    run_id: int | None = None,
    config: PipelineConfig | None = None,
    segmenter=None,
    model=None,
) -> PredictionResult:
    """Run the whole pipeline on a slide already in the project; resume ``run_id`` if given.

    Returns
    -------
    PredictionResult with the ``.h5ad`` (cells × genes) and grid summary paths.
    The run, its stage/progress, timings and result files are recorded in the store.
    """
    from ghist_core.device import pick_device

    if config is None and run_id is not None:  # a resumed run keeps the settings it started with
        config = PipelineConfig.from_params(project.get_run(run_id).params.get("pipeline"))
    config = config or PipelineConfig()
    record = project.get_slide(slide_id)
    dev = pick_device(device)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if model is None or segmenter is None:
        from ghist_core.model import load_ghist
        from ghist_core.segmentation import load_segmenter

        model = model or load_ghist(model_id, device=str(dev))
        if segmenter is None:
            from ghist_core.weights.card import run_segmenter

            # "auto" (None): the segmenter the model's nucleus-type inputs were trained on, else the default
            name = run_segmenter(segmenter_id, getattr(model, "card", None))
            if name == "classical":  # the fast QuPath-style baseline, no weights needed
                segmenter = load_segmenter(kind="classical")
            else:
                segmenter = load_segmenter(name, device=str(dev))
    check_segmenter_fits(model, segmenter)
    check_block_plan(record.width, record.height, record.mpp, config)  # before the run is recorded
    try:
        with open_slide(project.slide_path(slide_id), mpp=record.mpp) as s:  # an implausible enlargement too
            s.check_upsampling(min([float(m) for m in (getattr(segmenter, "mpp", None), getattr(model, "mpp", None))
                                    if m] or [s.mpp]))
    except InvalidMppError as exc:
        raise type(exc)(f"{_user_named(exc, project, record)} In the app: Home, Edit or delete, "
                        "sets a slide's µm per pixel.") from None
    except GhistError as exc:
        raise _user_named(exc, project, record) from None
    weights_sha = getattr(model, "weights_sha256", "") or ""
    segmenter_name = str(getattr(segmenter, "name", "") or "classical")
    params = {"pipeline": _jsonable(asdict(config)), "model_id": model_id,
              "segmenter_id": None if segmenter_id == "auto" else segmenter_id,
              "segmenter": segmenter_name, "default_segmenter": DEFAULT_SEGMENTER}
    stamp = {"weights_sha256": weights_sha, "segmenter": segmenter_name,
             "segmenter_sha256": getattr(segmenter, "weights_sha256", "") or ""}
    if run_id is None:
        run_id = project.start_run(slide_id, model_id=model_id or "bundled", weights_sha256=weights_sha, device=str(dev), params=params)
    else:  # checked before the run changes state: a refused resume leaves it as it was
        check_made_by(project.run_dir(run_id), stamp, project.get_run(run_id).weights_sha256 or "")
        project.resume_run(run_id)
        params = {**project.get_run(run_id).params, **params}
    report = _Reporter(project, run_id, progress, prior=prior_for(str(dev), segmenter))
    try:
        report("open", 0.0, "opening slide")
        t = time.perf_counter()
        slide = open_slide(project.slide_path(slide_id), mpp=record.mpp)
        timings["open_s"] = time.perf_counter() - t
        report("open", 1.0, f"{slide.dimensions[0]}×{slide.dimensions[1]} px at {slide.mpp:.3f} µm/px")
        with slide:
            report("tissue", 0.0, "finding tissue")
            run_dir = project.run_dir(run_id)
            stamp_made_by(run_dir, stamp)
            blocks = plan_blocks(slide, config)
            paths, block_timings = run_blocks(slide, blocks, segmenter, model, run_dir, config,
                                              report.stage("segment+predict"), cancel,
                                              slide_sha256=record.sha256, make_eta=report.make_eta)
            timings.update(block_timings)
            report("write", 0.0, "merging blocks")
            t = time.perf_counter()
            summary = summarise_blocks(paths, config.grid_sizes_um)  # one block in memory at a time
            card = dict(getattr(model, "card", {}) or {})
            ghist_uns = _jsonable(
                {
                    "model_card": card,
                    "expression_units": card.get("expression_units", ""),
                    "weights_sha256": weights_sha,
                    "segmenter_sha256": stamp["segmenter_sha256"],
                    "segmenter": segmenter_name,
                    "slide_sha256": record.sha256,
                    "slide_id": int(slide_id),
                    "run_id": int(run_id),
                    "mpp": float(slide.mpp),
                    "params": {**params, **_model_radii(model)},
                    "device": str(dev),
                }
            )
            out_dir = results_dir(project, slide_id)
            h5ad_path = out_dir / f"run_{run_id}.h5ad"
            grid_path = out_dir / f"run_{run_id}.grid.h5"
            timings["total_s"] = time.perf_counter() - t_start
            ghist_uns[K.GHIST_TIMINGS] = {k: float(v) for k, v in timings.items()}
            if hasattr(segmenter, "nucleus_scale"):  # the learned segmenter
                ghist_uns[K.GHIST_NUCLEUS_SCALE] = nucleus_scale_record(config.nucleus_scale, summary)
                ghist_uns[K.GHIST_STAIN_CHECK] = slide_stain_record(slide, blocks)
            if config.uncertainty:  # the blocks' own uns["ghist"] is dropped: say here what the column holds
                ghist_uns[K.GHIST_UNCERTAINTY] = _uncertainty_note(model, summary)
            uns = {K.UNS_SPATIAL: slide_image_uns(slide, library_id_for(slide_id), summary.median_area_um2),
                   K.UNS_GHIST: ghist_uns}
            grids = summary.grids
            h5ad_bytes = summary.bytes_on_disk + (1 << 20) * 16  # the blocks' arrays, copied, plus uns
            grid_bytes = sum(estimate_h5ad_bytes(g) for g in grids.values())
            check_free_space(out_dir, h5ad_bytes + grid_bytes, what="the prediction")  # both, before either
            write_h5_isolated(h5ad_path, lambda p: write_merged_h5ad(summary, p, uns),
                              estimated_bytes=h5ad_bytes, what="the prediction (.h5ad)")
            write_h5_isolated(grid_path, lambda p: write_grid(p, grids), estimated_bytes=grid_bytes,
                              what="the grid summary")
            timings["write_s"] = time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - t_start
            project.add_result_file(run_id, "h5ad", h5ad_path)
            project.add_result_file(run_id, "grid", grid_path)
            project.finish_run(run_id, n_cells=summary.n_cells, timings=timings)
            report("write", 1.0, f"done: {summary.n_cells} cells")
            return PredictionResult(run_id, slide_id, h5ad_path, grid_path, summary.n_cells, timings)
    except RunCancelledError:
        project.cancel_run(run_id)
        raise
    except GhistError as exc:
        _discard_unrecorded(project, run_id, slide_id)
        named = _user_named(exc, project, record)
        project.fail_run(run_id, str(named))
        if named is exc:
            raise
        raise named from exc
    except OSError as exc:
        _discard_unrecorded(project, run_id, slide_id)
        message = f"Could not write results ({exc.strerror or exc}). Check free disk space and permissions."
        project.fail_run(run_id, message)
        if exc.errno in (28, 122, 27):  # ENOSPC, EDQUOT, EFBIG
            from ghist_core.errors import DiskFullError

            raise DiskFullError(message) from exc
        raise StoreError(message) from exc
    except Exception as exc:  # unexpected: keep the store consistent, then re-raise
        _discard_unrecorded(project, run_id, slide_id)
        project.fail_run(run_id, f"Unexpected error: {type(exc).__name__}: {exc}")
        raise


def _model_radii(model) -> dict[str, float]:
    """The model's neighbourhood radii (µm) for ``uns["ghist"]["params"]``: the blocks' own records
    are dropped in the merge, and the neighbourhood plots name the radius their numbers are for."""
    cfg = getattr(getattr(model, "net", None), "cfg", None)
    return {k: float(getattr(cfg, k)) for k in ("nbhd_radius_um", "context_radius_um") if hasattr(cfg, k)}


def _user_named(exc: GhistError, project: Project, record) -> GhistError:
    """``exc`` naming the slide as the user uploaded it, not as the project stores it
    (``<hash>_<name>``): run messages are read by the person who chose the file."""
    from ghist_core.project.slides import renamed_error

    return renamed_error(exc, project.slide_path(record.slide_id), record.name)


def nucleus_scale_record(setting: float | str, summary) -> dict:
    """``uns["ghist"]["nucleus_scale"]``: the setting, the scale check's rule and the share of cells
    it segmented at another factor (per cell: ``obs["nucleus_scale"]``)."""
    from ghist_core.segmentation.model import SCALE_RULE

    record = {"setting": setting, "rule": dict(SCALE_RULE)}
    if summary.n_rescaled is not None:  # None: some blocks predate the column, so the share is unknown
        record["cells_rescaled_fraction"] = round(summary.n_rescaled / summary.n_cells, 4) if summary.n_cells else 0.0
    return record


def _uncertainty_note(model, summary) -> str:
    """``uns["ghist"]["uncertainty"]`` of a merged run that asked for it (see ``GhistModel.uncertainty_note``)."""
    note = model.uncertainty_note()
    has = summary.obs_keys is None or K.OBS_EXPRESSION_UNCERTAINTY in summary.obs_keys
    if not has and not note.startswith("unavailable"):  # a run resumed with the setting changed: the merge dropped it
        return "unavailable: some of this run's blocks were predicted without it"
    return note


def _discard_unrecorded(project: Project, run_id: int, slide_id: int) -> None:
    """Remove this run's result files that have no row in the store (a failed run leaves no orphan)."""
    try:
        recorded = {p.resolve() for p in project.result_files(run_id).values()}
    except Exception:  # noqa: BLE001 - the store may itself be failing (disk full)
        recorded = set()
    out_dir = results_dir(project, slide_id)
    for p in (out_dir / f"run_{run_id}.h5ad", out_dir / f"run_{run_id}.grid.h5"):
        if p.exists() and p.resolve() not in recorded:
            try:
                p.unlink()
            except OSError:
                pass


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def latest_finished_run(project: Project, slide_id: int):
    project.get_slide(slide_id)  # a slide id not in the project says so (StoreError)
    run = project.latest_run(slide_id, status=RunStatus.FINISHED)
    if run is None:
        raise StoreError(f"Slide {int(slide_id)} has no finished prediction yet: run it first (Upload & predict "
                         "in the app, `ghist predict` on the command line).")
    return run


def load_prediction(project: Project, slide_id: int) -> ad.AnnData:
    """The cells × genes AnnData of the slide's latest finished run, in the current layout.

    A result written before the obsm layout (``prob_<type>`` / ``nbhd_<type>`` in ``obs``,
    no ``uns["spatial"]``) is upgraded on reading: the columns move into their obsm
    matrices, and the H&E overview is added when the slide file is still in the project.
    """
    run = latest_finished_run(project, slide_id)
    adata = K.upgrade_layout(ad.read_h5ad(project.result_files(run.run_id)["h5ad"]))
    if K.UNS_SPATIAL not in adata.uns and project.slide_path(slide_id).is_file():
        record = project.get_slide(slide_id)
        with open_slide(project.slide_path(slide_id), mpp=record.mpp) as slide:
            add_slide_image(adata, slide, library_id_for(slide_id))
    return adata


def load_grid(project: Project, slide_id: int) -> dict[float, ad.AnnData]:
    run = latest_finished_run(project, slide_id)
    return read_grid(project.result_files(run.run_id)["grid"])


def slide_overview_image(project: Project, slide_id: int, max_px: int = 2048) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A thumbnail and its bounds in µm ``(left, top, right, bottom)`` for a map's bitmap layer."""
    record = project.get_slide(slide_id)
    with open_slide(project.slide_path(slide_id), mpp=record.mpp) as slide:
        thumb = slide.thumbnail(max_px)
        w_um, h_um = slide.dimensions[0] * slide.mpp, slide.dimensions[1] * slide.mpp
    return thumb, (0.0, 0.0, float(w_um), float(h_um))
