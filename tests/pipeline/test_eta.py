"""Time left (ghist_core.pipeline.eta): measured seconds per tissue area, a range until settled,
never counting up while a block runs, resumed runs; the record the pages read; the pipeline's events.

Every unit test drives the estimator with a fake clock: no test depends on how fast this machine is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ghist_core.pipeline.eta import MIN_BLOCKS, TAIL_SHARE, BlockEta, EtaPrior, prior_for
from ghist_core.project import overview
from ghist_core.project.overview import TimeLeft


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def _run(eta: BlockEta, clock: FakeClock, seconds, indices) -> None:
    """Blocks ``indices`` finish one after another, taking ``seconds`` each (clock advanced)."""
    for i in indices:
        clock.advance(float(seconds[i]))
        eta.block_done(i)


def _true_left(seconds, done_upto: int) -> float:
    return float(np.sum(seconds[done_upto:]))


# --- blocks with very different tissue ------------------------------------------------------
def test_remaining_follows_tissue_not_block_count() -> None:
    """Tissue-poor edge blocks first, full blocks later: the estimate follows the tissue left."""
    area = np.array([2e3] * 6 + [2.6e5] * 14 + [4e4] * 5)  # µm²: edge rows, tissue, edge
    seconds = 0.5 + 4e-5 * area  # a fixed cost per block plus a cost per µm² of tissue
    clock = FakeClock()
    eta = BlockEta(area, clock=clock, tail_share=0.0)
    eta.begin()
    _run(eta, clock, seconds, range(8))  # 6 edge blocks + 2 full ones measured
    est = eta.estimate()
    truth = _true_left(seconds, 8)
    assert est.mid_s == pytest.approx(truth, rel=0.02)
    assert est.low_s <= truth * (1 + 1e-9) and truth <= est.high_s * (1 + 1e-9)
    naive = seconds[:8].mean() * (len(area) - 8)  # per-block average: what a block count would say
    assert abs(naive - truth) / truth > 0.5  # the naive estimate is far off on this slide


def test_ratio_when_areas_barely_differ() -> None:
    """Equal blocks: the rate is seconds per µm² of the measured ones (no intercept to fit)."""
    area = np.full(10, 1e5)
    clock = FakeClock()
    eta = BlockEta(area, clock=clock, tail_share=0.0)
    eta.begin()
    _run(eta, clock, np.full(10, 3.0), range(5))
    assert eta.estimate().mid_s == pytest.approx(15.0)


def test_tail_counts_down_in_the_write_stage() -> None:
    area = np.full(5, 1e5)
    clock = FakeClock()
    eta = BlockEta(area, clock=clock, tail_share=TAIL_SHARE)
    eta.begin()
    _run(eta, clock, np.full(5, 10.0), range(5))
    assert eta.estimate().mid_s == pytest.approx(TAIL_SHARE * 50.0)
    eta.begin_tail()
    clock.advance(1.0)
    assert eta.estimate().mid_s == pytest.approx(TAIL_SHARE * 50.0 - 1.0)
    clock.advance(100.0)
    assert eta.estimate().high_s == 0.0


# --- never counts up while waiting -----------------------------------------------------------
@pytest.mark.parametrize("n_measured", [0, 2, 7])
def test_never_counts_up_while_a_block_runs(n_measured: int) -> None:
    rng = np.random.default_rng(1)
    area = rng.uniform(1e4, 2.6e5, 30)
    seconds = 1.0 + 3e-5 * area * rng.uniform(0.7, 1.3, 30)
    clock = FakeClock()
    eta = BlockEta(area, clock=clock, prior=EtaPrior(30.0))
    eta.begin()
    _run(eta, clock, seconds, range(n_measured))
    before = eta.estimate()
    seen = [before]
    for _ in range(200):  # the running block takes far longer than expected
        clock.advance(0.5)
        seen.append(eta.estimate())
    for a, b in zip(seen, seen[1:]):
        assert b.low_s <= a.low_s + 1e-9 and b.mid_s <= a.mid_s + 1e-9 and b.high_s <= a.high_s + 1e-9
    assert seen[-1].mid_s < before.mid_s  # it did count down
    # floored at zero for the running block: what is left then is the other blocks (+ tail)
    assert seen[-1].mid_s == pytest.approx(seen[-1].floor_mid_s) and seen[-1].mid_s > 0


def test_recorded_time_left_counts_down_to_its_floor_and_never_up() -> None:
    rec = TimeLeft(low_s=100, mid_s=120, high_s=150, floor_low_s=80, floor_mid_s=90, floor_high_s=110, at=5000.0)
    assert rec.at_time(5010).mid_s == pytest.approx(110)
    assert rec.at_time(5010).high_s == pytest.approx(140)
    later = [rec.at_time(5000 + s) for s in range(0, 120, 5)]
    assert all(b.mid_s <= a.mid_s for a, b in zip(later, later[1:]))
    assert rec.at_time(6000).low_s == 80 and rec.at_time(6000).high_s == 110
    assert rec.at_time(4000).mid_s == 120  # a clock behind the record never adds time


# --- the range ------------------------------------------------------------------------------
def test_range_narrows_and_settles() -> None:
    rng = np.random.default_rng(7)
    n = 60
    area = rng.uniform(5e4, 2.6e5, n)
    seconds = 2e-5 * area * rng.lognormal(0.0, 0.25, n)  # noisy per-block rate
    clock = FakeClock()
    eta = BlockEta(area, clock=clock, prior=EtaPrior(20.0))
    widths, settled = [], []
    eta.begin()
    for i in range(n - 1):
        est = eta.estimate()
        widths.append((est.high_s - est.low_s) / est.mid_s)
        settled.append(est.settled)
        _run(eta, clock, seconds, [i])
    assert not any(settled[:MIN_BLOCKS]) and settled[-1]
    assert widths[0] == pytest.approx(2.0 - 0.5)  # the prior: mid/2 .. mid×2
    assert widths[1] >= 1.5 - 1 / 1.5 - 1e-9  # one block measured: at least mid/1.5 .. mid×1.5
    assert widths[30] < widths[2] and widths[-1] < widths[MIN_BLOCKS - 1]
    assert widths[30] < 0.5


def test_settled_needs_ten_percent_of_the_tissue() -> None:
    area = np.full(100, 1e5)  # 5 blocks are only 5 % of the tissue
    clock = FakeClock()
    eta = BlockEta(area, clock=clock)
    eta.begin()
    _run(eta, clock, np.full(100, 2.0), range(5))
    assert not eta.estimate().settled
    _run(eta, clock, np.full(100, 2.0), range(5, 10))
    assert eta.estimate().settled


def test_no_prior_no_estimate_until_a_block_is_done() -> None:
    clock = FakeClock()
    eta = BlockEta([1e5, 1e5], clock=clock)
    eta.begin()
    assert eta.estimate() is None
    clock.advance(4.0)
    eta.block_done(0)
    assert eta.estimate().basis == "measured" and eta.estimate().mid_s > 0


def test_prior_for_device_and_segmenter() -> None:
    assert prior_for("cuda:0", "learned").s_per_tissue_mm2 < prior_for("cpu", "learned").s_per_tissue_mm2
    assert prior_for("mps", "classical") == prior_for("cpu", "classical")  # unknown devices: the CPU's

    class ClassicalSegmenter:  # the segmenter object's class name says which
        pass

    assert prior_for("cpu", ClassicalSegmenter()) == prior_for("cpu", "classical")


# --- resumed runs ---------------------------------------------------------------------------
def test_resumed_run_counts_checkpointed_blocks_as_done() -> None:
    area = np.array([1e5] * 10 + [2e5] * 10)
    done = [True] * 10 + [False] * 10  # the first half was checkpointed by the killed attempt
    clock = FakeClock()
    eta = BlockEta(area, done=done, prior=EtaPrior(10.0), clock=clock, tail_share=0.0)
    eta.begin()
    est = eta.estimate()
    assert (est.blocks_done, est.blocks_total) == (10, 20)
    assert est.mid_s == pytest.approx(10.0 * 10 * 0.2)  # prior × the tissue left (10 × 0.2 mm²), not the whole slide
    _run(eta, clock, np.full(20, 4.0), range(10, 15))  # measured: 4 s per 0.2 mm² block
    est = eta.estimate()
    assert est.mid_s == pytest.approx(20.0) and est.settled  # 5 blocks = half of what this process had
    assert est.blocks_done == 15


# --- the record the pages read ------------------------------------------------------------
def test_time_left_text() -> None:
    assert TimeLeft(240, 300, 360).text() == "about 4–6 min left"
    assert TimeLeft(290, 300, 300).text() == "about 4–5 min left"
    assert TimeLeft(300, 300, 300).text() == "about 5 min left"
    assert TimeLeft(25, 30, 40).text() == "about 20–40 s left"
    assert TimeLeft(4000, 4500, 5000).text() == "about 1 h 06 min – 1 h 24 min left"


def test_record_and_read_time_left(tmp_path, small_slide_png) -> None:
    from ghist_core.project.store import Project

    project = Project.create(tmp_path / "p")
    record = project.add_slide(small_slide_png, patient_id="P-1", mpp=0.499)
    rid = project.start_run(record.slide_id, model_id="m", weights_sha256="", device="cpu", params={})
    run = project.get_run(rid)
    assert overview.time_left(project, run) is None  # nothing recorded yet: "estimating…"
    clock = FakeClock()
    eta = BlockEta([1e5] * 4, clock=clock, tail_share=0.0)
    eta.begin()
    _run(eta, clock, np.full(4, 30.0), range(2))
    overview.record_time_left(project.run_dir(rid), eta.estimate(), now=10_000.0)
    shown = overview.time_left(project, run, now=10_010.0)
    assert shown.mid_s == pytest.approx(50.0)  # 60 s left at the record, 10 s gone since
    assert shown.low_s <= shown.mid_s <= shown.high_s
    assert overview.time_left(project, dataclasses.replace(run, progress=1.0)) is None
    overview.clear_time_left(project.run_dir(rid))
    assert overview.time_left(project, run) is None


# --- wired into the pipeline ----------------------------------------------------------------
def test_pipeline_events_and_store_carry_the_range(tmp_path, small_slide_png, tiny_ghist) -> None:
    from ghist_core.pipeline.blocks import PipelineConfig, plan_blocks, predict_slide
    from ghist_core.io.slide import open_slide
    from ghist_core.project.store import Project

    config = PipelineConfig(block_um=96.0, grid_sizes_um=(25.0, 100.0))
    project = Project.create(tmp_path / "p")
    record = project.add_slide(small_slide_png, patient_id="P-1", mpp=0.499)
    with open_slide(project.slide_path(record.slide_id), mpp=record.mpp) as s:
        blocks = plan_blocks(s, config)
        mask, _ = s.tissue_mask(config.tissue_thumbnail_px)
        slide_um2 = s.dimensions[0] * s.dimensions[1] * s.mpp ** 2
    tissue = np.array([b.tissue_um2 for b in blocks])
    assert (tissue > 0).all() and (tissue <= np.array([b.w_um * b.h_um for b in blocks]) + 1e-6).all()
    assert tissue.sum() == pytest.approx(mask.mean() * slide_um2, rel=0.1)
    events, shown = [], []

    def progress(event) -> None:
        events.append(event)
        if event.stage == "segment+predict" and event.fraction > 0:
            run = project.latest_run(record.slide_id)
            shown.append(overview.time_left(project, run))

    predict_slide(record.slide_id, project, model_id=str(tiny_ghist), segmenter_id="classical", device="cpu",
                  config=config, progress=progress)
    blocks_events = [e for e in events if e.stage == "segment+predict"]
    assert all(e.eta_s is not None for e in blocks_events)  # the CPU prior from the first event on
    assert all(e.eta_low_s <= e.eta_s <= e.eta_high_s for e in blocks_events)
    assert all(e.eta_s is None for e in events if e.stage in ("open", "tissue"))
    assert shown and all(t is not None and t.low_s <= t.mid_s <= t.high_s for t in shown)
    assert events[-1].stage == "write" and events[-1].fraction == 1.0 and events[-1].eta_s is None


def test_the_first_estimate_reaches_the_store_even_within_the_write_throttle(tmp_path) -> None:
    """The reporter writes to the store at most every 0.5 s, but the first estimate goes out at
    once: on a fast machine the first block can end within 0.5 s of the previous write, and the
    pages would show "estimating…" with an estimate already made (a clean-clone run caught it)."""
    from ghist_core.pipeline.blocks import Block, _Reporter
    from ghist_core.project.store import Project

    project = Project.create(tmp_path / "p")
    slide = tmp_path / "s.png"
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(slide)
    rec = project.add_slide(slide, patient_id="P-1", mpp=0.5)
    run_id = project.start_run(rec.slide_id, model_id="m", weights_sha256="0" * 64, device="cpu")
    clock = FakeClock()
    rep = _Reporter(project, run_id, None, prior=EtaPrior(10.0), clock=clock)
    rep("tissue", 1.0)  # a store write now
    blocks = [Block(i, 0.0, 10.0 * i, 10.0, 10.0, 100.0) for i in range(3)]
    rep.make_eta(blocks, [False] * 3)
    clock.advance(0.1)  # well within the 0.5 s throttle
    rep("segment+predict", 0.2)
    assert overview.time_left(project, project.latest_run(rec.slide_id)) is not None
