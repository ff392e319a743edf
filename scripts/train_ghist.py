"""Train GHIST and write bundled weights (safetensors + JSON card).

    # spot-level (weak) training on the HER2ST pack, with checkpoints and resume
    python scripts/train_ghist.py --pack .gpu_data/her2st/pack_stain.npz --out weights --budget-s 300 \
        --checkpoint-dir runs/ghist --resume
    # package the protocol's final models (bench/her2st.py run ... --only final, 3 seeds) with the
    # protocol's metrics and per-gene reliability (bench/results/her2st.json)
    python scripts/train_ghist.py --from-jobs 'tmp/her2st_cnn_stain/ghist_s*' --out weights
    # cell-level mode on generated data (per-cell targets), a quick demonstration
    python scripts/train_ghist.py --synthetic-cells --epochs 30

The card records genes, cell types, µm/px, patch size, normalisation, the reference,
training data and command, LOSO/LOPO metrics (when a bench run is given) and sha256.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.model.network import GhistConfig, GhistNet  # noqa: E402
from ghist_core.model.predict import expression_units_for  # noqa: E402
from ghist_core.training.her2st import PROTOCOL_PACK, PackSegmenterError  # noqa: E402

HER2ST_CITATION = ("Andersson A. et al. Spatial deconvolution of HER2-positive breast cancer delineates tumor-associated "
                   "cell type interactions. Nat Commun 12, 6012 (2021); data almaan/her2st @85df741 (no licence stated)")


def card_for(pack, config: dict, train_config: dict, command: str, metrics: dict | None, extra: dict | None = None) -> dict:
    """The model card: everything a user needs to know what the weights are."""
    hvg = [str(g) for g in pack.genes[: int(pack.n_hvg)]]
    cfg = GhistConfig.from_dict(config)
    how = "mean" if cfg.spot_aggregate == "mean" else "sum"
    nuclei = "ghist_core.segmentation.ClassicalSegmenter on each 256 px patch at 0.5 um/px, star contours"
    if cfg.cell_inputs:
        nuclei += (f"; per nucleus the bundled learned segmenter's {', '.join(cfg.cell_inputs)} (its cell table's "
                   "columns), which this model reads: run it with the learned segmenter")
    card = {
        "kind": "ghist",
        "name": "ghist-her2st",
        # the segmenter whose nucleus types the pack holds (prepare_her2st.py --segmenter): the pipeline's
        # "auto" runs this model on it (weights.card.trained_segmenter)
        **({"segmenter": pack.cell_input_segmenter} if cfg.cell_inputs else {}),
        "description": "GHIST-style per-cell expression, cell type, neighbourhood and morphology from H&E; "
                       f"trained weakly on HER2ST spots ({how} of the predicted cells per spot).",
        "genes": [str(g) for g in pack.genes],
        "evaluated_genes": hvg,
        "marker_genes": [str(g) for g in pack.genes[int(pack.n_hvg):]],
        "cell_types": [str(c) for c in pack.cell_types],
        "mpp": float(cfg.mpp),  # the model's, which may be a coarsening of the pack's
        "patch_px": int(cfg.patch_px),
        "normalisation": {
            "pixels": "RGB/255, minus norm_mean, divided by norm_std (per channel, from the training patches)",
            "norm_mean": config.get("norm_mean"), "norm_std": config.get("norm_std"),
            "expression_target": "spot: log1p(1e4 * counts / total counts of the spot); per cell: linear, "
                                 f"the {how} over the cells whose centre is within {cfg.spot_radius_um:g} um of a "
                                 "spot centre is compared with it",
            "morphology": "log area (um^2), eccentricity, solidity standardised by morph_mean/morph_std",
        },
        "reference": {
            "used": bool(cfg.use_reference),
            "source": "GHIST demo Xenium breast cells (SydneyBioX/GHIST data_demo, GPL-3 data; no code copied), "
                      "5,508 cells x 280 genes, 9 labelled types",
            "spot_fractions": "NNLS of library-normalised, per-gene-mean-scaled spot counts on the type profiles (shared genes)",
            "profiles": "tensor 'reference' (types x genes) in the safetensors: NNLS fit of training-spot CP10k on the "
                        "spot fractions, divided by the mean number of nuclei per spot",
        },
        "training": {
            "data": f"HER2ST sections {sorted(set(pack.section.tolist()))} ({pack.n_spots} spots with H&E); {HER2ST_CITATION}",
            "nuclei": nuclei,
            "config": train_config,
            "command": command,
        },
        "config": config,
        "expression_units": expression_units_for(config.get("spot_aggregate", "sum")),
        "licence_note": "Weights trained on HER2ST (no licence stated by the authors; research use) and on reference "
                        "profiles from GPL-3 data files.",
    }
    if metrics:
        card["metrics"] = metrics
    if extra:
        card.update(extra)
    return card


def metrics_from_bench(res: dict) -> dict:
    """The protocol's summary (bench/her2st.json) for the card: every method's mean r per split,
    the model's seeds, the paired test against the floor and the specificity numbers."""
    out: dict = {}
    for split in ("loso", "lopo"):
        b = res.get(split)
        if not b or not b.get("model"):
            continue
        m = b["model"]
        out[split] = {"model_mean_pcc": m["mean_pcc"], "model_top50_pcc": m["top50_pcc"], "model_seeds": m.get("seeds"),
                      "floor_mean_pcc": b["floor"]["mean_pcc"], "floor_chosen": b["floor"].get("chosen"),
                      "baselines_mean_pcc": {k: v["mean_pcc"] for k, v in b["baselines"].items()},
                      "per_unit_mean_pcc": {u: v["mean_pcc"] for u, v in m["per_unit"].items()},
                      "paired_vs_floor": b.get("paired_vs_floor"),
                      "specificity": {k: v for k, v in b.get("specificity", {}).items() if k not in ("per_unit", "baselines")}}
    out["protocol"] = ("bench/her2st.py protocol (nested inner CV, floors with the model's inputs, 3 seeds, paired "
                       "Wilcoxon); genes: 250 HVGs (see evaluated_genes); Pearson r per gene over held-out spots")
    return out


