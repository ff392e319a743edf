"""The pre-declared rule for adopting a new default segmenter (docs/DECISIONS.md, 2026-12-05,
sessions 10 and 11): reads one ``bench/segmentation.py`` result in which the incumbent and the
candidate were scored in the same run.

    python scripts/check_segmenter_rule.py RESULT.json --current nuclei-seg-stain --candidate nuclei-seg-wide
    python scripts/check_segmenter_rule.py RESULT.json --candidate CAND --stain-scale   # session 14: criterion 6
    python scripts/check_segmenter_rule.py RESULT.json --candidate CAND --stain-scale --her2st-sections B4,C6  # session 17

Prints each criterion and ADOPT or KEEP; exit status 0 for ADOPT, 1 for KEEP, 2 when a block the
rule needs is missing. Adoption of a segmenter also needs the #17 re-run on its pack
(``scripts/check_switch_rule.py``); this script judges the segmentation half only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: the rule's thresholds, as written before the run
MAX_ACCURACY_DROP = 0.005  # test AJI, per set
MAX_SPEARMAN_DROP = 0.1  # HER2ST nuclei per spot, agreement with the classical segmenter
SETS = ("consep", "monuseg")
STAIN_PROTOCOL = 2


class RuleInputError(ValueError):
    """The result file lacks a block, a set or a model the rule needs."""


def _need(d: dict, *keys: str):
    cur = d
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            raise RuleInputError(f"missing {'/'.join(keys)} (at {k!r}) in the result")
        cur = cur[k]
    return cur


def worst_stain_aji(res: dict, ds: str, model: str) -> tuple[float, str]:
    """The lowest AJI over the shifts (the unshifted original and test-time normalisation excluded)."""
    if _need(res, "stain_shift", "protocol", "version") != STAIN_PROTOCOL:
        raise RuleInputError(f"stain_shift is not protocol version {STAIN_PROTOCOL}")
    scores = _need(res, "stain_shift", "datasets", ds, "scores")
    missing = set(_need(res, "stain_shift", "shifts")) - set(scores)
    if missing:  # a run killed part-way writes the shifts it has done
        raise RuleInputError(f"stain_shift/{ds} lacks shift(s) {sorted(missing)}: the run did not finish")
    per = {shift: _need(row, model, "aji") for shift, row in scores.items() if shift != "original"}
    if not per:
        raise RuleInputError(f"stain_shift/{ds} has no shifted rows")
    worst = min(per, key=per.get)
    return per[worst], worst


def worst_scale_aji(res: dict, ds: str, model: str) -> tuple[float, str]:
    """The lowest AJI over the zooms (1x included, as the block reports it)."""
    rows = _need(res, "scale_shift", "datasets", ds, "aji")
    missing = {str(float(z)) for z in _need(res, "scale_shift", "protocol", "zooms")} - set(rows)
    if missing or not rows:
        raise RuleInputError(f"scale_shift/{ds} lacks zoom(s) {sorted(missing)}: the run did not finish")
    per = {z: _need(row, model) for z, row in rows.items()}
    worst = min(per, key=per.get)
    return per[worst], worst


def worst_stain_scale_aji(res: dict, ds: str, model: str) -> tuple[float, str]:
    """The lowest AJI over the (stain, zoom) cells of the ``stain_scale`` block, with the scale check
    (the model's ``+auto-scale`` rows: what ``segment_tile`` runs)."""
    rows = _need(res, "stain_scale", "datasets", ds, "aji")
    stains, zooms = _need(res, "stain_scale", "protocol", "stains"), _need(res, "stain_scale", "protocol", "zooms")
    if set(stains) - set(rows) or any(set(map(str, zooms)) - set(rows[s]) for s in stains if s in rows):
        raise RuleInputError(f"stain_scale/{ds} lacks cells: the run did not finish")
    per = {f"{s} x{z}": _need(row, f"{model}+auto-scale") for s, by_zoom in rows.items() for z, row in by_zoom.items()}
    worst = min(per, key=per.get)
    return per[worst], worst


def her2st_spearman(res: dict, model: str, sections: tuple[str, ...] = ()) -> float:
    """The HER2ST count agreement with the classical segmenter: pooled over every spot, or with
    ``sections`` the mean of those sections' own Spearman (sections a candidate was trained on,
    unlabelled, are then left out: docs/DECISIONS.md, session 17)."""
    if not sections:
        return _need(res, "her2st_counts", model, "pooled", "spearman")
    return sum(_need(res, "her2st_counts", model, "sections", s, "spearman") for s in sections) / len(sections)


def check(res: dict, current: str, candidate: str, stain_scale: bool = False,
          her2st_sections: tuple[str, ...] = ()) -> tuple[bool, list[str]]:
    """(adopt?, one line per criterion); ``stain_scale``: also criterion 6 (session 14);
    ``her2st_sections``: criterion 4 read on those sections only (:func:`her2st_spearman`)."""
    lines, ok = [], True

    def verdict(name: str, passed: bool, detail: str) -> None:
        nonlocal ok
        ok &= passed
        lines.append(f"{'PASS' if passed else 'FAIL'}  {name}: {detail}")

    for ds in SETS:
        a0, a1 = _need(res, "accuracy", current, ds, "aji"), _need(res, "accuracy", candidate, ds, "aji")
        verdict(f"1. {ds} test AJI", a1 >= a0 - MAX_ACCURACY_DROP,
                f"{a1:.4f} (current {a0:.4f}, needs >= {a0 - MAX_ACCURACY_DROP:.4f})")
    for ds in SETS:
        (w0, s0), (w1, s1) = worst_stain_aji(res, ds, current), worst_stain_aji(res, ds, candidate)
        verdict(f"2. {ds} worst stain-shift AJI", w1 >= w0, f"{w1:.4f} ({s1}) vs current {w0:.4f} ({s0})")
    f0 = _need(res, "accuracy", current, "consep", "per_type_f1", "other")
    f1 = _need(res, "accuracy", candidate, "consep", "per_type_f1", "other")
    verdict("3. CoNSeP 'other' F1 higher", f1 > f0, f"{f1:.4f} vs current {f0:.4f}")
    r0, r1 = her2st_spearman(res, current, her2st_sections), her2st_spearman(res, candidate, her2st_sections)
    where = f" (mean over {', '.join(her2st_sections)})" if her2st_sections else ""
    verdict(f"4. HER2ST count Spearman with classical{where}", r1 >= r0 - MAX_SPEARMAN_DROP,
            f"{r1:.3f} (current {r0:.3f}, needs >= {r0 - MAX_SPEARMAN_DROP:.3f})")
    for ds in SETS:
        (w0, z0), (w1, z1) = worst_scale_aji(res, ds, current), worst_scale_aji(res, ds, candidate)
        verdict(f"5. {ds} worst scale-shift AJI", w1 >= w0, f"{w1:.4f} (zoom {z1}) vs current {w0:.4f} (zoom {z0})")
    if stain_scale:
        for ds in SETS:
            (w0, c0), (w1, c1) = worst_stain_scale_aji(res, ds, current), worst_stain_scale_aji(res, ds, candidate)
            verdict(f"6. {ds} worst stain+scale AJI (with the check)", w1 >= w0, f"{w1:.4f} ({c1}) vs current {w0:.4f} ({c0})")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", type=Path, help="a bench/segmentation.py JSON with both models")
    ap.add_argument("--current", default="nuclei-seg-stain")
    ap.add_argument("--candidate", required=True, help="the candidate's name in the result (its file stem)")
    ap.add_argument("--stain-scale", action="store_true",
                    help="also criterion 6: the worst stain+scale AJI with the scale check not lower (session 14)")
    ap.add_argument("--her2st-sections", type=lambda v: tuple(x for x in v.split(",") if x), default=(),
                    help="criterion 4 on these sections only, e.g. B4,C6 (session 17: the others seen in training)")
    a = ap.parse_args(argv)
    try:
        ok, lines = check(json.loads(a.result.read_text()), a.current, a.candidate, a.stain_scale, a.her2st_sections)
    except (RuleInputError, OSError, json.JSONDecodeError) as e:
        print(f"cannot judge: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print("ADOPT (the segmentation half; the #17 re-run decides the rest)" if ok else "KEEP")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
