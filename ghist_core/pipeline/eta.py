"""Time left for a run, from measured seconds per tissue area of its finished blocks.

Blocks differ in how much tissue they hold (an edge block may be 3 % tissue, a central one
100 %), and the time a block takes follows its tissue, not its position in the run. So the
estimator is fed, per finished block, its tissue area (µm², from the tissue mask computed once
per slide in :func:`~ghist_core.pipeline.blocks.plan_blocks`) and the seconds it took, fits

    seconds = c + r · tissue_µm²        (c ≥ 0: per-block overhead, r ≥ 0: seconds per µm²)

and predicts the remaining blocks' seconds from their tissue. Rules (each one tested in
``tests/pipeline/test_eta.py``):

* **Fit.** With at least 3 measured blocks whose tissue areas differ (coefficient of variation
  ≥ 0.25) ``c`` and ``r`` are a least-squares line clipped to be non-negative; otherwise
  ``c = 0`` and ``r`` = total seconds / total tissue of the measured blocks (a ratio).
* **Range.** 10th–90th percentile of the remaining time over ``n_boot`` bootstrap resamples of
  the measured blocks (a seeded generator: the same inputs give the same range).
  Until the estimate is *settled* — at least :data:`MIN_BLOCKS` (5) blocks measured **and**
  they hold at least :data:`MIN_TISSUE_SHARE` (10 %) of the tissue this process had to do —
  the range is widened to at least ``mid / 1.5 … mid × 1.5``.
* **Prior.** Before any block is finished the rate is the prior for the device and segmenter
  (:data:`PRIORS`, seconds per tissue mm² from the bench) with the range ``mid / 2 … mid × 2``;
  without a prior there is no estimate (the pages say "estimating…").
* **Never counts up while waiting.** Time already spent on the running block is subtracted
  from that block's expected time, floored at zero; so between two finished blocks every
  bound only goes down (a finished block may move it up: that is new information).
* **Resumed runs.** Blocks already checkpointed count as done (their tissue is not left to
  do); they carry no timing, so only blocks finished by this process are measured.
* **Tail.** Merging and writing the result take :data:`TAIL_SHARE` of the blocks' total time
  (bench: write_s / the blocks' time ≈ 0.06); during the write stage that tail counts down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["BlockEta", "EtaPrior", "PRIORS", "prior_for", "MIN_BLOCKS", "MIN_TISSUE_SHARE", "TAIL_SHARE"]

#: Measured blocks needed before the range is the bootstrap range alone (see the module notes).
MIN_BLOCKS = 5
#: Share of this process's tissue the measured blocks must hold before the estimate is settled.
MIN_TISSUE_SHARE = 0.10
#: Merge + write time as a share of the blocks' time (bench/results/pipeline.json, session 10:
#: write_s / (total_s - write_s) = 0.90 s / 14.4 s learned, 0.72 s / 11.0 s classical).
TAIL_SHARE = 0.06
#: Widening of the range before the estimate is settled (measured rate) and at the very start (prior).
WIDEN_MEASURED, WIDEN_PRIOR = 1.5, 2.0


@dataclass(frozen=True)
class EtaPrior:
    """Seconds per tissue mm² before any block of the run has finished (``source``: where it comes from)."""

    s_per_tissue_mm2: float
    source: str = ""


#: (device kind, segmenter kind) -> prior. Device kind is "cpu" or "cuda" ("mps" and others use the CPU's,
#: the slower, so the first estimate errs long). From the bench on the demo slide (0.61 mm² of tissue,
#: bench/results/pipeline.json, 2 CPU cores, session 10): classical 11.0 s, learned 14.4 s for the
#: blocks (open, tissue, read, segment, predict, checkpoints: total_s - write_s; the write is the
#: tail above). A slide dense with tissue runs faster per mm² (about 10 s with the learned segmenter:
#: bench/results/segmentation.json, speed.cpu.app); the ×2 range at the start covers both.
#: CUDA: bench/results/segmentation_cuda.json, learned segmentation 19.6 Mpx/s at 0.5 µm/px ≈ 0.2 s/mm²,
#: times 5 for reading, prediction and checkpoints (a rough figure; the ×2 range at the start covers it).
PRIORS: dict[tuple[str, str], EtaPrior] = {
    ("cpu", "classical"): EtaPrior(18.0, "bench/results/pipeline.json classical_baseline (CPU)"),
    ("cpu", "learned"): EtaPrior(24.0, "bench/results/pipeline.json ghist_studio (CPU)"),
    ("cuda", "classical"): EtaPrior(15.0, "CPU classical segmentation, prediction on the GPU (rough)"),
    ("cuda", "learned"): EtaPrior(1.0, "bench/results/segmentation_cuda.json learned × 5 (rough)"),
}


def prior_for(device: str, segmenter) -> EtaPrior | None:
    """The prior for a device ("cpu", "cuda:0", ...) and a segmenter object or kind ("classical"/"learned")."""
    kind = segmenter if isinstance(segmenter, str) else (
        "classical" if "classical" in type(segmenter).__name__.lower() else "learned")
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    return PRIORS.get((dev, kind))


@dataclass(frozen=True)
class Estimate:
    """Seconds left now (``low_s`` ≤ ``mid_s`` ≤ ``high_s``) and what they fall to once the running
    block's expected time is used up (``floor_*``: the estimate then stays there until it finishes)."""

    low_s: float
    mid_s: float
    high_s: float
    floor_low_s: float
    floor_mid_s: float
    floor_high_s: float
    settled: bool
    basis: str  # "prior" | "measured"
    blocks_done: int
    blocks_total: int


