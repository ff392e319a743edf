"""The pre-declared rule for retraining ``ghist-her2st`` on another segmenter's nucleus types
(docs/DECISIONS.md, 2026-12-05): compares two ``bench/her2st.py protocol`` results.

    python scripts/check_switch_rule.py bench/results/her2st_nuclei_seg_types.json bench/results/her2st.json

Prints each criterion and SWITCH or KEEP; exit status 0 for SWITCH, 1 for KEEP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_ghist import reliability_from_bench  # noqa: E402

#: the rule's thresholds, as written before the run
MAX_DROP = 0.01
MAX_P = 0.01
MAX_RELIABLE_LOSS = 0.10


def genes_beating_floor(res: dict) -> tuple[int, int]:
    """(genes that beat the floor, genes) by the card's reliability rule."""
    genes = json.loads(reliability_from_bench(res)["gene_reliability"]["genes"])
    return sum(bool(v["beats_floor"]) for v in genes.values()), len(genes)


def check(current: dict, new: dict) -> tuple[bool, list[str]]:
    lines, ok = [], True
    for split in ("loso", "lopo"):
        m0, m1 = current[split]["model"]["mean_pcc"], new[split]["model"]["mean_pcc"]
        floor, p = new[split]["floor"]["mean_pcc"], new[split].get("wilcoxon_p_vs_floor")
        close = m1 >= m0 - MAX_DROP
        ahead = p is not None and p < MAX_P and m1 > floor
        ok &= close and ahead
        p_text = "none (no paired test)" if p is None else f"{p:.2g}"
        lines.append(f"{split}: mean r {m1:.4f} (current {m0:.4f}; needs >= {m0 - MAX_DROP:.4f}: {close}); "
                     f"own floor {floor:.4f}, Wilcoxon p {p_text} (needs < {MAX_P} and ahead: {ahead}); "
                     f"seeds {[round(s, 4) for s in new[split]['model'].get('seeds', [])]}")
    (g0, n0), (g1, n1) = genes_beating_floor(current), genes_beating_floor(new)
    kept = g1 >= (1 - MAX_RELIABLE_LOSS) * g0
    ok &= kept
    lines.append(f"genes beating the floor: {g1}/{n1} (current {g0}/{n0}; needs >= {(1 - MAX_RELIABLE_LOSS) * g0:.1f}): {kept}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("current", type=Path, help="protocol result of the bundled model")
    ap.add_argument("new", type=Path, help="protocol result of the retrained model")
    a = ap.parse_args(argv)
    ok, lines = check(json.loads(a.current.read_text()), json.loads(a.new.read_text()))
    print("\n".join(lines))
    print("SWITCH" if ok else "KEEP")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
