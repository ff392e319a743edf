"""Package a segmentation training run as a bundled model: ``weights/<name>.safetensors`` + sealed card.

The card keeps the base model's data and history, adds every run of the chain (its command
rebuilt from the run's own ``train_config``), the augmentation and stain bank it was trained
with, and its validation scores; with ``--bench`` also its rows of
``bench/results/segmentation.json`` (accuracy, stain shift, HER2ST counts, speed).

    python scripts/package_segmentation.py --name nuclei-seg-stain --base weights/nuclei-seg.json \\
        --runs runs/seg-stain-cpu1 runs/seg-stain-cpu2
    python bench/segmentation.py                       # scores it next to nuclei-seg and classical
    python scripts/package_segmentation.py ... --bench bench/results/segmentation.json
    python scripts/package_segmentation.py --refresh-bench weights/nuclei-seg.json --bench bench/results/segmentation.json

    python scripts/package_segmentation.py --type-merge weights/nuclei-seg-stain.json \\
        bench/results/segmentation_type_merge.json

``--refresh-bench`` renews only the benchmark rows of a card that is already bundled (its training
runs need not be on this machine), after checking that the benchmark scored its weights;
``--type-merge`` puts a merge of nucleus types adopted by its rule into such a card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ghist_core.io.atomic import atomic_write_text  # noqa: E402
from ghist_core.io.hashing import sha256_file  # noqa: E402
from ghist_core.paths import REPO_DIR  # noqa: E402
from ghist_core.training.augment import AugmentConfig  # noqa: E402
from ghist_core.weights.card import SEGMENTATION_KIND, seal_card  # noqa: E402

_FLAGS = [("mpp", "--mpp"), ("batch_size", "--batch-size"), ("lr", "--lr"), ("steps_per_epoch", "--steps-per-epoch"),
          ("max_epochs", "--max-epochs"), ("time_budget_s", "--time-budget"), ("device", "--device"),
          ("workers", "--workers"), ("augment", "--augment"), ("val_restain", "--val-restain"),
          ("max_steps", "--max-steps"), ("type_weights", "--type-weights"), ("teacher", "--teacher"),
          ("distill_weight", "--distill-weight"), ("unlabelled_her2st", "--unlabelled-her2st"),
          ("unlabelled_weight", "--unlabelled-weight"), ("unlabelled_batch", "--unlabelled-batch"), ("ema", "--ema")]
_STAIN_WORDS = "stain-bank augmentation (training/augment.py) for slides from other labs and scanners"
#: the card's words for the training.augment presets (the other --augment kinds are named as they are)
_AUGMENT_WORDS = {"stain": _STAIN_WORDS, "wide": _STAIN_WORDS + ", sampled stains and nuclei 0.67-2x their size"}
_OPTIONAL = ("time_budget_s", "val_restain", "max_steps", "type_weights", "teacher", "distill_weight",
             "unlabelled_her2st", "unlabelled_batch", "ema")  # left out when 0 / "" (default: off)


def run_command(cfg: dict, out: str, init: str) -> str:
    """The ``train_segmentation.py`` command line that reproduces a run from its saved config."""
    parts = ["python scripts/train_segmentation.py", f"--out {out}", "--data-root <nuclei>"]
    for key, flag in _FLAGS:
        value = cfg.get(key)
        if value is None and key not in cfg:  # a run from before the option: its default applies
            continue
        if value in (None, 0, 0.0, "") and key in _OPTIONAL:
            continue
        if key == "unlabelled_weight" and not cfg.get("unlabelled_her2st"):
            continue
        parts.append(f"{flag} {value!r}" if isinstance(value, float) else f"{flag} {value}")
    if cfg.get("arch"):
        parts.append(f"--arch '{json.dumps(cfg['arch'], separators=(',', ':'))}'")
    if cfg.get("tune_postprocess") is False:
        parts.append("--no-tune")
    if init:
        parts.append(f"--init {init}")
    return " ".join(parts)


def _run_record(run: Path) -> tuple[dict, dict]:
    """(train_config, state) of a run: ``result.json`` of a finished run, else its ``last.json``."""
    result = run / "result.json"
    meta = json.loads((result if result.exists() else run / "last.json").read_text())
    return meta["train_config"], meta["state"]


def _selection(cfg: dict) -> str:
    k = int(cfg.get("val_restain") or 0)
    copies = (f"the validation images as they are and re-stained to the {k} training-role stain-bank members "
              f"farthest from the reference (--val-restain {k})") if k else "the validation images"
    what = (f"the moving average of the weights (--ema {cfg['ema']}) at the best epoch" if cfg.get("ema")
            else "best epoch")
    return f"{what} by the mean validation AJI over {copies}; post-processing thresholds tuned the same way; no test image"


def build_card(name: str, base: dict, runs: list[Path], final_card: dict, weights_sha: str) -> dict:
    stages, commands = [], list(base.get("command", []))
    records = [_run_record(run) for run in runs]
    last_cfg = records[-1][0]
    init = f"weights/{base['name']}.safetensors"
    for run, (cfg, state) in zip(runs, records):
        rel = f"runs/{run.name}"
        commands.append(run_command(cfg, rel, init))
        finished = (run / "result.json").exists()
        stages.append({"run": rel, "device": cfg.get("device"), "steps": state["step"], "epochs": state["epoch"],
                       "train_seconds": round(state["elapsed_s"], 1), "init": init,
                       "finished": finished,
                       **({} if finished else {"note": f"stopped at epoch {state['epoch']} of {cfg['max_epochs']} "
                                                       f"(session end); its last weights start the next run"})})
        init = f"{rel}/last.safetensors"
    bank_path = REPO_DIR / "weights" / "stain_bank.json"
    bank = json.loads(bank_path.read_text())
    members = bank["members"]
    card = {
        "name": name,
        "kind": SEGMENTATION_KIND,
        "description": f"{base['name']} fine-tuned with "
                       + _AUGMENT_WORDS.get(last_cfg.get("augment"), f"{last_cfg.get('augment')} augmentation")
                       + "; same network, same CoNSeP classes",
        "format": base.get("format"),
        "mpp": final_card["mpp"],
        "type_names": final_card["type_names"],
        "architecture": final_card["architecture"],
        "postprocess": final_card["postprocess"],
        "data": {**base["data"], "selection": _selection(last_cfg),
                 **({"unlabelled": f"{last_cfg['unlabelled_her2st']} spot-centred regions of each HER2ST section "
                                   "whose stain is a training member of the stain bank (C2-C5; no labels read; the "
                                   "data's own README for its licence), for consistency with the teacher"}
                    if last_cfg.get("unlabelled_her2st") else {})},
        "base_model": {"name": base["name"], "sha256": base["sha256"]},
        "command": commands,
        "training": {"base": base.get("training"), "fine_tune": stages},
        **({"augmentation": {**AugmentConfig.preset(last_cfg["augment"]).to_dict(), "preset": last_cfg["augment"],
                             "symmetries_note": "the 8 flips/rotations are applied by the batch sampler"},
            "stain_bank": {"file": "weights/stain_bank.json", "sha256": sha256_file(bank_path),
                           "train_members": [m["name"] for m in members if m["role"] == "train"],
                           "benchmark_members (never trained on)": [m["name"] for m in members
                                                                    if m["role"] == "benchmark"]}}
           if last_cfg.get("augment") in _AUGMENT_WORDS else {"augmentation": {"kind": last_cfg.get("augment")}}),
        "metrics": {"validation": final_card.get("validation")},
    }
    return seal_card(card, weights_sha)


def bench_rows(bench: dict, name: str, sha: str) -> dict:
    """This model's rows of ``bench/results/segmentation.json``; every block copied must have
    scored these weights (each block records the sha256 of the weights it scored)."""
    def scored(block: str) -> dict:
        blk = bench.get(block) or {}
        if blk and (blk.get("weights_sha256") or {}).get(name) != sha:
            raise SystemExit(f"block '{block}' of the benchmark scored other weights for {name}; "
                             f"run bench/segmentation.py --only {block} again")
        return blk

    out = {}
    acc = scored("accuracy")
    if name in acc:
        out["accuracy"] = {ds: {k: v for k, v in r.items() if k != "pooled"} for ds, r in acc[name].items()}
    shift = scored("stain_shift")
    if shift:
        out["stain_shift"] = {ds: {k: v for k, v in blk.get("summary", {}).items()
                                   if k.split(":")[-1].removesuffix("_ttn") == name}
                              for ds, blk in shift.get("datasets", {}).items()}
        out["stain_shift"]["ttn_helps_everywhere"] = shift.get("ttn_helps_everywhere", {}).get(name)
        out["stain_shift"]["protocol_version"] = (shift.get("protocol") or {}).get("version", 1)
    scale = scored("scale_shift")
    if scale:
        out["scale_shift"] = {ds: {"aji": {z: row.get(name) for z, row in blk["aji"].items()},
                                   **(blk.get("summary", {}).get(name) or {})}
                              for ds, blk in scale.get("datasets", {}).items()}
    counts = scored("her2st_counts")
    if name in counts:
        out["her2st_counts"] = counts[name]["pooled"]
    speed = bench.get("speed", {})
    cpu = speed.get("cpu") or {}
    if cpu and (cpu.get("weights_sha256") or {}).get(name) == sha:
        app = (cpu.get("app") or {}).get(name) or {}
        out["speed_mpx_per_s"] = {
            "cpu": {"segment_slide": cpu.get(name, {}).get("mpx_per_s"), "batch_size": cpu.get(name, {}).get("batch_size"),
                    "app_segmentation": app.get("segmentation_mpx_per_s"), "app_whole_run": app.get("whole_run_mpx_per_s"),
                    "device": cpu.get("device")},
            "cuda_same_network": ((speed.get("cuda") or {}).get("model") or {}).get("mpx_per_s"),
            "what": speed.get("what", "")}
    return out


def with_bench(card: dict, bench_path: Path, sha: str) -> dict:
    """``card`` sealed with this model's rows of ``bench_path``; refused unless the benchmark scored ``sha``."""
    name = card["name"]
    bench = json.loads(bench_path.read_text())
    if bench.get("weights_sha256", {}).get(name) != sha:
        raise SystemExit(f"{bench_path} scored other weights for {name}; run bench/segmentation.py again")
    rows = bench_rows(bench, name, sha)
    out = {**card, "benchmark": {"source": "bench/results/segmentation.json", **rows}}
    if "speed_mpx_per_s" in (card.get("metrics") or {}) and "speed_mpx_per_s" in rows:
        out["metrics"] = {**card["metrics"], "speed_mpx_per_s": rows["speed_mpx_per_s"]}
    return seal_card(out, sha)