def reliability_from_bench(res: dict) -> dict:
    """``gene_reliability`` and ``type_reliability`` card fields from the protocol's per-gene r:
    the held-out units are the 6 LOSO sections and LOPO patient C (LOPO B is LOSO B4)."""
    from ghist_core.training.expression_metrics import BEAT_RULE, reliability_table

    def unit_r(per_unit: dict, names: list[str], key: str) -> dict:
        return {u: np.array([v[key][n] for n in names]) for u, v in per_unit.items()}

    def held_out(entry: dict) -> dict:
        return {**entry["loso"]["per_unit"], "C": entry["lopo"]["per_unit"]["C"]}

    genes = list(res["loso"]["model"]["per_unit"]["B4"]["per_gene"])
    model = unit_r(held_out({s: res[s]["model"] for s in ("loso", "lopo")}), genes, "per_gene")
    floor = unit_r(held_out({s: res[s]["floor"] for s in ("loso", "lopo")}), genes, "per_gene")
    table = reliability_table(model, floor, genes)
    out = {"gene_reliability": {
        "rule": "held-out Pearson r per gene on HER2ST spots (mean over 3 seeds) on 7 units: 6 leave-one-section-out "
                "sections and leave-one-patient-out patient C; " + BEAT_RULE.format(k=max(1, len(model) - 2), n=len(model)),
        "floor": "ridge on the spot's nucleus count (+ mean nucleus type probabilities, + colour/texture), the variant "
                 "and its strength chosen by inner cross-validation on the training sections of each fold",
        "units": sorted(model),
        "genes": json.dumps(table, separators=(",", ":")),  # text: a nested table slows every .h5ad that copies the card
    }}
    t = res.get("types", {})
    if "model" in t and "ridge_count" in t:
        names = list(next(iter(t["model"]["per_unit"].values()))["per_type"])
        pm = unit_r(t["model"]["per_unit"], names, "per_type")
        pb = unit_r(t["ridge_count"]["per_unit"], names, "per_type")
        tt = reliability_table(pm, pb, names)
        out["type_reliability"] = {
            "rule": "held-out per-spot agreement (Pearson r over spots) of the predicted type composition with the "
                    "reference deconvolution (the training target), 7 units as for genes; "
                    + BEAT_RULE.format(k=max(1, len(pm) - 2), n=len(pm)).replace("the floor", "the baseline"),
            "baseline": "ridge on the spot's nucleus count, strength chosen by inner cross-validation",
            "types": {n: {"pcc_mean": v["pcc_mean"], "baseline_pcc_mean": v["floor_pcc_mean"], "beats_baseline": v["beats_floor"],
                          "pcc_min": v["pcc_min"], "pcc_max": v["pcc_max"]} for n, v in tt.items()},
        }
    return out


