"""Is a slide's stain inside the range the nucleus segmenter was trained and tested on?

Why: a learned segmenter fails quietly on stains it never saw (#16's external breast set: AJI 0.04
where the classical segmenter got 0.27), and nothing in its output says so. The stain bank
(``weights/stain_bank.json``) holds the stain of every training image and of every stain-shift
benchmark member, each as Macenko stain vectors and amounts. A slide whose own estimate lies
outside their envelope (a stain vector turned further from the training reference than any of
them, or an amount beyond their span) gets a note asking the user to check the nuclei before
trusting counts. Inside the envelope is not a promise either: the benchmark's worst stain still
cost the model AJI. It is an "untested here" flag, not a quality score.

The bank's members were estimated at their sources' own resolutions (CoNSeP and MoNuSeg at 0.25 µm/px,
the HER2ST sections at about 2.7, the SVS at 0.5), and a Macenko amount moves with resolution (the demo
slide read at half resolution: 1.78/2.80x -> 1.42/1.93x); slides are read at 0.5 µm/px (their own
where coarser), hence the slack below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ghist_core.errors import ModelInputError
from ghist_core.io.tiles import evenly_spaced
from ghist_core.imaging.stain import macenko_stains
from ghist_core.training.stain_bank import StainBank, StainMember, load_stain_bank, stain_angle_deg

if TYPE_CHECKING:
    from ghist_core.io.slide import Slide

#: how the pipeline samples a slide: this many patches (evenly spaced over the tissue blocks) of
#: ``PATCH_PX`` px at ``PATCH_MPP`` µm/px, pooled into one Macenko estimate
SAMPLE_PATCHES = 12
PATCH_PX = 256
PATCH_MPP = 0.5
#: bank roles whose stains the segmenter saw in training or was scored under
TESTED_ROLES = ("train", "benchmark")
STAINS = ("haematoxylin", "eosin")
#: slack for the estimate's own noise before a stain counts as outside: the demo slide (CMU-1, in the
#: bank at H amount 1.78x from its whole image) reads 1.95x from the pipeline's 12 patches (+10 %)
ANGLE_SLACK_DEG = 2.0
AMOUNT_SLACK = 1.15


class StainEstimateError(ModelInputError):
    """Too little stained tissue to estimate a stain (a blank or nearly blank image)."""


@dataclass(frozen=True)
class StainRange:
    """The envelope of the tested stains, per stain (H, E), relative to the bank's training reference."""

    max_angle_deg: tuple[float, float]
    amount_low: tuple[float, float]
    amount_high: tuple[float, float]
    #: the smallest angle between a tested stain's own two vectors: below it (less the slack) the image's
    #: colours barely separate into two dyes (a greyscale export, one dye)
    min_separation_deg: float = 0.0

    @classmethod
    def from_bank(cls, bank: StainBank | None = None) -> "StainRange":
        bank = bank or load_stain_bank()
        ref = bank.reference
        members = [m for role in TESTED_ROLES for m in bank.select(role)]
        angles = stain_angle_deg(np.stack([m.matrix for m in members]), ref.matrix[None])
        amounts = np.stack([m.max_c for m in members]) / ref.max_c[None]
        as_floats = lambda a, d: tuple(float(v) for v in np.round(a, d))  # noqa: E731
        separations = separation_deg(np.stack([m.matrix for m in members]))
        return cls(as_floats(angles.max(axis=0), 1), as_floats(amounts.min(axis=0), 2),
                   as_floats(amounts.max(axis=0), 2), round(float(separations.min()), 1))


def separation_deg(matrix: np.ndarray) -> np.ndarray:
    """The angle between the two stain vectors of each (…, 2, 3) stain matrix, in degrees."""
    m = np.asarray(matrix, dtype=np.float64)
    return stain_angle_deg(m[..., :1, :], m[..., 1:, :])[..., 0]


