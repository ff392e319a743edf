"""HER2ST benchmark: GHIST vs an ST-Net-style patch CNN vs ridge on colour/texture, same splits.

    # on the GPU machine (all folds + the bundled model, ~7 min on one H100):
    python bench/her2st.py run --pack .gpu_data/her2st/pack.npz --out OUTDIR --budget-s 300
    # on a CPU: both CNNs at 1 µm/px (4× fewer pixels), equal epochs, two jobs at a time (~1 h);
    # this made bench/results/her2st.json and the bundled weights (fold "final")
    python bench/her2st.py run --mpp 1.0 --epochs 16 --budget-s 0 --parallel 2 --name her2st \
        --net '{"spot_aggregate":"mean","tissue_skip":true,"fpn_smooth":false,"fpn_dim":64,"use_reference":false,
               "cell_inputs":["prob_other","prob_inflammatory","prob_epithelial","prob_spindle-shaped"],
               "density_prior":true,"image_dropout":0.5}'
    # jobs run one by one elsewhere (same --work): score them
    python bench/her2st.py collect --work WORKDIR --name her2st
    # anywhere, from the saved predictions: metrics JSON + spatial maps
    python bench/her2st.py report --preds OUTDIR/her2st_preds.npz --out bench/results

Splits over the six imaged sections (B4; C2–C6): leave-one-section-out (``loso``, 6 folds)
and leave-one-patient-out (``lopo``: train C → test B4; train B4 → test C2–C6). Per held-out
section/patient: Pearson r per gene over its spots (log1p CP10k, predicted vs measured;
a gene constant in the held-out spots counts as r = 0), mean over the 250 HVGs, mean of the
50 best, number with r > 0.3. ``mean_pcc`` of a split = average over held-out units.
All three methods see the same training spots of each fold; both CNNs use the same encoder,
augmentation, epochs budget and 8-view test-time augmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def folds(section: np.ndarray, patient: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (train_idx, test_idx)`` for every LOSO and LOPO fold, plus ``final`` (all spots)."""
    out = {}
    for s in SECTIONS:
        te = np.flatnonzero(section == s)
        if len(te):
            out[f"loso_{s}"] = (np.flatnonzero(section != s), te)
    for p in sorted(set(patient.tolist())):
        out[f"lopo_{p}"] = (np.flatnonzero(patient != p), np.flatnonzero(patient == p))
    out["final"] = (np.arange(len(section)), np.arange(0))
    return out


