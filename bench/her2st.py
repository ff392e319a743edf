"""HER2ST benchmark under a clean protocol: GHIST vs floors with the same inputs, same folds.

    # 0. the spot pack, with the default segmenter's nucleus types (scripts/prepare_her2st.py)
    python scripts/prepare_her2st.py --segmenter nuclei-seg-stain --out .gpu_data/her2st/pack_stain.npz
    # 1. the CNN jobs, 3 seeds each (CPU: ~4-5 min a job, two at a time; ~50 + 40 min),
    #    into <work>/<kind>_s<seed>/; rerun the same command to resume
    python bench/her2st.py run --pack .gpu_data/her2st/pack_stain.npz --work tmp/her2st_cnn_stain \
        --mpp 1.0 --epochs 16 --budget-s 0 --parallel 2 --kinds ghist --seeds 0,1,2 \
        --net '{"spot_aggregate":"mean","tissue_skip":true,"fpn_smooth":false,"fpn_dim":64,"use_reference":false,
               "cell_inputs":["prob_other","prob_inflammatory","prob_epithelial","prob_spindle-shaped"],
               "density_prior":true,"image_dropout":0.5}'
    python bench/her2st.py run --pack .gpu_data/her2st/pack_stain.npz --work tmp/her2st_cnn_stain \
        --mpp 1.0 --epochs 16 --budget-s 0 --parallel 2 --kinds stnet --seeds 0,1,2 \
        --only loso_B4,loso_C2,loso_C3,loso_C4,loso_C5,loso_C6,lopo_C \
        --net '{"covariates":true,"cell_inputs":["prob_other","prob_inflammatory","prob_epithelial","prob_spindle-shaped"]}'
    # 2. the ridge floors (nested inner CV) + every CNN job found → bench/results/her2st.json
    python bench/her2st.py protocol --pack .gpu_data/her2st/pack_stain.npz \
        --ghist-work 'tmp/her2st_cnn_stain/ghist_s*' --stnet-work 'tmp/her2st_cnn_stain/stnet_s*'
    # 3. the bundled model from the jobs' final fits, then its cell-level checks (added to the JSON)
    python scripts/train_ghist.py --pack .gpu_data/her2st/pack_stain.npz --from-jobs 'tmp/her2st_cnn_stain/ghist_s*'
    python bench/her2st.py cells --pack .gpu_data/her2st/pack_stain.npz
    python bench/her2st.py swap --pack .gpu_data/her2st/pack_stain.npz --pack-b .gpu_data/her2st/pack.npz

``pack.npz`` there is the same pack with ``nuclei-seg``'s types (``--segmenter nuclei-seg``), the
segmenter of the model before session 10 (``her2st_nuclei_seg_types.json`` holds its protocol).

Splits over the six imaged sections (B4; C2–C6): leave-one-section-out (``loso``, 6 folds)
and leave-one-patient-out (``lopo``: train C → test B4; train B4 → test C2–C6). Per held-out
section/patient: Pearson r per gene over its spots (log1p CP10k, predicted vs measured;
a gene constant in the held-out spots counts as r = 0), mean over the 250 HVGs, mean of the
50 best, number with r > 0.3. ``mean_pcc`` of a split = average over held-out units.
Every method sees the same training spots of each fold and the same inputs (nucleus count and
type probabilities; colour for the ridges, pixels for the CNNs); both CNNs use the same encoder,
augmentation, epochs and 8-view test-time augmentation. The protocol's rules are stored with
the numbers (``"protocol"`` in the JSON).
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

from ghist_core.training.expression_metrics import pcc_per_gene  # noqa: E402
from ghist_core.training.her2st import PROTOCOL_PACK  # noqa: E402

#: where `run` trains the CNN jobs (<work>/<kind>_s<seed>; git-ignored) and `protocol` finds them
PROTOCOL_WORK = "tmp/her2st_cnn_stain"

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
        data = PatchData.from_pack(pack, te, images, mm, ms, tuple(res.config.get("cell_inputs", ())))
        if res.config.get("covariates"):
            from ghist_core.training.her2st import spot_covariates

            data.extras["covariates"] = torch.from_numpy(spot_covariates(pack, res.config["cell_inputs"])[0][te])
        data = data.to(dev)
        if args.kind == "ghist":
            pred, comp = predict_spots(res.model, data, batch_size=32, tta=True, types=True)
            np.save(out / f"{args.fold}__{args.kind}__types.npy", comp.astype(np.float32))
        else:
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


def plan_jobs(fold_names: list[str], work: Path, kinds: list[str], seeds: list[int],
              only: list[str] | None = None) -> list[tuple[int, str, str]]:
    """``(seed, fold, kind)`` jobs still to train, held-out folds of every seed first, final fits last.

    By default the folds the protocol scores (:data:`OUTER_UNITS`) and the final fit: LOPO B is
    LOSO B4 (the same training and test spots), scored once, so it is not trained twice. The
    ST-Net-like baseline has no final fit. A job whose result exists is skipped (resume).
    """
    wanted = only or [*OUTER_UNITS, "final"]
    jobs = [(sd, f, k) for f in wanted for sd in seeds for k in kinds
            if f in fold_names and not (f == "final" and k == "stnet")
            and not (work / f"{k}_s{sd}" / f"{f}__{k}.json").exists()]
    return sorted(jobs, key=lambda j: (j[1] == "final", j[0]))


def run(args: argparse.Namespace) -> None:
    """Train the CNN jobs (fold × kind × seed) a few at a time; each seed's jobs go to
    ``<work>/<kind>_s<seed>/`` and a job whose result exists is skipped, so a rerun resumes.
    The jobs' log is ``<work>/run_log.txt``."""
    from ghist_core.training.her2st import SpotPack

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pack = SpotPack.load(args.pack)
    jobs = plan_jobs(list(folds(pack.section, pack.patient)), work, args.kinds.split(","),
                     [int(x) for x in str(args.seeds).split(",")], args.only.split(",") if args.only else None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    procs: list[subprocess.Popen] = []
    codes: list[int] = []
    logf = open(work / "run_log.txt", "a")
    for sd, f, k in jobs:
        while args.parallel and len(procs) >= args.parallel:  # a slot frees when any job ends
            done = [p for p in procs if p.poll() is not None]
            codes += [p.returncode for p in done]
            procs = [p for p in procs if p not in done]
            if not done:
                time.sleep(2)
        cmd = [sys.executable, __file__, "job", "--pack", args.pack, "--work", str(work / f"{k}_s{sd}"), "--fold", f,
               "--kind", k, "--epochs", str(args.epochs), "--budget-s", str(args.budget_s), "--batch-size",
               str(args.batch_size), "--lr", str(args.lr), "--max-train", str(args.max_train), "--net", args.net or "",
               "--mpp", str(args.mpp), "--seed", str(sd), "--train", args.train or ""]
        procs.append(subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)))
    codes += [p.wait() for p in procs]
    logf.flush()
    print(f"{len(jobs)} jobs finished in {time.time() - t0:.0f} s, exit codes {codes}; score them with "
          f"`python bench/her2st.py protocol`", flush=True)


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


