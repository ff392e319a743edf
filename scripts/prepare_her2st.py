"""Build the compact HER2ST training pack for GHIST (spot patches, nuclei, targets, features).

    python scripts/prepare_her2st.py          # → .gpu_data/her2st/pack_stain.npz (nuclei-seg-stain's types)

Per spot of the six imaged sections (B4, C2–C6): a 256 px patch at 0.5 µm/px centred on the
spot (JPEG q92), nuclei from ``ClassicalSegmenter.segment_tile`` drawn back from their star
contours (exactly what inference sees), morphology per nucleus, counts of the selected genes,
NNLS cell-type fractions against the GHIST demo Xenium reference, colour/texture
features for the ridge baseline, and per nucleus the bundled learned segmenter's type
probabilities (``prob_<type>``, exactly the columns of its cell table), which GHIST may read
(``GhistConfig.cell_inputs``). Reads ``shared/data`` only.

    python scripts/prepare_her2st.py --cell-inputs-only   # add them to an existing pack
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.training.her2st import (  # noqa: E402
    HER2ST_MPP, IMAGE_SECTIONS, PROTOCOL_PACK, PROTOCOL_SEGMENTER, SpotPack, encode_jpeg, extract_patch, load_section, nucleus_type_inputs, patch_features,
    select_genes,
)
from ghist_core.model.pooling import N_RAYS, rasterise_stars  # noqa: E402
from ghist_core.training.reference import CELL_TYPES, load_reference, nnls_deconvolve  # noqa: E402
from ghist_core.paths import shared_data_dir  # noqa: E402


def learned_type_inputs(pack: SpotPack, images: np.ndarray, device: str = "auto",
                        segmenter: str = PROTOCOL_SEGMENTER) -> tuple[np.ndarray, list[str]]:
    """A bundled learned segmenter's per-nucleus type probabilities for every pack nucleus."""
    from ghist_core.segmentation import load_segmenter

    seg = load_segmenter(segmenter, kind="learned", device=device)
    if abs(seg.mpp - pack.mpp) > 1e-6:
        raise SystemExit(f"the segmenter reads {seg.mpp} µm/px, the pack is at {pack.mpp}: build the pack at {seg.mpp}")
    return nucleus_type_inputs(pack, images, seg, progress=lambda it: tqdm(it, desc="nucleus types", unit="batch"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=shared_data_dir())
    ap.add_argument("--out", type=Path, default=Path(PROTOCOL_PACK))
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--n-hvg", type=int, default=250)
    ap.add_argument("--max-spots", type=int, default=0, help="per section, for smoke tests (0 = all)")
    ap.add_argument("--no-cell-inputs", action="store_true", help="skip the learned segmenter's nucleus types")
    ap.add_argument("--cell-inputs-only", action="store_true", help="add the nucleus types to the pack at --out")
    ap.add_argument("--segmenter", default=PROTOCOL_SEGMENTER,
                    help=f"learned segmenter for the nucleus types ({PROTOCOL_SEGMENTER}: the protocol's, "
                         "which ghist-her2st was trained on)")
    args = ap.parse_args(argv)
    if args.cell_inputs_only:
        pack = SpotPack.load(args.out)
        pack.cell_inputs, names = learned_type_inputs(pack, pack.images(), segmenter=args.segmenter)
        pack.cell_input_names = np.array(names)
        pack.cell_input_segmenter = args.segmenter
        pack.save(args.out)
        print(f"added {names} for {len(pack.cell_spot)} nuclei to {args.out}", flush=True)
        return 0

    from PIL import Image

    from ghist_core.segmentation import ClassicalSegmenter

    Image.MAX_IMAGE_PIXELS = None
    root = args.data / "her2st"
    t0 = time.time()
    hvgs, extra = select_genes(root, n_hvg=args.n_hvg)
    genes = hvgs + extra
    print(f"genes: {len(hvgs)} HVGs + {len(extra)} markers ({time.time() - t0:.0f} s)", flush=True)
    ref = load_reference(args.data / "ghist_demo")
    seg = ClassicalSegmenter()
    ray_cols = [f"ray_{k:02d}" for k in range(N_RAYS)]

    jpegs, insts, counts, totals, fracs, feats, sec, pat, axy = [], [], [], [], [], [], [], [], []
    c_spot, c_label, c_xy, c_in, c_morph = [], [], [], [], []
    spot_r_px = 50.0 / args.mpp
    centre = args.patch / 2.0
    n_spot = 0
    for s in IMAGE_SECTIONS:
        cnt, spots = load_section(root, s)
        if args.max_spots:
            cnt, spots = cnt.iloc[: args.max_spots], spots.iloc[: args.max_spots]
        img = Image.open(root / "images" / f"{s}.jpg").convert("RGB")
        shared_ref = [g for g in ref.genes if g in cnt.columns]
        fr = nnls_deconvolve(cnt[shared_ref].to_numpy(np.float64), ref.subset(shared_ref))
        totals.append(cnt.to_numpy(np.float64).sum(1))
        counts.append(cnt.reindex(columns=genes, fill_value=0).to_numpy(np.float32))
        fracs.append(fr.astype(np.float32))
        for i in range(len(cnt)):
            rgb = extract_patch(img, spots["pixel_x"].iloc[i], spots["pixel_y"].iloc[i], HER2ST_MPP, args.mpp, args.patch)
            _, cells = seg.segment_tile(rgb, args.mpp)
            xy = cells[["x_px", "y_px"]].to_numpy(np.float64)
            rays = cells[ray_cols].to_numpy(np.float64) / args.mpp
            lab = np.arange(1, len(cells) + 1)
            inst = rasterise_stars(xy, rays, (args.patch, args.patch), lab)
            insts.append(inst.astype(np.uint16))
            jpegs.append(np.frombuffer(encode_jpeg(rgb), np.uint8))
            feats.append(patch_features(rgb))
            c_spot.append(np.full(len(cells), n_spot, np.int32))
            c_label.append(lab.astype(np.int32))
            c_xy.append(xy.astype(np.float32))
            c_in.append(np.hypot(xy[:, 0] - centre, xy[:, 1] - centre) <= spot_r_px)
            c_morph.append(np.stack([np.log(np.maximum(cells["area_um2"].to_numpy(np.float64), 1e-3)),
                                     cells["eccentricity"].to_numpy(np.float64),
                                     cells["solidity"].to_numpy(np.float64)], 1).astype(np.float32))
            n_spot += 1
        sec += [s] * len(cnt)
        pat += [s[0]] * len(cnt)
        axy.append(spots[["x", "y"]].to_numpy(np.int32))
        print(f"{s}: {len(cnt)} spots, {sum(len(c) for c in c_label[-len(cnt):])} nuclei "
              f"({time.time() - t0:.0f} s)", flush=True)
        img.close()

    off = np.zeros(len(jpegs) + 1, np.int64)
    off[1:] = np.cumsum([len(j) for j in jpegs])
    pack = SpotPack(
        genes=np.array(genes), n_hvg=len(hvgs), cell_types=np.array(CELL_TYPES), mpp=args.mpp,
        jpeg_buf=np.concatenate(jpegs), jpeg_off=off, instances=np.stack(insts),
        counts=np.concatenate(counts), totals=np.concatenate(totals).astype(np.float32),
        fractions=np.concatenate(fracs), features=np.stack(feats), section=np.array(sec), patient=np.array(pat),
        array_xy=np.concatenate(axy), cell_spot=np.concatenate(c_spot), cell_label=np.concatenate(c_label),
        cell_xy_px=np.concatenate(c_xy), cell_in_spot=np.concatenate(c_in), cell_morph=np.concatenate(c_morph),
    )
    if not args.no_cell_inputs:
        pack.cell_inputs, names = learned_type_inputs(pack, pack.images(), segmenter=args.segmenter)
        pack.cell_input_names = np.array(names)
        pack.cell_input_segmenter = args.segmenter
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pack.save(args.out)
    meta = {"n_spots": pack.n_spots, "n_cells": int(len(pack.cell_spot)), "genes": genes, "n_hvg": len(hvgs),
            "mean_cells_in_spot": float(np.bincount(pack.cell_spot[pack.cell_in_spot], minlength=pack.n_spots).mean()),
            "fraction_means": dict(zip(CELL_TYPES, pack.fractions.mean(0).round(4).tolist())),
            "bytes": args.out.stat().st_size}
    (args.out.parent / "pack_meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items() if k != "genes"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
