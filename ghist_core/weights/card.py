"""Model cards: read any JSON file safely, check its shape, and seal it to its weights.

A card says what the weights mean (gene names, cell types, units, architecture), so it must be
as trustworthy as the weights: a card whose gene labels were swapped (ERBB2 <-> ESR1) gives
wrong answers from genuine weights. Every card therefore carries

* ``sha256``: the weights file (``<name>.safetensors``);
* ``card_sha256``: sha256 of the card's canonical JSON (sorted keys, no whitespace, ASCII),
  without the two seal fields ``card_sha256`` and ``integrity`` themselves;
* ``integrity``: sha256 over ``ghist-card-v1``, the weights sha256 and ``card_sha256``, binding
  this card to these weights.

A card that is not JSON, not an object, too big, too deep, not UTF-8, has NaN/Infinity,
duplicate keys, wrong types in the fields the code reads, or a ``files`` entry that leaves the
weights folder is a :class:`~ghist_core.errors.ModelCardError` with a plain message; a card that
was edited after sealing is a :class:`~ghist_core.errors.WeightsIntegrityError`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from ghist_core.errors import ModelCardError, WeightsFormatError, WeightsIntegrityError

__all__ = [
    "CARD_MAX_BYTES",
    "SEAL_FIELDS",
    "canonical_json",
    "card_sha256",
    "integrity_digest",
    "seal_card",
    "check_seal",
    "parse_card",
    "read_card",
    "card_file_hashes",
    "model_cell_inputs",
    "model_members",
    "ensemble_size",
    "SEGMENTATION_KIND",
    "is_segmenter",
    "segmenter_choices",
    "is_stain_robust",
    "trained_segmenter",
    "run_segmenter",
    "chosen_card",
    "is_expression_model",
]

#: ``kind`` of a nucleus-segmentation card (GHIST cards say ``"ghist"``).
SEGMENTATION_KIND = "segmentation"

#: Largest card read (a 20,000-gene card is well under 1 MB).
CARD_MAX_BYTES = 8 * 1024 * 1024
#: Deepest nesting of objects/lists accepted (the bundled cards use 4).
MAX_DEPTH = 32
#: Fields that hold the seal and so are left out of ``card_sha256``.
SEAL_FIELDS = ("card_sha256", "integrity")
_SEAL_TAG = "ghist-card-v1"
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
WEIGHTS_SUFFIX = ".safetensors"

# Fields the code reads, and the JSON type each must have when present.
_STRINGS = ("name", "kind", "description", "expression_units", "licence_note", "license", "format")
_STRING_LISTS = ("genes", "gene_names", "cell_types", "type_names", "marker_genes", "evaluated_genes")
_SECTIONS = ("config", "architecture", "postprocess")  # flat objects the loaders turn into dataclasses
_SECTION_STRING_LISTS = ("genes", "cell_types", "cell_inputs", "type_names", "morph_features")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


# --------------------------------------------------------------------------------------------
# canonical form and seal
# --------------------------------------------------------------------------------------------
def canonical_json(card: Mapping[str, Any]) -> bytes:
    """The card's bytes for hashing: sorted keys, no whitespace, ASCII, seal fields left out."""
    body = {k: v for k, v in card.items() if k not in SEAL_FIELDS}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def card_sha256(card: Mapping[str, Any]) -> str:
    """sha256 of :func:`canonical_json`: changes when any field but the seal changes."""
    return hashlib.sha256(canonical_json(card)).hexdigest()


def integrity_digest(weights_sha256: str, card_digest: str) -> str:
    """One digest binding a weights file to one card."""
    return hashlib.sha256(f"{_SEAL_TAG}\n{weights_sha256.lower()}\n{card_digest.lower()}".encode()).hexdigest()


def seal_card(card: Mapping[str, Any], weights_sha256: str) -> dict:
    """A copy of ``card`` with ``sha256``, ``card_sha256`` and ``integrity`` set for these weights."""
    out = {k: v for k, v in card.items() if k not in SEAL_FIELDS}
    out["sha256"] = weights_sha256.lower()
    digest = card_sha256(out)
    out["card_sha256"] = digest
    out["integrity"] = integrity_digest(out["sha256"], digest)
    return out