def pcc_per_gene(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r per column; 0 where either side is constant."""
    p = pred - pred.mean(0)
    t = y - y.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    return np.where(den > 1e-12, (p * t).sum(0) / np.where(den > 1e-12, den, 1), 0.0)


def summarise(r: np.ndarray) -> dict:
    top = np.sort(r)[::-1][:50]
    return {"mean_pcc": float(r.mean()), "top50_pcc": float(top.mean()), "n_genes_r_gt_0.3": int((r > 0.3).sum())}


# --------------------------------------------------------------------------------------------
# one training job (a subprocess, so that many share the GPU)
# --------------------------------------------------------------------------------------------
def job(args: argparse.Namespace) -> None:
    import torch

    from ghist_core.training.her2st import SpotPack
    from ghist_core.training.ghist import PatchData, TrainConfig, fit_her2st, predict_spots

    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pack = SpotPack.load(args.pack)
    images = pack.images()
    if args.mpp:
        pack, images = pack.coarsened(images, int(round(args.mpp / pack.mpp)))
    tr, te = folds(pack.section, pack.patient)[args.fold]
    if args.max_train:
        tr = tr[:: max(1, len(tr) // args.max_train)]
        te = te[: args.max_train]
    tcfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, time_budget_s=args.budget_s,
                       seed=args.seed, log_path=None, **(json.loads(args.train) if args.train else {}))
    net_kw = json.loads(args.net) if args.net else {}
    log = lambda m: print(f"[{args.fold}/{args.kind}] {m}", flush=True)  # noqa: E731
    t0 = time.time()
    res = fit_her2st(pack, images, tr, kind=args.kind, tcfg=tcfg, net_kw=net_kw, device=dev, log=log)
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"fold": args.fold, "kind": args.kind, "train_s": time.time() - t0, "epochs_done": len(res.history),
            "history": res.history, "config": res.config, "train_config": res.train_config,
            "n_train_spots": res.n_train_spots, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    if len(te):
        mm = np.asarray(res.config.get("morph_mean", [0.0, 0.0, 0.0]), np.float32)
        ms = np.asarray(res.config.get("morph_std", [1.0, 1.0, 1.0]), np.float32)
        data = PatchData.from_pack(pack, te, images, mm, ms, tuple(res.config.get("cell_inputs", ()))).to(dev)
        pred = predict_spots(res.model, data, batch_size=32, tta=True)
        np.save(out / f"{args.fold}__{args.kind}.npy", pred.astype(np.float32))
    if args.fold == "final":
        state = {k: v.detach().float().cpu().contiguous() for k, v in res.model.state_dict().items()
                 if not k.endswith("num_batches_tracked")}
        try:
            from safetensors.torch import save_file

            save_file(state, str(out / "final.safetensors"))
        except ImportError:  # the plain state dict reads back with torch.load(weights_only=True)
            torch.save(state, out / "final.pt")
    (out / f"{args.fold}__{args.kind}.json").write_text(json.dumps(meta))
    log(f"done in {time.time() - t0:.0f} s")


# --------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------
def ridge_predictions(features: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
    """Ridge (alpha by generalised CV on the training spots) on standardised patch features."""
    from sklearn.linear_model import RidgeCV

    mu, sd = features[tr].mean(0), features[tr].std(0) + 1e-8
    m = RidgeCV(alphas=np.logspace(-1, 5, 25)).fit((features[tr] - mu) / sd, y[tr])
    return m.predict((features[te] - mu) / sd)


def run(args: argparse.Namespace) -> None:
    from ghist_core.training.her2st import SpotPack

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pack = SpotPack.load(args.pack)
    fl = folds(pack.section, pack.patient)
    kinds = args.kinds.split(",")
    jobs = [(f, k) for f in fl for k in kinds if not (f == "final" and k == "stnet")]
    if args.only:
        jobs = [j for j in jobs if j[0] in args.only.split(",")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    codes: list[int] = []
    logf = open(out / f"{args.name}_log.txt", "a")
    for f, k in jobs:
        while args.parallel and len(procs) >= args.parallel:  # a slot frees when any job ends
            done = [p for p in procs if p.poll() is not None]
            codes += [p.returncode for p in done]
            procs = [p for p in procs if p not in done]
            if not done:
                time.sleep(2)
        cmd = [sys.executable, __file__, "job", "--pack", args.pack, "--work", str(work), "--fold", f, "--kind", k,
               "--epochs", str(args.epochs), "--budget-s", str(args.budget_s), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--max-train", str(args.max_train), "--net", args.net or "",
               "--mpp", str(args.mpp), "--seed", str(args.seed), "--train", args.train or ""]
        procs.append(subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)))
    codes += [p.wait() for p in procs]
    logf.flush()
    print(f"{len(jobs)} jobs finished in {time.time() - t0:.0f} s, exit codes {codes}", flush=True)
    collect_and_report(pack, work, out, args.max_train, note=args.note, name=args.name)


def collect(args: argparse.Namespace) -> None:
    """Score the jobs already in ``--work`` (e.g. run one by one in the background)."""
    from ghist_core.training.her2st import SpotPack

    collect_and_report(SpotPack.load(args.pack), Path(args.work), Path(args.out), args.max_train, note=args.note,
                       name=args.name)


def collect_and_report(pack, work: Path, out: Path, max_train: int = 0, note: str = "", name: str = "her2st") -> dict:
    """Ridge on every fold + the CNN predictions found in ``work`` → ``out/<name>.json``, maps, preds."""
    out.mkdir(parents=True, exist_ok=True)
    fl = folds(pack.section, pack.patient)
    y = pack.targets()
    preds: dict[str, np.ndarray] = {}
    for f, (tr, te) in fl.items():
        if f == "final":
            continue
        if max_train:
            tr = tr[:: max(1, len(tr) // max_train)]
            te = te[:max_train]
        preds[f"{f}__ridge"] = ridge_predictions(pack.features, y, tr, te).astype(np.float32)
        preds[f"{f}__index"] = te
        for k in ("ghist", "stnet"):
            p = work / f"{f}__{k}.npy"
            if p.exists():
                preds[f"{f}__{k}"] = np.load(p)
    metas = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
    np.savez_compressed(out / f"{name}_preds.npz", **preds)
    (out / f"{name}_jobs.json").write_text(json.dumps(metas))
    for fname in ("final.safetensors", "final.pt"):
        if (work / fname).exists():
            (out / f"ghist-her2st-{fname}").write_bytes((work / fname).read_bytes())
    return report_from(preds, pack, out, metas, note=note, name=name)


def report_from(preds: dict, pack, out: Path, metas: dict | None = None, earlier: dict | None = None,
                note: str = "", name: str = "her2st") -> dict:
    """Metrics JSON in the issue's format + spatial maps PNG."""
    y = pack.targets()
    n_hvg = int(pack.n_hvg)
    genes = [str(g) for g in pack.genes[:n_hvg]]
    kinds = {"model": "ghist", "stnet_like": "stnet", "ridge_features": "ridge"}
    res: dict = {"genes": genes}
    per_gene: dict = {}
    for split, unit_key in (("loso", "per_section"), ("lopo", "per_patient")):
        block: dict = {"model": None, "baselines": {}}
        for label, kind in kinds.items():
            units = {}
            for key in sorted(k for k in preds if k.startswith(f"{split}_") and k.endswith(f"__{kind}")):
                fold = key.split("__")[0]
                te = preds[f"{fold}__index"]
                r = pcc_per_gene(preds[key][:, :n_hvg].astype(np.float64), y[te][:, :n_hvg].astype(np.float64))
                units[fold.split("_", 1)[1]] = summarise(r)
                per_gene[f"{fold}__{kind}"] = r
            entry = {"mean_pcc": float(np.mean([u["mean_pcc"] for u in units.values()])) if units else None,
                     "top50_pcc": float(np.mean([u["top50_pcc"] for u in units.values()])) if units else None,
                     unit_key: units}
            if label == "model":
                block["model"] = entry
            else:
                block["baselines"][label] = entry
        res[split] = block
    res["protocol"] = {
        "target": "log1p(1e4 * counts / spot total over all genes)",
        "genes_rule": "250 HVGs: genes in all 36 HER2ST count matrices, detected in >=10% of spots of the 30 "
                      "sections without image, top variance of log1p(CP10k) over those spots (imaged sections unused)",
        "pcc": "Pearson r per gene over the held-out spots (LOPO C: all 5 sections pooled); constant gene = 0",
        **_input_texts(metas),
        "tta": "8 dihedral views averaged (both CNNs)",
        "ridge": "RidgeCV (GCV over 25 alphas 0.1..1e5) on 60 standardised colour/texture features",
        "sections": list(SECTIONS),
    }
    if metas:
        dev = sorted({m.get("device", "?") for m in metas.values()})
        res["protocol"]["device"] = dev
        res["protocol"]["train_seconds"] = {k: round(m["train_s"], 1) for k, m in metas.items()}
        res["protocol"]["epochs_done"] = {k: m["epochs_done"] for k, m in metas.items()}
    if earlier:
        runs = {}
        for split in ("loso", "lopo"):
            units = {}
            for key in sorted(k for k in earlier if k.startswith(f"{split}_")):
                fold = key.split("__")[0]
                r = pcc_per_gene(earlier[key][:, :n_hvg].astype(np.float64), y[preds[f"{fold}__index"]][:, :n_hvg].astype(np.float64))
                units[fold.split("_", 1)[1]] = summarise(r)
            runs[split] = {"mean_pcc": float(np.mean([u["mean_pcc"] for u in units.values()])), "per_unit": units}
        res["earlier_ghist_variant"] = runs
    if note:
        res["protocol"]["note"] = note
    from ghist_core.io.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(res, indent=1) + "\n")
    try:
        maps_png(preds, pack, out / f"{name}_maps.png", per_gene)
    except Exception as exc:  # the figure is a bonus; metrics must not be lost for it
        print(f"maps not drawn: {exc}", flush=True)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for split in ("loso", "lopo"):
        b = res[split]
        print(f"{split}: GHIST {fmt(b['model']['mean_pcc'])} | ST-Net-like {fmt(b['baselines']['stnet_like']['mean_pcc'])} "
              f"| ridge {fmt(b['baselines']['ridge_features']['mean_pcc'])}", flush=True)
    return res