def _rewrite_card(card_path: Path, change) -> Path:
    """``change(card, weights_sha)`` -> the sealed card written over ``card_path`` (atomically), once
    the bundled weights beside it are checked to be the card's."""
    text = card_path.read_text()
    card = json.loads(text)
    weights = card_path.with_name(f"{card['name']}.safetensors")
    sha = sha256_file(weights) if weights.is_file() else ""
    if sha != card.get("sha256"):
        raise SystemExit(f"{weights} does not match the sha256 in {card_path}; package the model first")
    atomic_write_text(card_path, json.dumps(change(card, sha), indent=1) + ("\n" if text.endswith("\n") else ""))
    return card_path


def refresh_bench(card_path: Path, bench_path: Path) -> Path:
    """Renew the benchmark rows of an already bundled card; its weights file must match the card."""
    return _rewrite_card(card_path, lambda card, sha: with_bench(card, bench_path, sha))


def with_type_merge(card: dict, result: dict, result_path: str, sha: str) -> dict:
    """``card`` sealed with the adopted merge of ``result`` (``choose_on_validation.py type-merge``,
    which must have scored these weights) and its record in ``type_merge`` (the loader reads ``merge``)."""
    if result.get("weights_sha256") != sha:
        raise SystemExit(f"{result_path} scored other weights than {card['name']}'s")
    if not result.get("verdict", {}).get("adopt"):
        raise SystemExit(f"{result_path}: the rule did not adopt the merge ({result.get('verdict')})")
    merge = result["chosen"]
    record = {"what": "the nucleus type never says " + ", ".join(repr(k) for k in merge) + ": its probability joins "
                      + ", ".join(repr(v) for v in merge.values()) + " before the argmax (the prob_<type> columns are "
                      "unchanged)",
              "reason": result["reason"],
              "chosen_on": f"the {result['validation']['images']} CoNSeP validation patches "
                           f"({', '.join(result['validation']['tiles'])}), mean per-type F1 of the merged classes",
              "command": "python scripts/choose_on_validation.py type-merge",
              "rule": result["rule"], "result": result_path,
              "test_per_type_f1": {"unmerged": result["test"]["unmerged"]["per_type_f1"],
                                   "merged": result["test"]["merged"]["per_type_f1"]}}
    return seal_card({**card, "type_merge": {"merge": dict(merge), **record}}, sha)