class BlockEta:
    """Time left from the tissue of each block and the seconds the finished ones took.

    Parameters
    ----------
    tissue_um2
        Tissue area of every block of the run, in the order they are computed.
    done
        Blocks already checkpointed (a resumed run): done, not measured.
    prior
        Rate before any block has finished (:func:`prior_for`); None: no estimate until then.
    clock
        Seconds, monotonic (``time.monotonic``); tests pass a fake clock.

    Feed it with :meth:`begin` (the first block starts), :meth:`block_done` (a block finished;
    the next one starts), :meth:`begin_tail` (merging and writing), and read :meth:`estimate`.
    """

    def __init__(self, tissue_um2: Sequence[float], *, done: Sequence[bool] | None = None,
                 prior: EtaPrior | None = None, clock: Callable[[], float] = time.monotonic,
                 min_blocks: int = MIN_BLOCKS, min_tissue_share: float = MIN_TISSUE_SHARE,
                 tail_share: float = TAIL_SHARE, n_boot: int = 200, seed: int = 0):
        self.area = np.maximum(np.asarray(tissue_um2, dtype=np.float64).reshape(-1), 0.0)
        self.done = np.zeros(len(self.area), bool) if done is None else np.asarray(done, bool).copy()
        if self.done.shape != self.area.shape:
            raise ValueError("done must have one flag per block")
        self.prior, self.clock = prior, clock
        self.min_blocks, self.min_tissue_share, self.tail_share = min_blocks, min_tissue_share, tail_share
        self.n_boot, self._rng = n_boot, np.random.default_rng(seed)
        self._todo_um2 = float(self.area[~self.done].sum())  # what this process has to do
        self._measured: list[tuple[float, float]] = []  # (tissue µm², seconds)
        self._started: float | None = None  # when the running block (or the tail) started
        self._in_tail = False
        self._models = self._fit()

    # -- feeding ------------------------------------------------------------------------------
    def begin(self) -> None:
        """The first block to compute starts now."""
        self._started = self.clock()

    def block_done(self, index: int, seconds: float | None = None) -> None:
        """Block ``index`` finished (``seconds``: its time; default: since the previous block finished)."""
        now = self.clock()
        if seconds is None:
            seconds = now - (self._started if self._started is not None else now)
        if not self.done[index]:
            self.done[index] = True
            self._measured.append((float(self.area[index]), max(0.0, float(seconds))))
            self._models = self._fit()
        self._started = now

    def begin_tail(self) -> None:
        """Every block is done; merging and writing start now."""
        self._in_tail, self._started = True, self.clock()

    # -- reading ------------------------------------------------------------------------------
    @property
    def in_tail(self) -> bool:
        """True once :meth:`begin_tail` was called."""
        return self._in_tail

    @property
    def settled(self) -> bool:
        n = len(self._measured)
        share = sum(a for a, _ in self._measured) / self._todo_um2 if self._todo_um2 > 0 else 1.0
        return n >= self.min_blocks and (share >= self.min_tissue_share or not (~self.done).any())

    def estimate(self) -> Estimate | None:
        """Seconds left now, or None when there is nothing to go on (no prior, nothing measured)."""
        if self._models is None:
            return None
        c, r, basis = self._models
        left = ~self.done
        running = int(np.argmax(left)) if left.any() and not self._in_tail else None
        n_other = int(left.sum()) - (running is not None)
        a_other = float(self.area[left].sum()) - (self.area[running] if running is not None else 0.0)
        tail = self.tail_share * (c * len(self.area) + r * float(self.area.sum()))
        elapsed = 0.0 if self._started is None else max(0.0, self.clock() - self._started)
        if self._in_tail:
            floor = np.zeros_like(c)
            now_left = np.maximum(0.0, tail - elapsed)
        else:
            cur = c + r * self.area[running] if running is not None else np.zeros_like(c)
            floor = c * n_other + r * a_other + tail
            now_left = floor + np.maximum(0.0, cur - elapsed)
        # index 0 is the point model; the rest are bootstrap resamples (if any)
        mid, fmid = float(now_left[0]), float(floor[0])
        if len(c) > 1:
            low, high = (float(v) for v in np.percentile(now_left[1:], [10, 90]))
            flow, fhigh = (float(v) for v in np.percentile(floor[1:], [10, 90]))
        else:
            low = high = mid
            flow = fhigh = fmid
        settled = basis == "measured" and self.settled
        if not settled:
            w = WIDEN_PRIOR if basis == "prior" else WIDEN_MEASURED
            low, flow = min(low, mid / w), min(flow, fmid / w)
            high, fhigh = max(high, mid * w), max(fhigh, fmid * w)
        low, high = min(low, mid), max(high, mid)
        flow, fhigh = min(flow, fmid), max(fhigh, fmid)
        return Estimate(low, mid, high, flow, fmid, fhigh, settled, basis,
                        int(self.done.sum()), len(self.area))

    # -- fitting ------------------------------------------------------------------------------
    def _fit(self) -> tuple[np.ndarray, np.ndarray, str] | None:
        """(c, r, basis): index 0 the fit on all measured blocks, then bootstrap refits."""
        if not self._measured:
            if self.prior is None:
                return None
            return np.zeros(1), np.array([self.prior.s_per_tissue_mm2 / 1e6]), "prior"
        a, t = (np.array(v, dtype=np.float64) for v in zip(*self._measured))
        n = len(a)
        # bootstrap: B resamples of the measured blocks (B shrinks with n so a refit stays cheap)
        b = max(30, min(self.n_boot, 200_000 // n)) if n >= 2 else 0
        idx = np.vstack([np.arange(n)[None, :], self._rng.integers(0, n, size=(b, n))])
        c, r = _fit_lines(a[idx], t[idx])
        return c, r, "measured"


def _fit_lines(a: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ``t ≈ c + r·a`` with c, r ≥ 0; a ratio (c = 0) when a row's areas barely differ."""
    n = a.shape[1]
    sa, st = a.sum(1), t.sum(1)
    ratio = np.divide(st, sa, out=np.zeros_like(st), where=sa > 0)
    ma, mt = sa / n, st / n
    var = ((a - ma[:, None]) ** 2).mean(1)
    cov = ((a - ma[:, None]) * (t - mt[:, None])).mean(1)
    cv = np.divide(np.sqrt(var), ma, out=np.zeros_like(ma), where=ma > 0)
    line = (n >= 3) & (cv >= 0.25)
    slope = np.divide(cov, var, out=np.zeros_like(cov), where=var > 0)
    icpt = mt - slope * ma
    c = np.where(line, icpt, 0.0)
    r = np.where(line, slope, ratio)
    neg_c = line & (icpt < 0)  # through the origin instead
    c[neg_c], r[neg_c] = 0.0, ratio[neg_c]
    neg_r = line & (slope < 0)  # time does not grow with tissue here: a constant per block
    c[neg_r], r[neg_r] = mt[neg_r], 0.0
    # all areas zero (no tissue measured): a constant per block
    zero = sa <= 0
    c[zero], r[zero] = mt[zero], 0.0
    return c, r