# --------------------------------------------------------------------------------------------
# the clean protocol (issue #17): nested choices, floors with the model's inputs, seeds, paired tests
# --------------------------------------------------------------------------------------------
#: outer folds → held-out unit; LOPO B (train C, test B4) *is* LOSO B4, scored once and reported under both
OUTER_UNITS = {**{f"loso_{s}": s for s in SECTIONS}, "lopo_C": "C"}
OUTER_UNITS_FOLD = {u: f for f, u in OUTER_UNITS.items()}
SPLIT_UNITS = {"loso": {s: f"loso_{s}" for s in SECTIONS}, "lopo": {"B": "loso_B4", "C": "lopo_C"}}
FLOORS = ("ridge_count", "ridge_count_types", "ridge_count_types_colour")
PROGRAM_KS = (5, 10, 20, 40)
GOALS = {"loso_mean_pcc": 0.25, "lopo_mean_pcc": 0.20, "ahead_of_floor_by": 0.03, "wilcoxon_p": 0.01,
         "pc1_share_within": 0.15, "partial_pcc_mean": 0.05}


def _cnn_runs(pattern: str) -> dict[int, Path]:
    """``seed -> work dir`` for the job folders matching ``pattern`` (``.../<kind>_s<seed>``)."""
    import glob

    out = {}
    for d in sorted(glob.glob(pattern)):
        tail = Path(d).name.rsplit("_s", 1)
        if len(tail) == 2 and tail[1].isdigit() and Path(d).is_dir():
            out[int(tail[1])] = Path(d)
    return out


def _unit_entry(r: np.ndarray, hvg: np.ndarray, top50: np.ndarray, genes: list[str], extra: dict | None = None) -> dict:
    return {"mean_pcc": float(r[hvg].mean()), "top50_pcc": float(r[top50].mean()),
            "n_genes_r_gt_0.3": int((r[hvg] > 0.3).sum()),
            "per_gene": {g: round(float(v), 4) for g, v in zip(genes, r)}, **(extra or {})}