@dataclass(frozen=True)
class StainCheck:
    """A slide's stain against :class:`StainRange`: each stain vector's angle to the training reference
    (degrees) and its amount relative to the reference's (99th percentile concentration)."""

    angle_deg: tuple[float, float]
    amount: tuple[float, float]
    tested: StainRange
    separation_deg: float = 90.0  # between the slide's own two stain vectors

    @property
    def outside(self) -> list[str]:
        """Plain-language reasons the stain lies outside the tested range (empty: inside)."""
        out = []
        if self.separation_deg < self.tested.min_separation_deg - ANGLE_SLACK_DEG:
            out.append(f"its two stains are only {self.separation_deg:.0f}° apart in colour (tested from "
                       f"{self.tested.min_separation_deg:.0f}°), as in a grey or single-stain image")
        for i, stain in enumerate(STAINS):
            if self.angle_deg[i] > self.tested.max_angle_deg[i] + ANGLE_SLACK_DEG:
                out.append(f"its {stain} colour is {self.angle_deg[i]:.0f}° from the training stain "
                           f"(tested up to {self.tested.max_angle_deg[i]:.0f}°)")
            lo, hi = self.tested.amount_low[i], self.tested.amount_high[i]
            if not lo / AMOUNT_SLACK <= self.amount[i] <= hi * AMOUNT_SLACK:
                out.append(f"its {stain} is {self.amount[i]:.2g}× the training stain's strength "
                           f"(tested {lo:.2g}–{hi:.2g}×)")
        return out

    @property
    def within_tested_range(self) -> bool:
        return not self.outside

    def note(self) -> str | None:
        """What the app and the CLI say about it; None inside the tested range."""
        if self.within_tested_range:
            return None
        return ("This slide's stain lies outside the range the nucleus segmenter was trained and tested on: "
                + "; ".join(self.outside) + ". Its nuclei may be missed or mis-drawn without any error: "
                "look at the nuclei over the image in a few regions before relying on cell counts, types or "
                "expression.")

    def to_dict(self) -> dict:
        """``uns["ghist"]["stain_check"]`` (JSON types only)."""
        return {"angle_deg": dict(zip(STAINS, map(float, self.angle_deg))),
                "amount_vs_training": dict(zip(STAINS, map(float, self.amount))),
                "tested_max_angle_deg": dict(zip(STAINS, map(float, self.tested.max_angle_deg))),
                "tested_amount": {s: [float(self.tested.amount_low[i]), float(self.tested.amount_high[i])]
                                  for i, s in enumerate(STAINS)},
                "separation_deg": float(self.separation_deg),
                "tested_min_separation_deg": float(self.tested.min_separation_deg),
                "slack": {"angle_deg": ANGLE_SLACK_DEG, "amount_factor": AMOUNT_SLACK},
                "within_tested_range": self.within_tested_range, "note": self.note() or "",
                "method": f"Macenko stain vectors of {SAMPLE_PATCHES} tissue patches pooled (pipeline), against "
                          f"weights/stain_bank.json's {' and '.join(TESTED_ROLES)} members"}


def check_stain(images: np.ndarray | list[np.ndarray], bank: StainBank | None = None) -> StainCheck:
    """The stain of ``images`` (one RGB image or the patches of one slide, pooled) against the tested
    range. Raises :class:`StainEstimateError` when they hold too little stained tissue."""
    bank = bank or load_stain_bank()
    try:
        matrix, max_c = macenko_stains(list(images) if isinstance(images, (list, tuple)) else images)
    except ValueError as exc:
        raise StainEstimateError(f"The stain could not be estimated: {exc}") from None
    ref = bank.reference
    angle = stain_angle_deg(matrix, ref.matrix)
    amount = max_c / ref.max_c
    return StainCheck(tuple(float(v) for v in np.round(angle, 1)), tuple(float(v) for v in np.round(amount, 2)),
                      StainRange.from_bank(bank), round(float(separation_deg(matrix)), 1))


def stain_check_record(images: list[np.ndarray], bank: StainBank | None = None) -> dict:
    """``uns["ghist"]["stain_check"]``: :meth:`StainCheck.to_dict`, or why there is none."""
    try:
        return check_stain(images, bank).to_dict()
    except StainEstimateError as exc:
        return {"note": "", "unavailable": str(exc)}