def _input_texts(metas: dict | None) -> dict[str, str]:
    """How GHIST saw a spot and made its prediction, as its jobs recorded them (the card config)."""
    from ghist_core.model.network import GhistConfig

    cfg = GhistConfig.from_dict(next((m["config"] for m in (metas or {}).values() if "patch_px" in m.get("config", {})), {}))
    return {"model_spot_prediction": f"log1p({cfg.spot_aggregate} of predicted per-cell expression of nuclei with centre "
                                     f"within {cfg.spot_radius_um:g} um of the spot centre)",
            "patch": f"{cfg.patch_px} px at {cfg.mpp:g} um/px ({cfg.patch_px * cfg.mpp:g} um) centred on the spot",
            **({"model_cell_inputs": f"GHIST also reads per nucleus {', '.join(cfg.cell_inputs)}: the type probabilities "
                                     "of the bundled learned segmenter (weights/nuclei-seg, trained on CoNSeP + MoNuSeg, "
                                     "no HER2ST), as its cell table gives them"} if cfg.cell_inputs else {}),
            "model_reference": ("expression = type mixture of per-gene profiles (NNLS on the training spots) + residual"
                                if cfg.use_reference else "no reference anchor (use_reference=false)")}


def maps_png(preds: dict, pack, path: Path, per_gene: dict, section: str = "C3") -> None:
    """Measured vs predicted spatial maps of four genes for one held-out section (LOSO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fold = f"loso_{section}"
    if f"{fold}__ghist" not in preds:
        return
    te = preds[f"{fold}__index"]
    y = pack.targets()[te]
    genes = [str(g) for g in pack.genes]
    r = per_gene[f"{fold}__ghist"]
    chosen = [g for g in ("ERBB2", "GRB7") if g in genes[: len(r)]]
    for i in np.argsort(-r):
        if len(chosen) >= 4:
            break
        if genes[i] not in chosen:
            chosen.append(genes[i])
    xy = pack.array_xy[te]
    rows = [("measured", y), ("GHIST", preds[f"{fold}__ghist"])]
    if f"{fold}__stnet" in preds:
        rows.append(("ST-Net-like", preds[f"{fold}__stnet"]))
    fig, axes = plt.subplots(len(rows), len(chosen), figsize=(3.2 * len(chosen), 3.0 * len(rows)), squeeze=False)
    for j, g in enumerate(chosen):
        gi = genes.index(g)
        for i, (name, v) in enumerate(rows):
            ax = axes[i, j]
            col = v[:, gi]
            ax.scatter(xy[:, 0], -xy[:, 1], c=col, s=28, cmap="viridis", marker="h")
            ttl = f"{g} {name}"
            if name != "measured":
                ttl += f"\nr = {pcc_per_gene(col[:, None], y[:, gi:gi + 1])[0]:.2f}"
            ax.set_title(ttl, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    fig.suptitle(f"HER2ST section {section}, held out (leave-one-section-out); log1p CP10k", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    from ghist_core.training.her2st import SpotPack

    pack = SpotPack.load(args.pack)
    with np.load(args.preds, allow_pickle=False) as z:
        preds = {k: z[k] for k in z.files}
    metas = json.loads(Path(args.jobs).read_text()) if args.jobs and Path(args.jobs).exists() else None
    earlier = None
    if args.baselines_from:
        # the ST-Net-like baseline (and the earlier GHIST variant) of another run on the same pack and folds
        with np.load(args.baselines_from, allow_pickle=False) as z:
            other = {k: z[k] for k in z.files}
        for k, v in other.items():
            if k.endswith("__stnet"):
                fold = k.split("__")[0]
                assert np.array_equal(other[f"{fold}__index"], preds[f"{fold}__index"]), "different folds"
                preds[k] = v
        earlier = {k.replace("__ghist", "__ghist_earlier"): v for k, v in other.items() if k.endswith("__ghist")}
        if args.baselines_jobs and Path(args.baselines_jobs).exists():
            m2 = json.loads(Path(args.baselines_jobs).read_text())
            metas = {**(metas or {}), **{k: v for k, v in m2.items() if k.endswith("__stnet")},
                     **{k.replace("__ghist", "__ghist_earlier"): v for k, v in m2.items() if k.endswith("__ghist")}}
    report_from(preds, pack, Path(args.out), metas, earlier=earlier, note=args.note, name=args.name)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="HER2ST benchmark for GHIST")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pack = argparse.ArgumentParser(add_help=False)
    pack.add_argument("--pack", default=".gpu_data/her2st/pack.npz")
    results = argparse.ArgumentParser(add_help=False)  # every command that writes a results file
    results.add_argument("--out", default="bench/results")
    results.add_argument("--note", default="")
    results.add_argument("--name", default="her2st", help="results file stem in --out")
    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--work", default="/tmp/ghist_her2st_jobs")
    train.add_argument("--epochs", type=int, default=60)
    train.add_argument("--budget-s", type=float, default=300.0)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--max-train", type=int, default=0, help="subsample spots (smoke tests)")
    train.add_argument("--net", default="", help="JSON overrides of GhistConfig / encoder widths")
    train.add_argument("--mpp", type=float, default=0.0,
                       help="train both CNNs at this coarser µm/px (a multiple of the pack's; 0 = the pack's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train", default="", help="JSON overrides of TrainConfig (loss weights, augmentation)")
    p = sub.add_parser("run", parents=[pack, train, results])
    p.add_argument("--parallel", type=int, default=0, help="jobs at once (0 = all; a GPU shares well, a CPU not)")
    p.add_argument("--only", default="", help="comma-separated folds")
    p.add_argument("--kinds", default="ghist,stnet", help="which CNNs to train (ridge always runs)")
    p = sub.add_parser("job", parents=[pack, train])
    p.add_argument("--fold", required=True)
    p.add_argument("--kind", choices=("ghist", "stnet"), required=True)
    p = sub.add_parser("collect", parents=[pack, results], help="score the jobs already in --work")
    p.add_argument("--work", required=True)
    p.add_argument("--max-train", type=int, default=0)
    p = sub.add_parser("report", parents=[pack, results])
    p.add_argument("--preds", required=True)
    p.add_argument("--jobs", default="")
    p.add_argument("--baselines-from", default="", help="take the ST-Net-like predictions from this preds npz")
    p.add_argument("--baselines-jobs", default="", help="its jobs json")
    args = ap.parse_args(argv)
    {"run": run, "job": job, "collect": collect, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