def protocol(args: argparse.Namespace) -> dict:
    """Score every method on every held-out unit under the frozen protocol → ``<out>/<name>.json``."""
    from ghist_core.paths import shared_data_dir
    from ghist_core.training.expression_metrics import paired_wilcoxon, specificity
    from ghist_core.training.her2st import CLINICAL_MARKERS, SpotPack, imageless_log_expression, spot_covariates
    from ghist_core.training.spot_baselines import ALPHAS, RidgeSpec, choose, fit_predict, gene_programs, inner_folds, inner_scores

    t0 = time.time()
    pack = SpotPack.load(args.pack)
    y = pack.targets().astype(np.float64)
    genes = [str(g) for g in pack.genes]
    n_hvg = int(pack.n_hvg)
    hvg = np.arange(n_hvg)
    cell_inputs = [str(c) for c in (pack.cell_input_names if pack.cell_input_names is not None else [])]
    cov, cov_names = spot_covariates(pack, cell_inputs)
    x = np.column_stack([cov, pack.features]).astype(np.float64)
    n_cov = cov.shape[1]
    count_col, type_cols, all_cols = (0,), tuple(range(n_cov)), tuple(range(x.shape[1]))
    basis = gene_programs(imageless_log_expression(Path(args.data or shared_data_dir()) / "her2st", genes), max(PROGRAM_KS))
    families = {"ridge_count": RidgeSpec("ridge_count", count_col), "ridge_count_types": RidgeSpec("ridge_count_types", type_cols),
                "ridge_count_types_colour": RidgeSpec("ridge_count_types_colour", all_cols),
                **{f"programs_k{k}": RidgeSpec(f"programs_k{k}", all_cols, programs=k) for k in PROGRAM_KS}}
    fl = folds(pack.section, pack.patient)
    ghist_runs = _cnn_runs(args.ghist_work)
    stnet_runs = _cnn_runs(args.stnet_work)
    markers = [g for g in CLINICAL_MARKERS if g in genes]
    r_of: dict[str, dict[str, np.ndarray]] = {}  # method -> unit -> r (all genes)
    pred_of: dict[str, dict[str, np.ndarray]] = {}  # method -> unit -> prediction (seed mean for CNNs)
    seed_r: dict[str, dict[str, dict[int, np.ndarray]]] = {"model": {}, "stnet_like": {}}
    types_of: dict[str, dict[str, np.ndarray]] = {}
    fold_info: dict[str, dict] = {}
    preds_npz: dict[str, np.ndarray] = {}
    for fold, unit in OUTER_UNITS.items():
        tr, te = fl[fold]
        inner = inner_folds(tr, pack.section, pack.array_xy)
        grid = [f.with_(alpha=a) for f in families.values() for a in ALPHAS]
        res = inner_scores(grid, x, y, inner, hvg, basis)
        best = {name: choose(res, [g for g in grid if g.name == name]) for name in families}
        floor = choose(res, [best[n] for n in FLOORS])
        programs = choose(res, [best[n] for n in families if n.startswith("programs_")])
        top50 = np.argsort(-res.per_gene[floor][hvg], kind="stable")[:50]  # training data only
        fold_info[unit] = {"fold": fold, "n_train": int(len(tr)), "n_test": int(len(te)), "inner_folds": len(inner),
                           "inner": "leave one training section out" if len(set(pack.section[tr])) > 1
                                    else "2x2 spatial blocks of the training section",
                           "floor": f"{floor.name} (alpha {floor.alpha:g})", "programs": f"{programs.name} (alpha {programs.alpha:g})",
                           "inner_scores": {n: round(res.score[b], 4) for n, b in best.items()},
                           "top50_genes": [genes[i] for i in top50]}
        for name, spec in [*((n, best[n]) for n in FLOORS), ("floor", floor), ("programs_ridge", programs)]:
            p = fit_predict(spec, x, y, tr, te, basis)
            pred_of.setdefault(name, {})[unit] = p
            r_of.setdefault(name, {})[unit] = pcc_per_gene(p, y[te])
        p = ridge_predictions(pack.features, y, tr, te)
        pred_of.setdefault("ridge_features", {})[unit] = p
        r_of.setdefault("ridge_features", {})[unit] = pcc_per_gene(p, y[te])
        for label, runs, kind in (("model", ghist_runs, "ghist"), ("stnet_like", stnet_runs, "stnet")):
            ps = {sd: np.load(d / f"{fold}__{kind}.npy").astype(np.float64) for sd, d in runs.items()
                  if (d / f"{fold}__{kind}.npy").exists()}
            if not ps:
                continue
            for sd, pv in ps.items():
                seed_r[label].setdefault(unit, {})[sd] = pcc_per_gene(pv, y[te])
                preds_npz[f"{fold}__{kind}__s{sd}"] = pv.astype(np.float32)
            pred_of.setdefault(label, {})[unit] = np.mean(list(ps.values()), 0)
            r_of.setdefault(label, {})[unit] = np.mean(list(seed_r[label][unit].values()), 0)  # mean over seeds of r
            if kind == "ghist":
                ts = [np.load(d / f"{fold}__ghist__types.npy") for d in runs.values() if (d / f"{fold}__ghist__types.npy").exists()]
                if ts:
                    types_of.setdefault("model", {})[unit] = np.mean(ts, 0)
        # type composition baselines: ridge on the count / count + types → the deconvolution fractions
        fr = pack.fractions.astype(np.float64)
        all_types = np.arange(fr.shape[1])
        tres = inner_scores([RidgeSpec(n, c, alpha=a) for n, c in (("count", count_col), ("count_types", type_cols)) for a in ALPHAS],
                            x, fr, inner, all_types)
        for n in ("count", "count_types"):
            spec = choose(tres, [s for s in tres.score if s.name == n])
            types_of.setdefault(f"ridge_{n}", {})[unit] = fit_predict(spec, x, fr, tr, te)
        preds_npz[f"{fold}__index"] = te
        fold_info[unit]["top50_idx"] = top50
        print(f"{fold}: floor {fold_info[unit]['floor']}, programs {fold_info[unit]['programs']} "
              f"({time.time() - t0:.0f} s)", flush=True)

    out: dict = {"genes": genes[:n_hvg], "markers_scored": markers}
    for split, units in SPLIT_UNITS.items():
        unit_of = {u: OUTER_UNITS[f] for u, f in units.items()}  # split unit -> scored unit

        def entry(method: str, _unit_of=unit_of) -> dict | None:
            have = {u: su for u, su in _unit_of.items() if su in r_of.get(method, {})}
            if not have:
                return None
            per_unit = {}
            for u, su in have.items():
                extra = {}
                if method in seed_r:
                    extra["per_seed_mean_pcc"] = {str(sd): float(r[hvg].mean()) for sd, r in sorted(seed_r[method][su].items())}
                if su != u:
                    extra["same_fold_as"] = f"loso/{su}"
                per_unit[u] = _unit_entry(r_of[method][su], hvg, fold_info[su]["top50_idx"], genes, extra)
            e = {"mean_pcc": float(np.mean([v["mean_pcc"] for v in per_unit.values()])),
                 "top50_pcc": float(np.mean([v["top50_pcc"] for v in per_unit.values()])),
                 "complete": len(have) == len(_unit_of), "per_unit": per_unit,
                 "markers": {g: {u: per_unit[u]["per_gene"][g] for u in per_unit} for g in markers}}
            if method in seed_r:
                seeds = sorted(set.intersection(*(set(seed_r[method][su]) for su in have.values())))
                e["seeds"] = [float(np.mean([seed_r[method][su][sd][hvg].mean() for su in have.values()])) for sd in seeds]
                e["seed_ids"] = seeds
            return e

        block: dict = {"model": entry("model"), "floor": entry("floor"), "baselines": {}}
        if block["floor"] is not None:
            block["floor"]["chosen"] = {u: fold_info[su]["floor"] for u, su in unit_of.items()}
        for b in (*FLOORS, "programs_ridge", "stnet_like", "ridge_features"):
            e = entry(b)
            if e is not None:
                if b == "programs_ridge":
                    e["chosen"] = {u: fold_info[su]["programs"] for u, su in unit_of.items()}
                block["baselines"][b] = e
        mean_r = lambda m: np.mean([r_of[m][su] for su in unit_of.values() if su in r_of.get(m, {})], 0)  # noqa: E731
        if block["model"] is not None and block["model"]["complete"]:
            test = paired_wilcoxon(mean_r("model")[hvg], mean_r("floor")[hvg])
            block["wilcoxon_p_vs_floor"] = test.p_value
            block["paired_vs_floor"] = test.to_dict()
            block["paired_vs_baselines"] = {b: paired_wilcoxon(mean_r("model")[hvg], mean_r(b)[hvg]).to_dict()
                                            for b in block["baselines"] if all(su in r_of[b] for su in unit_of.values())}
        spec_units: dict = {}
        for m in ("model", "floor", "stnet_like", "programs_ridge"):
            for u, su in unit_of.items():
                if su in pred_of.get(m, {}):
                    te = fl[OUTER_UNITS_FOLD[su]][1]
                    spec_units.setdefault(m, {})[u] = specificity(pred_of[m][su][:, hvg], y[te][:, hvg], cov[te, 0])
        block["specificity"] = {}
        for m, per in spec_units.items():
            avg = {k: float(np.nanmean([v[k] for v in per.values()])) for k in next(iter(per.values()))}
            avg["per_unit"] = per
            if m == "model":
                block["specificity"].update(avg)
            else:
                block["specificity"].setdefault("baselines", {})[m] = avg
        out[split] = block
        # the older keys, kept: per_section / per_patient summaries
        key = "per_section" if split == "loso" else "per_patient"
        for e in [block["model"], block["floor"], *block["baselines"].values()]:
            if e is not None:
                e[key] = {u: {k: v[k] for k in ("mean_pcc", "top50_pcc", "n_genes_r_gt_0.3")} for u, v in e["per_unit"].items()}

    out["types"] = type_agreement(types_of, pack, fl, [str(t) for t in pack.cell_types])
    out["goals"] = goals(out, markers=("ERBB2", "GRB7"))
    out["folds"] = {u: {k: v for k, v in i.items() if k != "top50_idx"} for u, i in fold_info.items()}
    out["protocol"] = protocol_text(args, ghist_runs, stnet_runs, cov_names)
    out["protocol"]["pack"] = {"path": str(args.pack), "cell_input_segmenter": pack.cell_input_segmenter,
                               "n_spots": int(pack.n_spots)}
    from ghist_core.io.atomic import atomic_write_text

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(outdir / f"{args.name}.json", json.dumps(out, indent=1, allow_nan=False) + "\n")
    np.savez_compressed(outdir / f"{args.name}_preds.npz", **preds_npz)
    try:  # measured vs predicted maps of a held-out section (seed 0 of each CNN)
        mp = {k.rsplit("__s", 1)[0]: v for k, v in preds_npz.items() if k.endswith("__s0")}
        mp.update({k: v for k, v in preds_npz.items() if k.endswith("__index")})
        maps_png(mp, pack, outdir / f"{args.name}_maps.png",
                 {f"{f}__ghist": seed_r["model"][u][0] for f, u in OUTER_UNITS.items() if 0 in seed_r["model"].get(u, {})})
    except Exception as exc:  # the figure is a bonus; the metrics are written already
        print(f"maps not drawn: {exc}", flush=True)
    print(f"wrote {outdir / (args.name + '.json')} ({time.time() - t0:.0f} s)", flush=True)
    for split in SPLIT_UNITS:
        b = out[split]
        f = lambda e: "pending" if e is None else f"{e['mean_pcc']:.3f}"  # noqa: E731
        print(f"{split}: model {f(b['model'])} | floor {f(b['floor'])} | "
              + " | ".join(f"{k} {f(v)}" for k, v in b["baselines"].items()), flush=True)
    return out