def check_seal(card: Mapping[str, Any], label: str) -> None:
    """Raise :class:`WeightsIntegrityError` unless the card is sealed and unchanged since."""
    stored, bound, weights = card.get("card_sha256"), card.get("integrity"), card.get("sha256")
    if not (isinstance(weights, str) and _HEX64.fullmatch(weights)):
        raise WeightsIntegrityError(
            f"The model card {label} has no valid sha256 for its weights, so the weights cannot be checked. "
            "GHIST Studio refuses to load unverified weights.")
    if not (isinstance(stored, str) and _HEX64.fullmatch(stored) and isinstance(bound, str)
            and _HEX64.fullmatch(bound)):
        raise WeightsIntegrityError(
            f"The model card {label} carries no card_sha256/integrity seal, so its gene names, cell types and "
            "settings cannot be checked. Download the model again, or re-seal a card you made yourself with "
            "`python scripts/publish_weights.py --seal FOLDER`.")
    actual = card_sha256(card)
    if actual != stored.lower():
        raise WeightsIntegrityError(
            f"The model card {label} was changed after it was sealed (its content hashes to {actual[:12]}… but "
            f"card_sha256 says {stored[:12]}…): gene names, cell types or settings may be wrong. It will not be "
            "used. Restore the card or download the model again.")
    if integrity_digest(weights, actual) != bound.lower():
        raise WeightsIntegrityError(
            f"The model card {label} does not belong to these weights (its integrity digest does not match the "
            "weights sha256 and the card). It will not be used. Restore the card or download the model again.")


# --------------------------------------------------------------------------------------------
# parsing and shape
# --------------------------------------------------------------------------------------------
def _refuse_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number JSON allows")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key '{k[:40]}' appears twice")
        out[k] = v
    return out


