"""A weight-space blend of two segmenters that share one initialisation (docs/DECISIONS.md, session 15).

θ(α) = (1-α)·θ_base + α·θ_other, every float tensor (BatchNorm statistics included), stored as float16
like the parents. A fine-tune and its start usually sit in one basin, so the mix keeps most of the
start's accuracy on images like its training set and part of the fine-tune's robustness; choosing α
costs validation passes, not training.

    python scripts/blend_segmenters.py choose --other tmp/cand/nuclei-seg-wide.safetensors
    python scripts/blend_segmenters.py write --other tmp/cand/nuclei-seg-wide.safetensors --alpha 0.5 \\
        --name nuclei-seg-blend --out-dir tmp/cand

``choose``: for each α of the grid, the mean per-image AJI with the scale check (as ``segment_tile``
runs it) over the validation images as they are and re-stained 3 ways, at zooms 0.67-2 (the
``scale-gate`` job's data); the highest wins, the smallest α within 0.001 of it. Writes
``bench/results/segmentation_blend_choice.json``. No test image is read.
``write``: the blend as weights + sealed card (the base card's network, postprocess and type weights;
both parents named with their sha256 and α).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.paths import REPO_DIR, shared_data_dir  # noqa: E402
from ghist_core.weights.resolve import load_state_dict, resolve_file, save_weights  # noqa: E402

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RESULT = REPO_DIR / "bench" / "results" / "segmentation_blend_choice.json"
#: card fields that describe the base's own evaluation or seal, not the blend's
_NOT_INHERITED = ("benchmark", "metrics", "sha256", "card_sha256", "integrity", "size", "files", "type_decision", "type_merge",
                  "command", "training")


def _parent(model: str):
    """(card, float32 state) of a bundled name or a .safetensors path, sha256 and seal checked."""
    from ghist_core.segmentation.model import segmenter_weights_path

    resolved = resolve_file(segmenter_weights_path(model))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(resolved).items()}
    return resolved.card, state


def blend_state(base: dict, other: dict, alpha: float) -> dict:
    """The mixed tensors; integer tensors (BatchNorm batch counters) are the base's."""
    if set(base) != set(other):
        raise ValueError(f"the two networks differ in their tensors: {sorted(set(base) ^ set(other))[:5]}")
    out = {}
    for k, a in base.items():
        b = other[k]
        if a.shape != b.shape:
            raise ValueError(f"tensor {k} has shape {tuple(a.shape)} in one network and {tuple(b.shape)} in the other")
        out[k] = ((1.0 - alpha) * a + alpha * b).half() if a.is_floating_point() else a.clone()
    return out


def write_blend(base_model: str, other_model: str, alpha: float, name: str, out_dir: Path) -> Path:
    """``<out_dir>/<name>.safetensors`` and its sealed card; returns the weights' path."""
    base_card, base = _parent(base_model)
    other_card, other = _parent(other_model)
    if base_card.get("architecture") != other_card.get("architecture"):
        raise ValueError("the two cards describe different networks; only one network's weights can be mixed")
    card = {k: v for k, v in base_card.items() if k not in _NOT_INHERITED}
    card.update(name=name, description=f"weight-space blend: {1 - alpha:g} x {base_card['name']} + {alpha:g} x "
                f"{other_card['name']} (same network, same initialisation); postprocess and type weights of "
                f"{base_card['name']}",
                blend={"alpha": alpha, "rule": "docs/DECISIONS.md, session 15",
                       "command": f"python scripts/blend_segmenters.py write --base {base_model} --other {other_model} "
                                  f"--alpha {alpha:g} --name {name}",
                       "parents": [{"name": c["name"], "sha256": c["sha256"], "weight": w}
                                   for c, w in ((base_card, 1 - alpha), (other_card, alpha))]})
    out_dir.mkdir(parents=True, exist_ok=True)
    return Path(save_weights(blend_state(base, other, alpha), out_dir, name, card).weights_path)


def choose(base_model: str, other_model: str, root: Path, out: Path, alphas=ALPHAS, restained: int = 3) -> dict:
    from choose_on_validation import TIE, _gate_data, check_aji, pick_smallest

    from ghist_core.segmentation import load_segmenter

    if not alphas:
        raise ValueError("no alpha to score")
    rows, t = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in alphas:
            path = write_blend(base_model, other_model, alpha, f"blend-{int(round(alpha * 100)):03d}", Path(tmp))
            seg = load_segmenter(str(path), device="cpu")
            copies, by_zoom = _gate_data(seg, root, restained)
            rows[alpha] = {"weights_sha256": seg.weights_sha256, **check_aji(seg, by_zoom)}
            print(f"alpha {alpha:g}: {rows[alpha]} ({time.perf_counter() - t:.0f} s)", flush=True)
    chosen = pick_smallest({a: r["all"] for a, r in rows.items()})
    res = {"rule": "docs/DECISIONS.md, session 15 (weight-space blend)", "base": base_model, "other": other_model,
           "criterion": "mean per-image validation AJI with the scale check, every copy and zoom; smallest alpha "
                        f"within {TIE} of the best", "copies": copies, "zooms": sorted(float(z) for z in by_zoom),
           "by_alpha": {f"{a:g}": r for a, r in rows.items()}, "chosen_alpha": chosen,
           "decision": "KEEP (alpha 0: no test image is scored)" if chosen == 0 else "score the chosen blend"}
    atomic_write_text(out, json.dumps(res, indent=1))
    print(json.dumps(res, indent=1), flush=True)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", choices=("choose", "write"))
    ap.add_argument("--base", default="nuclei-seg-stain")
    ap.add_argument("--other", required=True, help="bundled name or .safetensors path (card beside it)")
    ap.add_argument("--alpha", type=float, default=None, help="write: the other network's share, 0-1")
    ap.add_argument("--name", default="nuclei-seg-blend")
    ap.add_argument("--out-dir", type=Path, default=REPO_DIR / "weights")
    ap.add_argument("--data-root", type=Path, default=shared_data_dir() / "nuclei")
    ap.add_argument("--out", type=Path, default=RESULT)
    a = ap.parse_args(argv)
    if a.job == "choose":
        choose(a.base, a.other, a.data_root, a.out)
        return
    if a.alpha is None or not 0.0 <= a.alpha <= 1.0:
        ap.error("write needs --alpha between 0 and 1")
    print(f"wrote {write_blend(a.base, a.other, a.alpha, a.name, a.out_dir)}")


if __name__ == "__main__":
    main()