def load_job_models(pattern: str) -> list[tuple[int, "GhistNet", dict]]:
    """``(seed, net, job meta)`` of every ``final`` job under the seed folders matching ``pattern``."""
    import glob

    from safetensors.torch import load_file

    found = []
    for d in sorted(glob.glob(pattern)):
        d = Path(d)
        meta_f, w = d / "final__ghist.json", d / "final.safetensors"
        if not (meta_f.exists() and w.exists()):
            continue
        meta = json.loads(meta_f.read_text())
        net = GhistNet(GhistConfig.from_dict(meta["config"]))
        missing = {k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")}
        net.load_state_dict({**missing, **load_file(str(w))}, strict=True)
        found.append((int(meta["train_config"]["seed"]), net.eval(), meta))
    return sorted(found, key=lambda t: t[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", type=Path, default=Path(PROTOCOL_PACK))
    ap.add_argument("--out", type=Path, default=Path("weights"))
    ap.add_argument("--from-jobs", default="", help="glob of bench/her2st.py run seed folders (e.g. 'tmp/her2st_cnn_stain/ghist_s*'): "
                    "the lowest seed's final model is the model, the others its ensemble members")
    ap.add_argument("--run-command", default="", help="the bench/her2st.py command that made --from-jobs (for the card)")
    ap.add_argument("--bench", type=Path, default=Path("bench/results/her2st.json"), help="metrics for the card")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--budget-s", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt if present")
    ap.add_argument("--log", default=None, help="JSON-lines log of every epoch")
    ap.add_argument("--synthetic-cells", action="store_true", help="cell-level mode on generated data")
    args = ap.parse_args(argv)
    command = "python scripts/train_ghist.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    import torch

    from ghist_core.device import pick_device
    from ghist_core.model.predict import save_ghist
    from ghist_core.training.ghist import Trainer, TrainConfig, fit_her2st, make_synthetic_cells, pearson_per_gene

    dev = pick_device(args.device)
    if args.synthetic_cells:
        data, _ = make_synthetic_cells(n_patches=32, size=64)
        cfg = GhistConfig(genes=[f"gene{i}" for i in range(6)], cell_types=["t0", "t1", "t2"], patch_px=64,
                          widths=(8, 16, 32, 32), fpn_dim=16, embed_dim=32, use_reference=False, dropout=0.0)
        net = GhistNet(cfg)
        tr = Trainer(TrainConfig(mode="cell", epochs=args.epochs, batch_size=8, lr=3e-3, augment=False,
                                 checkpoint_dir=args.checkpoint_dir, log_path=args.log), device=dev)
        tr.fit(net, data)
        with torch.no_grad():
            o = net.to(dev)(data.images.to(dev), data.instances.to(dev))
        tgt = data.lut_expr.to(dev)[o["cell_batch"], o["cell_label"]]
        print(f"cell-level Pearson r (log1p): {pearson_per_gene(torch.log1p(o['expr']), torch.log1p(tgt)).mean():.3f}")
        return 0

    from ghist_core.training.her2st import SpotPack

    pack = SpotPack.load(args.pack)
    members: list = []
    if args.from_jobs:
        found = load_job_models(args.from_jobs)
        if not found:
            raise SystemExit(f"no final__ghist.json + final.safetensors under {args.from_jobs}")
        seed, net, meta = found[0]
        members = [n for _, n, _ in found[1:]]
        config = meta["config"]
        bench = json.loads(args.bench.read_text()) if args.bench.exists() else None
        scored = ((bench or {}).get("protocol") or {}).get("pack") or {}  # older results name no pack
        try:
            pack.require_segmenter(scored.get("cell_input_segmenter"), path=args.pack,
                                   wanted_by=f"the protocol result {args.bench} scored")
        except PackSegmenterError as e:
            raise SystemExit(str(e)) from None
        extra = {"training_run": {"device": meta.get("device"), "seconds": round(meta["train_s"], 1),
                                  "epochs": meta["epochs_done"], "seed": seed,
                                  "final_loss": meta["history"][-1] if meta["history"] else None,
                                  "command": args.run_command or "python bench/her2st.py run --kinds ghist --seeds 0,1,2 "
                                             "--only final (see bench/her2st.py's docstring for the whole command)"},
                 "ensemble": {"members": len(found), "seeds": [s for s, _, _ in found],
                              "rule": f"seeds {', '.join(str(s) for s, _, _ in found)} of the same recipe on all 1193 spots; "
                                      f"member 0 (seed {seed}) is the model, the others only measure its spread"}}
        if bench and all(bench.get(sp, {}).get("model") and bench[sp]["model"].get("complete") for sp in ("loso", "lopo")):
            extra.update(reliability_from_bench(bench))
        else:
            print(f"no reliability in the card: {args.bench} lacks a complete protocol run of the model", flush=True)
        card = card_for(pack, config, meta["train_config"], command, metrics_from_bench(bench) if bench else None, extra)
    else:
        from ghist_core.training.ghist import TrainConfig as TC

        ckpt = args.checkpoint_dir
        if ckpt and not args.resume and (Path(ckpt) / "last.pt").exists():
            (Path(ckpt) / "last.pt").unlink()  # a fresh run unless --resume
        tcfg = TC(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, time_budget_s=args.budget_s,
                  checkpoint_dir=ckpt, log_path=args.log)
        if ckpt:
            Path(ckpt).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        res = fit_her2st(pack, pack.images(), np.arange(pack.n_spots), kind="ghist", tcfg=tcfg, device=dev)
        net = res.model
        config = res.config
        bench_path = Path("bench/results/her2st.json")
        bench = json.loads(bench_path.read_text()) if bench_path.exists() else None
        card = card_for(pack, config, res.train_config, command, metrics_from_bench(bench) if bench else None,
                        {"training_run": {"device": str(dev), "seconds": round(time.time() - t0, 1), "epochs": len(res.history)}})
    path = save_ghist(net.cpu(), args.out, card, members=[m.cpu() for m in members])
    print(f"wrote {path} and its card")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
