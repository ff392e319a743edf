#!/usr/bin/env python
"""Publish the bundled weights (``weights/``) to the Hugging Face Hub with a generated model card.

Every ``<name>.safetensors`` + ``<name>.json`` pair is re-hashed against its card first (a damaged
file is never published), then the folder is uploaded with ``HfApi.upload_folder`` together with a
``README.md`` whose YAML metadata (licence, datasets, metrics, tags) is built from the cards.

    python scripts/publish_weights.py --repo ghist-studio/ghist-her2st            # needs HF_TOKEN
    python scripts/publish_weights.py --dry-run /tmp/to-upload                    # writes what it would upload
    python scripts/publish_weights.py --seal weights/                             # (re)seal the cards in a folder

Sealing adds ``card_sha256`` and ``integrity`` (see :mod:`ghist_core.weights.card`) to every card
whose files match it, so that later edits of the card (a swapped gene label) are refused.

The token is read by huggingface_hub from ``HF_TOKEN`` (or ``hf auth login``); it is never taken on
the command line, printed or written anywhere. ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable

from ghist_core import paths
from ghist_core.io.atomic import atomic_write_text
from ghist_core.errors import GhistError, WeightsError
from ghist_core.weights.card import card_file_hashes, read_card, seal_card
from ghist_core.weights.resolve import CARD_SUFFIX, WEIGHTS_SUFFIX, sha256_file

DEFAULT_LICENSE = "other"
BASE_TAGS = ["ghist-studio", "histology", "h-and-e", "computational-pathology", "spatial-transcriptomics", "safetensors"]


def _check_model_files(weights_dir: Path, name: str, card: dict, card_name: str) -> None:
    for fname, digest in card_file_hashes(card, name).items():
        fpath = weights_dir / fname
        actual = sha256_file(fpath) if fpath.is_file() else "missing"
        if actual != digest:
            raise WeightsError(
                f"{fname} does not match the sha256 in {card_name} ({actual[:12]}… != {digest[:12]}…); "
                "refusing to publish it. Re-export the model."
            )


def _model_cards(weights_dir: Path) -> list[tuple[str, Path]]:
    return [(p.name[: -len(CARD_SUFFIX)], p) for p in sorted(weights_dir.glob(f"*{CARD_SUFFIX}"))
            if (weights_dir / f"{p.name[: -len(CARD_SUFFIX)]}{WEIGHTS_SUFFIX}").is_file()]


def _dump_like(card: dict, original: str) -> str:
    """JSON text of ``card`` in the layout of ``original`` (indent, key order), so a re-seal diff is small."""
    old = json.loads(original)
    end = "\n" if original.endswith("\n") else ""
    for indent in (2, 1, 4):
        for sort in (True, False):
            if json.dumps(old, indent=indent, sort_keys=sort) + end == original:
                return json.dumps(card, indent=indent, sort_keys=sort) + end
    return json.dumps(card, indent=2, sort_keys=True) + "\n"


def seal_folder(weights_dir: Path) -> list[Path]:
    """Add ``card_sha256`` and ``integrity`` to every card in ``weights_dir`` whose files match it.

    Only the seal fields change; a card whose weights do not match its ``sha256`` is never sealed.
    """
    written = []
    for name, card_path in _model_cards(weights_dir):
        card = read_card(card_path, sealed=False)
        if not isinstance(card.get("sha256"), str):
            raise WeightsError(f"{card_path.name} has no sha256 for {name}{WEIGHTS_SUFFIX}; it cannot be sealed.")
        _check_model_files(weights_dir, name, card, card_path.name)
        sealed = seal_card(card, card["sha256"])
        if sealed != card:
            atomic_write_text(card_path, _dump_like(sealed, card_path.read_text(encoding="utf-8")))
            written.append(card_path)
    return written


def collect_models(weights_dir: Path) -> list[tuple[str, dict]]:
    """``(name, card)`` for every verified model in ``weights_dir``; raises on any damaged file or card."""
    out = []
    for name, card_path in _model_cards(weights_dir):
        card = read_card(card_path)
        _check_model_files(weights_dir, name, card, card_path.name)
        out.append((name, card))
    if not out:
        raise WeightsError(f"No models (<name>.safetensors + <name>.json) in {weights_dir}.")
    return out


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(k) for k in value]
    return [str(value)]


def _datasets(card: dict) -> list[str]:
    training = card.get("training") if isinstance(card.get("training"), dict) else {}
    return _as_list(card.get("datasets") or card.get("dataset") or training.get("datasets") or training.get("dataset"))


def _flat_metrics(metrics: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = float(v)
            elif isinstance(v, dict):
                out.update(_flat_metrics(v, f"{prefix}{k}."))
    return out


def model_card_text(repo_id: str, models: Iterable[tuple[str, dict]]) -> str:
    """README.md with Hub YAML metadata (built with huggingface_hub's own ModelCardData)."""
    from huggingface_hub import ModelCard, ModelCardData

    models = list(models)
    licenses = sorted({str(c.get("license")) for _, c in models if c.get("license")})
    datasets = sorted({d for _, c in models for d in _datasets(c)})
    metric_names = sorted({k.split(".")[-1] for _, c in models for k in _flat_metrics(c.get("metrics"))})
    kinds = sorted({str(c.get("kind")) for _, c in models if c.get("kind")})
    data = ModelCardData(
        license=licenses[0] if len(licenses) == 1 else DEFAULT_LICENSE,
        datasets=datasets or None,
        metrics=metric_names or None,
        tags=BASE_TAGS + [f"kind:{k}" for k in kinds],
        library_name="ghist-studio",
    )
    lines = [
        f"# {repo_id}",
        "",
        "Weights for GHIST Studio: nucleus segmentation and single-cell gene "
        "expression / cell type prediction from H&E histology (GHIST method, Fu et al., Nature Methods 2025).",
        "Each model is a `<name>.safetensors` file with a JSON card `<name>.json` holding its sha256; "
        "GHIST Studio refuses any file whose hash does not match.",
        "",
        "```bash",
        f"ghist weights pull {repo_id}",
        f"ghist predict slide.svs --project my-project --model {repo_id}@main",
        "```",
        "",
        "| model | kind | sha256 | size (bytes) |",
        "|---|---|---|---|",
    ]
    for name, card in models:
        lines.append(f"| `{name}` | {card.get('kind', '')} | `{card['sha256'][:16]}…` | {card.get('size', '')} |")
    for name, card in models:
        lines += ["", f"## {name}", ""]
        if card.get("description"):
            lines += [str(card["description"]), ""]
        flat = _flat_metrics(card.get("metrics"))
        if flat:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(flat.items())] + [""]
        ds = _datasets(card)
        if ds:
            lines += ["Trained on: " + ", ".join(ds), ""]
        if card.get("license"):
            lines += [f"Licence: {card['license']}", ""]
        training = card.get("training")
        if training:
            lines += ["<details><summary>training</summary>", "", "```json",
                      json.dumps(training, indent=2, sort_keys=True, default=str), "```", "", "</details>"]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def stage(weights_dir: Path, out_dir: Path, repo_id: str) -> list[Path]:
    """Write exactly what would be uploaded into ``out_dir`` (weights, cards, README.md)."""
    models = collect_models(weights_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, _ in models:
        for fname in (f"{name}{WEIGHTS_SUFFIX}", f"{name}{CARD_SUFFIX}"):
            shutil.copy2(weights_dir / fname, out_dir / fname)
            written.append(out_dir / fname)
    atomic_write_text(out_dir / "README.md", model_card_text(repo_id, models))
    written.append(out_dir / "README.md")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default=paths.DEFAULT_MODEL_REPO, help="Hub repo id (owner/name)")
    ap.add_argument("--weights-dir", type=Path, default=paths.BUNDLED_WEIGHTS_DIR)
    ap.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    ap.add_argument("--message", default="Upload GHIST Studio weights")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--create-pr", action="store_true")
    ap.add_argument("--dry-run", type=Path, metavar="DIR", help="write the folder to upload into DIR; upload nothing")
    ap.add_argument("--seal", type=Path, metavar="DIR", help="add card_sha256/integrity to the cards in DIR; upload nothing")
    args = ap.parse_args(argv)
    try:
        if args.seal is not None:
            for path in seal_folder(args.seal):
                print(f"sealed {path}")
            return 0
        if args.dry_run is not None:
            files = stage(args.weights_dir, args.dry_run, args.repo)
            print(f"Dry run: would upload {len(files)} files to {args.repo}:")
            for f in files:
                print(f"  {f.name}  ({f.stat().st_size} bytes)")
            return 0
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi()
        with tempfile.TemporaryDirectory(prefix="ghist-publish-") as tmp:
            stage(args.weights_dir, Path(tmp), args.repo)
            api.create_repo(args.repo, private=args.private, exist_ok=True)
            info = api.upload_folder(
                repo_id=args.repo, folder_path=tmp, commit_message=args.message,
                revision=args.revision, create_pr=args.create_pr,
            )
        print(f"Uploaded to {args.repo}: {info}")
        return 0
    except GhistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # network / Hub errors (HfHubHTTPError is an OSError); never echoes the token
        print(f"error: the upload failed: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