def type_agreement(types_of: dict, pack, fl: dict, type_names: list[str]) -> dict:
    """Held-out per-spot agreement of predicted type composition with the deconvolution target."""
    res: dict = {"target": "NNLS fractions of each spot against the GHIST demo Xenium reference (the training target)",
                 "metric": "Pearson r over the held-out spots per type, then mean over types; mean absolute error"}
    for m, per in types_of.items():
        units = {}
        for u, p in per.items():
            te = fl[OUTER_UNITS_FOLD[u]][1]
            t = pack.fractions[te].astype(np.float64)
            r = pcc_per_gene(p, t)
            units[u] = {"mean_pcc": float(r.mean()), "mae": float(np.abs(p - t).mean()),
                        "per_type": {n: round(float(v), 4) for n, v in zip(type_names, r)}}
        res[m] = {"mean_pcc": float(np.mean([v["mean_pcc"] for v in units.values()])),
                  "mae": float(np.mean([v["mae"] for v in units.values()])), "per_unit": units}
    return res


def goals(out: dict, markers: tuple[str, ...]) -> dict:
    """Each goal of the issue, its measured value and whether it is met (None while pending)."""
    g: dict = {}
    for split, target in (("loso", GOALS["loso_mean_pcc"]), ("lopo", GOALS["lopo_mean_pcc"])):
        b = out[split]
        m, f = b["model"], b["floor"]
        g[f"{split}_mean_pcc_ge_{target}"] = {"value": None if m is None else m["mean_pcc"],
                                              "met": None if m is None else m["mean_pcc"] >= target}
        if m is not None and "paired_vs_floor" in b:
            d = b["paired_vs_floor"]
            g[f"{split}_ahead_of_floor_by_{GOALS['ahead_of_floor_by']}_p_lt_{GOALS['wilcoxon_p']}"] = {
                "value": {"mean_diff": d["mean_diff"], "p": d["p_value"]},
                "met": d["mean_diff"] >= GOALS["ahead_of_floor_by"] and d["p_value"] < GOALS["wilcoxon_p"]}
            for gene in markers:
                if gene in m["markers"]:
                    diffs = {u: m["markers"][gene][u] - f["markers"][gene][u] for u in m["markers"][gene]}
                    g[f"{split}_{gene}_ahead_of_floor_every_unit"] = {"value": diffs, "met": all(v > 0 for v in diffs.values())}
        s = b.get("specificity", {})
        if "pc1_share_pred" in s:
            gap = abs(s["pc1_share_pred"] - s["pc1_share_measured"])
            g[f"{split}_pc1_share_within_{GOALS['pc1_share_within']}"] = {"value": {"pred": s["pc1_share_pred"],
                                                                                  "measured": s["pc1_share_measured"]},
                                                                        "met": gap <= GOALS["pc1_share_within"]}
            g[f"{split}_partial_pcc_mean_ge_{GOALS['partial_pcc_mean']}"] = {"value": s["partial_pcc_mean"],
                                                                           "met": s["partial_pcc_mean"] >= GOALS["partial_pcc_mean"]}
    return g