def apply_type_merge(card_path: Path, result_path: Path) -> Path:
    result = json.loads(result_path.read_text())
    rel = result_path.resolve().relative_to(REPO_DIR).as_posix() if result_path.resolve().is_relative_to(REPO_DIR) \
        else str(result_path)
    return _rewrite_card(card_path, lambda card, sha: with_type_merge(card, result, rel, sha))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name")
    ap.add_argument("--base", type=Path, help="card of the model the chain started from")
    ap.add_argument("--runs", type=Path, nargs="+", help="the runs in order; the last one is packaged")
    ap.add_argument("--bench", type=Path, default=None, help="segmentation.json to copy this model's rows from")
    ap.add_argument("--refresh-bench", type=Path, default=None, metavar="CARD",
                    help="only renew the benchmark rows of this bundled card (needs --bench)")
    ap.add_argument("--type-merge", type=Path, nargs=2, default=None, metavar=("CARD", "RESULT"),
                    help="only put the merge adopted in RESULT (choose_on_validation.py type-merge) into this card")
    ap.add_argument("--out-dir", type=Path, default=REPO_DIR / "weights")
    a = ap.parse_args(argv)
    if a.type_merge:
        print(f"merged the nucleus types of {apply_type_merge(*a.type_merge)}")
        return
    if a.refresh_bench:
        if not a.bench:
            ap.error("--refresh-bench needs --bench")
        print(f"renewed the benchmark rows of {refresh_bench(a.refresh_bench, a.bench)}")
        return
    if not (a.name and a.base and a.runs):
        ap.error("--name, --base and --runs are required (or --refresh-bench CARD --bench JSON)")
    base = json.loads(a.base.read_text())
    final = a.runs[-1]
    final_card = json.loads((final / "final.json").read_text())
    sha = sha256_file(final / "final.safetensors")
    card = build_card(a.name, base, a.runs, final_card, sha)
    if a.bench:  # every check before anything is written: weights and card change together or not at all
        card = with_bench(card, a.bench, sha)
    weights = a.out_dir / f"{a.name}.safetensors"
    if not weights.exists() or sha256_file(weights) != sha:
        tmp = weights.with_suffix(".tmp")
        shutil.copyfile(final / "final.safetensors", tmp)
        tmp.replace(weights)
    atomic_write_text(a.out_dir / f"{a.name}.json", json.dumps(card, indent=1))
    print(f"wrote {weights} ({sha[:12]}) and its card")


if __name__ == "__main__":
    main()