def stain_patches(slide: "Slide", blocks: list, n: int = SAMPLE_PATCHES, size_px: int = PATCH_PX,
                  mpp: float = PATCH_MPP) -> list[np.ndarray]:
    """RGB patches at the centres of ``n`` of the tissue ``blocks`` (``pipeline.blocks.Block``), evenly
    spaced: what the stain check pools (a fixed number of small reads, whatever the slide's size). Read
    at ``mpp`` or the slide's own resolution where that is coarser (never enlarged)."""
    if not blocks:
        return []
    mpp = max(float(mpp), float(slide.mpp))
    w_um, h_um = slide.dimensions[0] * slide.mpp, slide.dimensions[1] * slide.mpp
    side_um = size_px * mpp
    out = []
    for b in (blocks[i] for i in evenly_spaced(len(blocks), n)):
        x0 = min(max(0.0, b.x_um + b.w_um / 2 - side_um / 2), max(0.0, w_um - side_um))
        y0 = min(max(0.0, b.y_um + b.h_um / 2 - side_um / 2), max(0.0, h_um - side_um))
        size = (max(1, min(size_px, int(w_um / mpp))), max(1, min(size_px, int(h_um / mpp))))
        out.append(slide.read_region_mpp((x0 / slide.mpp, y0 / slide.mpp), size, mpp))
    return out


def slide_stain_record(slide: "Slide", blocks: list) -> dict:
    """``uns["ghist"]["stain_check"]`` of a slide, never an error: a check that cannot run (unreadable
    patches, a degenerate estimate) must not fail a run whose cells are all made; it says why instead."""
    try:
        return stain_check_record(stain_patches(slide, blocks))
    except Exception as exc:  # noqa: BLE001 - a quality note, not the result: report and go on
        return {"note": "", "unavailable": f"the stain check could not run ({type(exc).__name__}: {exc})"}


def _turned(vector: np.ndarray, deg: float, rng: np.random.Generator) -> np.ndarray:
    """A unit OD vector ``deg`` degrees from ``vector`` towards a seeded random perpendicular direction,
    kept in the positive octant (tries directions until one stays positive)."""
    v = vector / np.linalg.norm(vector)
    for _ in range(1000):
        d = rng.normal(size=3)
        d -= (d @ v) * v
        d /= np.linalg.norm(d)
        out = np.cos(np.radians(deg)) * v + np.sin(np.radians(deg)) * d
        if (out > 0.02).all():
            return out / np.linalg.norm(out)
    raise ValueError(f"no positive OD vector {deg}° from {vector}")


def beyond_range_stains(bank: StainBank | None = None, seed: int = 0) -> list[StainMember]:
    """Stains outside the tested envelope (plus the check's slack): each stain vector turned 5° and 15° past
    the widest tested angle, and each stain's amount at 0.6x the lowest and 1.5x the highest tested (slack
    included). Why here: the benchmarks that ask what the flag catches (``bench/stain_check.py``) and what
    it means for the nuclei (``bench/segmentation.py``, block ``beyond_range``) score the same stains."""
    bank = bank or load_stain_bank()
    rng, ref, env = np.random.default_rng(seed), bank.reference, StainRange.from_bank(bank)
    out = []
    for i, stain in enumerate(STAINS):
        for extra in (5.0, 15.0):
            m = ref.matrix.copy()
            m[i] = _turned(m[i], env.max_angle_deg[i] + ANGLE_SLACK_DEG + extra, rng)
            out.append(StainMember(f"{stain}+{extra:g}deg", "synthetic", "", "beyond", m.tolist(), ref.max_c.tolist()))
        for name, factor in (("weak", 0.6 * env.amount_low[i] / AMOUNT_SLACK),
                             ("strong", 1.5 * env.amount_high[i] * AMOUNT_SLACK)):
            c = ref.max_c.copy()
            c[i] *= factor
            out.append(StainMember(f"{stain}-{name}", "synthetic", "", "beyond", ref.matrix.tolist(), c.tolist()))
    return out