def protocol_text(args, ghist_runs: dict, stnet_runs: dict, cov_names: list[str]) -> dict:
    """What was done, in words, stored with the numbers."""
    return {
        "frozen": "Protocol written and fixed before any result of this run was seen (session 7). The GHIST CNN design "
                  "(session 4's config) was frozen before this run and not changed after it; note that in session 4 it "
                  "was tuned looking at LOPO B = LOSO B4, so B4 is not a clean unit for the model (every other unit is).",
        "target": "log1p(1e4 * counts / spot total over all genes)",
        "genes_rule": "250 HVGs: genes in all 36 HER2ST count matrices, detected in >=10% of spots of the 30 sections "
                      "without image, top variance of log1p(CP10k) over those spots (imaged sections unused)",
        "pcc": "Pearson r per gene over the held-out spots of a unit (LOPO C: C2-C6 pooled); constant gene = 0; "
               "mean_pcc = mean over the 250 HVGs, then over units",
        "units": "LOSO: B4, C2..C6 (train on the other 5). LOPO: B (train C2-C6, test B4: the same fold as LOSO B4, "
                 "scored once and reported under both) and C (train B4, test C2-C6)",
        "inner_cv": "every choice (ridge alpha from 13 values 0.1..1e5, which floor, how many gene programs) by inner "
                    "cross-validation on the training spots only: leave one training section out; for LOPO C (one "
                    "training section) its 2x2 spatial blocks. Score = mean r over the 250 HVGs, mean over inner folds",
        "inputs": f"the model reads pixels, nucleus masks and per nucleus {', '.join(cov_names[1:]) or 'nothing else'}; "
                  f"the floors read per spot {', '.join(cov_names)} (nuclei within 50 um of the spot centre) and "
                  "60 colour/texture features (RGB, HED, GLCM, LBP, gradient)",
        "floor": "ridge on log count | + mean type probabilities | + colour/texture; the per-fold best by inner CV",
        "programs_ridge": "ridge on count + types + colour predicting the scores of k gene programs (principal axes of "
                          "log1p CP10k over the 30 sections without image), k in 5/10/20/40 by inner CV",
        "stnet_like": "ST-Net-style patch CNN (the same encoder, epochs, augmentation, 8-view TTA) that also reads the "
                      "floors' count and mean type probabilities next to its pooled image feature",
        "ridge_features": "RidgeCV (GCV) on the 60 colour/texture features only (the earlier baseline)",
        "seeds": {"model": sorted(ghist_runs), "stnet_like": sorted(stnet_runs)},
        "cnn_training": "CPU, 1 um/px (128 px = 128 um), 16 epochs, batch 32, lr 2e-3, two single-thread jobs at a time; "
                        "model per-gene r = mean over seeds of the per-seed r (not a seed ensemble)",
        "top50": "per fold, the 50 HVGs with the highest inner-CV r of that fold's floor (training data only); "
                 "every method is scored on the same 50",
        "paired_test": "two-sided Wilcoxon signed-rank over the 250 HVGs of (model r - floor r), r averaged over the "
                       "split's units; 'ahead' only where p < 0.01 and the mean difference is positive",
        "specificity": "per held-out unit: PC1 share of variance of predicted vs measured log expression over spots "
                       "(250 HVGs, centred); r between predicted and measured gene-gene correlation matrices; mean "
                       "partial r per gene after regressing log1p(nuclei in spot) out of both",
        "command": "the CNN jobs: bench/her2st.py job per fold x seed, the jobs `bench/her2st.py run --seeds 0,1,2` "
                   "starts (both commands in bench/her2st.py's docstring); then "
                   f"python bench/her2st.py protocol --pack {args.pack} --ghist-work '{args.ghist_work}' "
                   f"--stnet-work '{args.stnet_work}'",
    }


