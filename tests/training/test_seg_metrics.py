"""Segmentation metrics on tiny hand-made instance maps whose answers were worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ghist_core.training.segmentation_metrics import (DetectionCounts, contingency, detection_counts, seg_counts)


def _maps_split_and_miss():
    gt = np.zeros((6, 8), int)
    gt[0:2, 0:2] = 1          # area 4
    gt[0:2, 4:6] = 2          # area 4, missed
    pred = np.zeros((6, 8), int)
    pred[0:2, 0:3] = 7        # area 6, overlaps gt 1 by 4 -> IoU 4/6
    pred[3:5, 4:6] = 9        # area 4, false positive
    return gt, pred


def test_contingency_counts_pixel_pairs():
    gt, pred = _maps_split_and_miss()
    table, ag, ap = contingency(gt, pred)
    assert table.shape == (3, 3)
    assert table[1, 1] == 4 and table[0, 1] == 2 and table[2, 0] == 4 and table[0, 2] == 4
    assert list(ag) == [40, 4, 4] and list(ap) == [38, 6, 4]


def test_aji_pq_dice_by_hand():
    gt, pred = _maps_split_and_miss()
    c = seg_counts(gt, pred)
    # AJI: C = 4, U = 6 (pair) + 4 (missed gt) + 4 (unused pred) = 14
    assert c.aji == pytest.approx(4 / 14)
    # PQ: TP 1 (IoU 2/3), FP 1, FN 1 -> DQ 0.5, SQ 2/3
    assert (c.tp, c.fp, c.fn) == (1, 1, 1)
    assert c.dq == pytest.approx(0.5) and c.sq == pytest.approx(2 / 3) and c.pq == pytest.approx(1 / 3)
    # Dice: 2 * 4 / (8 + 10)
    assert c.dice == pytest.approx(8 / 18)


def test_merged_prediction():
    gt = np.zeros((2, 4), int)
    gt[:, 0:2] = 1
    gt[:, 2:4] = 2
    pred = np.ones((2, 4), int)
    c = seg_counts(gt, pred)
    assert c.aji == pytest.approx(0.5)        # (4 + 4) / (8 + 8)
    assert c.tp == 0 and c.pq == 0.0          # IoU exactly 0.5 is not a match
    assert c.dice == pytest.approx(1.0)


def test_perfect_and_empty():
    gt, _ = _maps_split_and_miss()
    perm = np.where(gt > 0, 10 - gt, 0)       # same nuclei, other ids
    c = seg_counts(gt, perm)
    assert c.aji == 1.0 and c.pq == 1.0 and c.dice == 1.0
    e = seg_counts(gt, np.zeros_like(gt))
    assert e.aji == 0.0 and e.pq == 0.0 and (e.fn, e.fp) == (2, 0)


def test_pooling_adds_counts():
    gt, pred = _maps_split_and_miss()
    gt2 = np.zeros((2, 4), int); gt2[:, 0:2] = 1; gt2[:, 2:4] = 2
    a, b = seg_counts(gt, pred), seg_counts(gt2, np.ones((2, 4), int))
    pooled = a + b
    assert pooled.aji == pytest.approx((4 + 8) / (14 + 16))
    assert (pooled.tp, pooled.fp, pooled.fn) == (1, 2, 3)


def test_detection_f1_by_hand():
    gt, pred = _maps_split_and_miss()
    # centroids: gt (0.5, 0.5), (4.5, 0.5); pred (1, 0.5), (4.5, 3.5)
    d = detection_counts(gt, pred, radius_px=2.0)
    assert d.f1 == pytest.approx(2 / 4)
    d_wide = detection_counts(gt, pred, radius_px=3.5)
    assert d_wide.f1 == pytest.approx(1.0)


def test_type_f1_like_hovernet():
    d = DetectionCounts(np.array([1, 1, 2]), np.array([1, 2, 2]), np.array([1]), np.array([2]))
    assert d.type_f1(1) == pytest.approx(2 / 5)   # 2*1 / (2*1 + 2*1 fn + 1 fn_d)
    assert d.type_f1(2) == pytest.approx(2 / 5)   # 2*1 / (2*1 + 2*1 fp + 1 fp_d)
    assert d.f1 == pytest.approx(6 / 8)


def test_types_follow_ids():
    gt, pred = _maps_split_and_miss()
    gt_types = np.array([0, 3, 4])
    pred_types = np.zeros(10, int); pred_types[7] = 3; pred_types[9] = 4
    d = detection_counts(gt, pred, 2.0, gt_types, pred_types)
    assert list(d.paired_true) == [3] and list(d.paired_pred) == [3]
    assert list(d.unpaired_true) == [4] and list(d.unpaired_pred) == [4]