def _depth(value: Any) -> int:
    """Nesting depth, without recursion (so a hostile card cannot blow the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_string_list(value: Any, where: str, label: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ModelCardError(f"The model card {label} is malformed: '{where}' must be a list of text, "
                             f"not {_json_type(value)}.")


def _check_shape(card: dict, label: str) -> None:
    """Types of the fields the code reads; everything else is free-form (shown, never interpreted)."""
    def bad(field: str, want: str) -> ModelCardError:
        return ModelCardError(f"The model card {label} is malformed: '{field}' must be {want}, "
                              f"not {_json_type(card[field])}.")

    for key in _STRINGS:
        if key in card and not isinstance(card[key], str):
            raise bad(key, "text")
    for key in ("sha256", *SEAL_FIELDS):
        if key in card and not (isinstance(card[key], str) and _HEX64.fullmatch(card[key])):
            raise bad(key, "64 hexadecimal digits")
    for key in _STRING_LISTS:
        if key in card:
            _check_string_list(card[key], key, label)
    if "size" in card and not (isinstance(card["size"], int) and not isinstance(card["size"], bool)
                               and card["size"] >= 0):
        raise bad("size", "a whole number of bytes")
    for key in ("mpp", "patch_px"):
        if key in card and not (_finite(card[key]) and card[key] > 0):
            raise bad(key, "a positive number")
    for key in _SECTIONS:
        if key not in card:
            continue
        section = card[key]
        if not isinstance(section, dict):
            raise bad(key, "an object")
        for sub, value in section.items():
            if sub in _SECTION_STRING_LISTS:
                _check_string_list(value, f"{key}.{sub}", label)
            elif isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list))
                                                                             for v in value)):
                raise ModelCardError(f"The model card {label} is malformed: '{key}.{sub}' must be a number, "
                                     "text or a flat list.")
    if "files" in card:
        files = card["files"]
        if not isinstance(files, (dict, list)):
            raise bad("files", "an object or a list")
        card_file_hashes(card, card.get("name") if isinstance(card.get("name"), str) else "", label=label)


def parse_card(data: bytes, label: str) -> dict:
    """Bytes of a card -> a dict of the expected shape, or :class:`ModelCardError` (never another error)."""
    if len(data) > CARD_MAX_BYTES:
        raise ModelCardError(f"The model card {label} is {len(data) / 1e6:.1f} MB, more than a model card can "
                             f"be ({CARD_MAX_BYTES // 2**20} MB). It is not read.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelCardError(f"The model card {label} is not UTF-8 text. Restore it or download the model "
                             "again.") from None
    try:
        card = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ModelCardError(f"The model card {label} is nested too deeply to be a model card.") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, duplicate keys
        raise ModelCardError(f"The model card {label} is not valid JSON ({str(exc)[:120]}). Restore it or "
                             "download the model again.") from None
    if not isinstance(card, dict):
        raise ModelCardError(f"The model card {label} is {_json_type(card)}, not a JSON object.")
    if _depth(card) > MAX_DEPTH:
        raise ModelCardError(f"The model card {label} is nested more than {MAX_DEPTH} levels deep; a model card "
                             "is not.")
    _check_shape(card, label)
    return card


def read_card(card_path: str | Path, *, sealed: bool = True) -> dict:
    """Read, shape-check and (by default) seal-check the card at ``card_path``."""
    card_path = Path(card_path)
    label = card_path.name
    try:
        with open(card_path, "rb") as fh:
            data = fh.read(CARD_MAX_BYTES + 1)
    except OSError as exc:
        raise ModelCardError(f"The model card {label} could not be read ({exc.__class__.__name__}).") from None
    card = parse_card(data, label)
    if sealed:
        check_seal(card, label)
    return card


# --------------------------------------------------------------------------------------------
# files the card vouches for
# --------------------------------------------------------------------------------------------
def _member(fname: str, label: str) -> str:
    """``fname`` if it names a file inside the weights folder, else :class:`ModelCardError`."""
    p = PurePosixPath(fname)
    if (not fname or "\\" in fname or "\0" in fname or ":" in fname or p.is_absolute()
            or any(part in ("", ".", "..") for part in fname.split("/"))):
        raise ModelCardError(f"The model card {label} lists a file outside its weights folder "
                             f"({fname[:60]!r}); such cards are refused.")
    return fname


def card_file_hashes(card: Mapping[str, Any], name: str, *, label: str | None = None) -> dict[str, str]:
    """Expected sha256 of every file the card vouches for, keyed by its path inside the weights folder.

    ``card["sha256"]`` always covers ``<name>.safetensors``; ``card["files"]`` may list more, as
    ``{file: sha256}``, ``{file: {"sha256": ...}}`` or ``[{"path"|"name"|"file": file, "sha256": ...}]``.
    """
    label = label or f"{name}.json"
    expected: dict[str, str] = {}

    def add(fname: Any, digest: Any) -> None:
        if not isinstance(fname, str) or not (isinstance(digest, str) and _HEX64.fullmatch(digest)):
            raise ModelCardError(f"The model card {label} is malformed: every 'files' entry needs a file name and "
                                 "a 64-digit sha256.")
        expected[_member(fname, label)] = digest.lower()

    files = card.get("files")
    if isinstance(files, Mapping):
        for fname, info in files.items():
            add(fname, info.get("sha256") if isinstance(info, Mapping) else info)
    elif isinstance(files, list):
        for info in files:
            if not isinstance(info, Mapping):
                raise ModelCardError(f"The model card {label} is malformed: 'files' entries must be objects.")
            add(info.get("path") or info.get("name") or info.get("file"), info.get("sha256"))
    top = card.get("sha256")
    if isinstance(top, str) and name:
        expected[f"{name}{WEIGHTS_SUFFIX}"] = top.lower()
    return expected


def model_cell_inputs(models: list[Mapping[str, Any]], model_id: str | None) -> list[str]:
    """Segmentation-table columns the chosen GHIST model reads per cell (its card's ``config.cell_inputs``).

    ``models``: the entries of ``weights.resolve.list_models()``; ``model_id`` picks one by its
    ``model_id`` or ``name`` (``None``: the bundled one). Segmenter entries are passed over; an
    unknown model or one without cell inputs gives ``[]``.
    """
    card = chosen_card(models, model_id)
    return list((card or {}).get("config", {}).get("cell_inputs") or [])


def model_members(models: list[Mapping[str, Any]], model_id: str | None) -> int:
    """How many ensemble members (seeds) the chosen GHIST model holds: its card's ``ensemble.members``.

    Chosen as in :func:`model_cell_inputs`. An unknown model, a card without ``ensemble`` or a
    malformed count gives 1 (no per-cell uncertainty: that needs more than one member).
    """
    try:
        return ensemble_size(chosen_card(models, model_id) or {})
    except WeightsFormatError:
        return 1


def ensemble_size(card: Mapping[str, Any]) -> int:
    """The number of ensemble members the card lists (``"ensemble": {"members": k, "rule": ...}``; 1 without)."""
    ens = card.get("ensemble")
    if ens is None:
        return 1
    k = ens.get("members") if isinstance(ens, Mapping) else None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise WeightsFormatError("The model card's 'ensemble' needs 'members': a whole number of at least 1 "
                                 "(member 0 is the model, the others seeds of its recipe).")
    return k


def is_segmenter(entry: Mapping[str, Any]) -> bool:
    """A ``list_models`` entry of a nucleus segmenter: ``kind`` says so, or (older cards without a
    kind) the card carries the watershed's ``postprocess`` settings."""
    card = entry.get("card")
    return entry.get("kind") == SEGMENTATION_KIND or (
        entry.get("kind") is None and isinstance(card, Mapping) and "postprocess" in card)


def _bundled_segmenters(models: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The listed bundled learned segmenters that loaded without error (what the pickers offer)."""
    return [m for m in models if m.get("source") == "bundled" and is_segmenter(m) and not m.get("error")]


def segmenter_choices(models: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """``(weights name, label)`` of the bundled learned segmenters, for a picker.

    The label says what the card says: stain-robust when it was trained with the stain bank.
    """
    return [(str(m["name"]), f"learned {m['name']}" + (" (stain-robust)" if is_stain_robust(m.get("card")) else ""))
            for m in _bundled_segmenters(models)]


def is_stain_robust(card: Mapping[str, Any] | None) -> bool:
    """Whether a segmenter was trained with the stain bank's re-staining (its card records the bank)."""
    return bool(card) and "stain_bank" in card


_SEGMENTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def trained_segmenter(card: Mapping[str, Any] | None) -> str | None:
    """The learned segmenter whose nucleus types a GHIST model was trained on (its card's
    ``segmenter``, a bundled weights name), when the model reads them (``config.cell_inputs``);
    else ``None``. A card naming anything but a plain weights name is a ``ModelCardError``.

    Such a model is run on cells from that segmenter unless the user names another: another
    segmenter's type probabilities are inputs the model never saw (on HER2ST nuclei nuclei-seg
    and nuclei-seg-stain give the same type for 31 % of them; bench/results/her2st.json).
    """
    if not card or not (card.get("config") or {}).get("cell_inputs"):
        return None
    name = card.get("segmenter")
    if name is None:
        return None
    if not isinstance(name, str) or not _SEGMENTER_NAME.match(name) or name.endswith(".safetensors"):
        raise ModelCardError(f"The model card names its segmenter {str(name)[:60]!r}, which is not the name of a "
                             "bundled segmenter (e.g. 'nuclei-seg').")
    return name


def run_segmenter(segmenter_id: str | None, card: Mapping[str, Any] | None) -> str:
    """The segmenter a run of the model with this ``card`` uses: ``"classical"``, the learned model
    named, or for ``None``/``"auto"`` the one the model was trained on, else the default learned one.
    The one rule for the pipeline, the CLI and the Upload page."""
    from ghist_core.paths import DEFAULT_SEGMENTER

    if segmenter_id in (None, "", "auto"):
        return trained_segmenter(card) or DEFAULT_SEGMENTER
    return str(segmenter_id)


def is_expression_model(entry: Mapping[str, Any]) -> bool:
    """A ``list_models`` entry the GHIST picker may offer: a GHIST card (or an older one without a
    kind) that is not a segmenter and whose card could be trusted."""
    return entry.get("kind") in (None, "ghist") and not is_segmenter(entry) and not entry.get("error")


def segmenter_card(models: list[Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    """The card of the bundled segmentation model called ``name`` (the ones :func:`segmenter_choices`
    offers; None when there is none)."""
    for m in _bundled_segmenters(models):
        if m.get("name") == name and isinstance(m.get("card"), Mapping):
            return m["card"]
    return None


def chosen_card(models: list[Mapping[str, Any]], model_id: str | None) -> Mapping[str, Any] | None:
    """The card of the GHIST model ``model_id`` (its ``model_id`` or ``name``; None: the bundled one)."""
    for m in models:
        if not is_expression_model(m):
            continue
        if (model_id is None and m.get("source") == "bundled") or (model_id is not None and model_id in (m.get("model_id"), m.get("name"))):
            card = m.get("card")
            return card if isinstance(card, Mapping) else None
    return None