# --------------------------------------------------------------------------------------------
# cell level: what the app's maps look like, and whether the type calls make sense
# --------------------------------------------------------------------------------------------
#: the bundled learned segmenter's CoNSeP classes each reference type should fall in
TYPE_GROUPS = {"inflammatory": ("B", "T", "Plasma", "Myeloid", "Macrophage"), "epithelial": ("Malignant", "Epithelial"),
               "spindle-shaped": ("Fibroblast", "Endothelial")}


def cell_outputs(net, pack, images: np.ndarray, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every pack nucleus through ``net`` (no TTA): log1p expression, type probabilities and the
    pack cell index of each output row (nuclei lost to coarsening are absent)."""
    import torch

    from ghist_core.training.ghist import PatchData

    cfg = net.cfg
    factor = int(round(cfg.mpp / pack.mpp))
    cpack, cimg = pack.coarsened(images, factor)
    mm = np.zeros(cpack.cell_morph.shape[1], np.float32)
    data = PatchData.from_pack(cpack, np.arange(cpack.n_spots), cimg, mm, np.ones_like(mm), tuple(cfg.cell_inputs))
    n_lab = int(pack.instances.max()) + 1
    key_to_cell = np.full(pack.n_spots * n_lab, -1, np.int64)
    key_to_cell[pack.cell_spot.astype(np.int64) * n_lab + pack.cell_label] = np.arange(len(pack.cell_spot))
    expr, prob, cell = [], [], []
    net.eval()
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            lut = data.lut_inputs[s:s + batch_size] if data.lut_inputs is not None else None
            o = net(data.images[s:s + batch_size].float() / 255.0, data.instances[s:s + batch_size], lut)
            expr.append(torch.log1p(o["expr"]).numpy())
            prob.append(o["type_prob"].numpy())
            cell.append(key_to_cell[(s + o["cell_batch"].numpy()).astype(np.int64) * n_lab + o["cell_label"].numpy()])
    return {"log_expr": np.concatenate(expr), "type_prob": np.concatenate(prob), "cell": np.concatenate(cell)}


def _add_block(args: argparse.Namespace, key: str, value: dict) -> None:
    """Add (or replace) one block of the results file ``<out>/<name>.json`` a protocol run wrote."""
    from ghist_core.io.atomic import atomic_write_text

    path = Path(args.out) / f"{args.name}.json"
    out = json.loads(path.read_text())
    out[key] = value
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")


def _require_training_pack(pack, card, path) -> None:
    """Refuse a pack whose nucleus types come from another segmenter than the model was trained on."""
    from ghist_core.training.her2st import PackSegmenterError

    try:
        pack.require_segmenter((card or {}).get("segmenter"), path=path, wanted_by="the model was trained on")
    except PackSegmenterError as e:
        raise SystemExit(str(e)) from None


def cells(args: argparse.Namespace) -> dict:
    """Cell-level checks of a packaged model on the pack's nuclei → added to ``<out>/<name>.json``."""
    from ghist_core.model.predict import load_ghist
    from ghist_core.training.expression_metrics import pc1_share
    from ghist_core.training.her2st import SpotPack

    pack = SpotPack.load(args.pack)
    model = load_ghist(path=args.weights, device="cpu")
    _require_training_pack(pack, model.card, args.pack)
    net = model.net
    o = cell_outputs(net, pack, pack.images())
    n_hvg = int(pack.n_hvg)
    sec = pack.section[pack.cell_spot[o["cell"]]]
    targets = pack.targets()
    y = targets[:, :n_hvg]
    per_section = {}
    for s in SECTIONS:
        m = sec == s
        per_section[s] = {"n_cells": int(m.sum()), "pc1_share_cells_pred": pc1_share(o["log_expr"][m][:, :n_hvg]),
                          "pc1_share_spots_measured": pc1_share(y[pack.section == s])}
    genes = [str(g) for g in pack.genes]
    corr = {}
    for a, b in (("ERBB2", "COL1A1"), ("ERBB2", "MKI67"), ("ERBB2", "ESR1"), ("ERBB2", "GRB7")):
        if a in genes and b in genes:
            ia, ib = genes.index(a), genes.index(b)
            m = sec == "B4"
            corr[f"{a}~{b}"] = {"cells_pred_B4": float(np.corrcoef(o["log_expr"][m, ia], o["log_expr"][m, ib])[0, 1]),
                                "spots_measured_B4": float(np.corrcoef(targets[pack.section == "B4", ia],
                                                                       targets[pack.section == "B4", ib])[0, 1])}
    # type calls against the segmenter's CoNSeP classes (which the model also reads: agreement is partly by design)
    names = [str(t) for t in model.cell_types]
    seg_names = [str(n).removeprefix("prob_") for n in pack.cell_input_names]
    pred_t = o["type_prob"].argmax(1)
    seg_t = pack.cell_inputs[o["cell"]].argmax(1)
    table = np.zeros((len(names), len(seg_names)), np.int64)
    np.add.at(table, (pred_t, seg_t), 1)
    group_of_type = {t: g for g, ts in TYPE_GROUPS.items() for t in ts}
    scored = table[:, [seg_names.index(g) for g in TYPE_GROUPS]]
    agree = sum(table[names.index(t), seg_names.index(g)] for t, g in group_of_type.items() if t in names)
    total = int(scored.sum())
    row_share = {g: sum(scored[names.index(t)].sum() for t in ts if t in names) / max(total, 1) for g, ts in TYPE_GROUPS.items()}
    col_share = {g: scored[:, list(TYPE_GROUPS).index(g)].sum() / max(total, 1) for g in TYPE_GROUPS}
    res = {"weights": str(args.weights), "weights_sha256": model.weights_sha256, "n_cells": int(len(o["cell"])),
           "note": "the packaged model over every pack nucleus (all 6 sections, which it was trained on: a check of what "
                   "its maps look like, not a held-out score); no TTA",
           "per_section": per_section,
           "pc1_share_cells_pred_mean": float(np.mean([v["pc1_share_cells_pred"] for v in per_section.values()])),
           "pc1_share_spots_measured_mean": float(np.mean([v["pc1_share_spots_measured"] for v in per_section.values()])),
           "gene_pairs": corr,
           "type_confusion": {"rows_predicted_type": names, "cols_segmenter_class": seg_names, "counts": table.tolist(),
                              "expected": {g: list(ts) for g, ts in TYPE_GROUPS.items()},
                              "agreement": agree / max(total, 1), "chance_agreement": float(sum(row_share[g] * col_share[g] for g in TYPE_GROUPS)),
                              "n_cells_scored": total,
                              "note": "cells whose segmenter class is 'other' are not scored; the model reads the "
                                      "segmenter's class probabilities as inputs, so agreement is partly by construction"}}
    _add_block(args, "cell_level", res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("per_section", "type_confusion")}, indent=1))
    print(f"type agreement {res['type_confusion']['agreement']:.3f} (chance {res['type_confusion']['chance_agreement']:.3f})")
    return res


def segmenter_swap(args: argparse.Namespace) -> dict:
    """What a packaged model's outputs do when its nucleus-type inputs come from another segmenter.

    ``--pack`` and ``--pack-b`` hold the same spots and nuclei; only ``cell_inputs`` differ
    (``prepare_her2st.py --cell-inputs-only --segmenter …`` on a copy). Per gene, the correlation
    across cells and across spots between the two predictions, and each prediction's r with the
    measured spots (in sample: the packaged model was trained on these spots) → ``"segmenter_swap"``.
    """
    from ghist_core.model.predict import load_ghist
    from ghist_core.training.expression_metrics import pcc_per_gene
    from ghist_core.training.her2st import SpotPack, spot_means

    pack_a, pack_b = SpotPack.load(args.pack), SpotPack.load(args.pack_b)
    if not (np.array_equal(pack_a.cell_spot, pack_b.cell_spot) and np.array_equal(pack_a.cell_label, pack_b.cell_label)):
        raise SystemExit("the two packs do not hold the same nuclei: build --pack-b with --cell-inputs-only on a copy")
    model = load_ghist(path=args.weights, device="cpu")
    _require_training_pack(pack_a, model.card, args.pack)
    images = pack_a.images()
    oa, ob = cell_outputs(model.net, pack_a, images), cell_outputs(model.net, pack_b, images)
    if not np.array_equal(oa["cell"], ob["cell"]):
        raise SystemExit("the two runs returned different nuclei; they must be the same to compare them")
    n_hvg = int(pack_a.n_hvg)
    la, lb = oa["log_expr"][:, :n_hvg], ob["log_expr"][:, :n_hvg]
    spot = pack_a.cell_spot[oa["cell"]]
    inside = pack_a.cell_in_spot[oa["cell"]]

    sa, sb = (spot_means(spot[inside], np.expm1(x[inside]), pack_a.n_spots) for x in (la, lb))
    has = np.bincount(spot[inside], minlength=pack_a.n_spots) > 0
    y = pack_a.targets()[:, :n_hvg]
    ia, ib = pack_a.cell_inputs[oa["cell"]], pack_b.cell_inputs[oa["cell"]]
    res = {"weights": str(args.weights), "weights_sha256": model.weights_sha256,
           "pack_a": str(args.pack), "pack_b": str(args.pack_b), "n_cells": int(len(spot)),
           "note": "same nuclei (classical segmenter); only the learned segmenter that gives each nucleus' type "
                   "probabilities differs. In sample: the packaged model was trained on these spots with pack_a's "
                   "inputs, so r with measured is not a held-out score, only a like-for-like comparison",
           "type_inputs": {"argmax_agreement": float((ia.argmax(1) == ib.argmax(1)).mean()),
                           "mean_abs_diff": float(np.abs(ia - ib).mean())},
           "type_calls_agreement": float((oa["type_prob"].argmax(1) == ob["type_prob"].argmax(1)).mean()),
           "cells_gene_r_a_vs_b_mean": float(np.nanmean(pcc_per_gene(la, lb))),
           "spots_gene_r_a_vs_b_mean": float(np.nanmean(pcc_per_gene(np.log1p(sa[has]), np.log1p(sb[has])))),
           "spots_r_with_measured_mean": {
               "a": float(np.nanmean(pcc_per_gene(np.log1p(sa[has]), y[has]))),
               "b": float(np.nanmean(pcc_per_gene(np.log1p(sb[has]), y[has])))}}
    _add_block(args, "segmenter_swap", res)
    print(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="HER2ST benchmark for GHIST")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pack = argparse.ArgumentParser(add_help=False)
    pack.add_argument("--pack", default=PROTOCOL_PACK)
    results = argparse.ArgumentParser(add_help=False)  # every command that writes a results file
    results.add_argument("--out", default="bench/results")
    results.add_argument("--name", default="her2st", help="results file stem in --out")
    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--work", default=PROTOCOL_WORK)
    train.add_argument("--epochs", type=int, default=60)
    train.add_argument("--budget-s", type=float, default=300.0)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--max-train", type=int, default=0, help="subsample spots (smoke tests)")
    train.add_argument("--net", default="", help="JSON overrides of GhistConfig / encoder widths")
    train.add_argument("--mpp", type=float, default=0.0,
                       help="train both CNNs at this coarser µm/px (a multiple of the pack's; 0 = the pack's)")
    train.add_argument("--seed", type=int, default=0, help="(job) the seed of this job")
    train.add_argument("--train", default="", help="JSON overrides of TrainConfig (loss weights, augmentation)")
    p = sub.add_parser("run", parents=[pack, train, results])
    p.add_argument("--parallel", type=int, default=0, help="jobs at once (0 = all; a GPU shares well, a CPU not)")
    p.add_argument("--only", default="", help="comma-separated folds")
    p.add_argument("--kinds", default="ghist", help="which CNNs to train: ghist, stnet")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each seed's jobs in <work>/<kind>_s<seed>")
    p = sub.add_parser("job", parents=[pack, train])
    p.add_argument("--fold", required=True)
    p.add_argument("--kind", choices=("ghist", "stnet"), required=True)
    p = sub.add_parser("protocol", parents=[pack, results], help="the clean protocol over ridge floors and CNN jobs")
    p.add_argument("--data", default="", help="shared data folder (the 30 sections without image); default: ghist_core.paths")
    p.add_argument("--ghist-work", default=f"{PROTOCOL_WORK}/ghist_s*")
    p.add_argument("--stnet-work", default=f"{PROTOCOL_WORK}/stnet_s*")
    p = sub.add_parser("cells", parents=[pack, results], help="cell-level checks of a packaged model (adds to the JSON)")
    p.add_argument("--weights", default="weights/ghist-her2st.safetensors")
    p = sub.add_parser("swap", parents=[pack, results],
                       help="a packaged model with nucleus-type inputs from another segmenter (adds to the JSON)")
    p.add_argument("--pack-b", required=True, help="a copy of --pack whose cell_inputs come from the other segmenter")
    p.add_argument("--weights", default="weights/ghist-her2st.safetensors")
    args = ap.parse_args(argv)
    {"run": run, "job": job, "protocol": protocol, "cells": cells, "swap": segmenter_swap}[args.cmd](args)


if __name__ == "__main__":
    main()
