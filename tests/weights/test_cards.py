"""Model cards are part of the integrity check, and no card of any shape gets past as anything but a WeightsError.

Real files on disk, the real loaders (GHIST and the learned segmenter) and the real ``ghist`` CLI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from ghist_core import cli, paths
from ghist_core.errors import ModelCardError, WeightsError, WeightsIntegrityError
from ghist_core.model.predict import load_ghist
from ghist_core.weights.card import (
    CARD_MAX_BYTES,
    card_sha256,
    check_seal,
    integrity_digest,
    model_cell_inputs,
    parse_card,
    read_card,
    seal_card,
)
from ghist_core.weights.resolve import list_models, resolve_file, resolve_weights, save_weights, verify


def _models(folder: Path) -> None:
    """Two real tiny models: 'good' and 'other' (both sealed by save_weights)."""
    g = torch.Generator().manual_seed(0)
    for name in ("good", "other"):
        save_weights({"w": torch.randn(4, 4, generator=g)}, folder, name,
                     {"kind": "ghist", "genes": ["ERBB2", "ESR1"], "cell_types": ["T"], "expression_units": "CP10k"})


def _cli(capsys, *argv: str) -> tuple[int, list[dict]]:
    code = cli.main(list(argv))
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


# ------------------------------------------------------------------------------ sealing
def test_bundled_cards_are_sealed_and_verify() -> None:
    for card_path in sorted(paths.BUNDLED_WEIGHTS_DIR.glob("*.json")):
        if not card_path.with_suffix(".safetensors").exists():
            continue
        card = read_card(card_path)  # raises unless sealed and unchanged
        assert card["integrity"] == integrity_digest(card["sha256"], card_sha256(card))
    rows = verify(weights_dir=paths.BUNDLED_WEIGHTS_DIR)
    assert rows and all(r["ok"] for r in rows)
    assert {r["file"] for r in rows} >= {"ghist-her2st.json", "ghist-her2st.safetensors", "nuclei-seg.json"}


def test_swapped_gene_labels_are_refused_everywhere(tmp_path: Path, capsys, monkeypatch) -> None:
    """ERBB2 <-> ESR1 in the card of genuine weights: same weights sha256, refused by every path."""
    from testkit import make_tiny_ghist

    folder = tmp_path / "m"
    folder.mkdir()
    wp = make_tiny_ghist(folder)
    genuine = load_ghist(str(folder), device="cpu")
    assert genuine.genes[:2] == ["ERBB2", "ESR1"]
    card_path = wp.with_suffix(".json")
    card = json.loads(card_path.read_text())
    for section in (card, card["config"]):
        if "genes" in section:
            g = section["genes"]
            i, j = g.index("ERBB2"), g.index("ESR1")
            g[i], g[j] = g[j], g[i]
    card_path.write_text(json.dumps(card, indent=2))
    assert card["sha256"] == genuine.weights_sha256  # the weights did not change at all
    for load in (lambda: load_ghist(str(folder), device="cpu"), lambda: load_ghist(device="cpu", path=wp),
                 lambda: resolve_weights(str(folder), name=wp.stem), lambda: resolve_file(wp)):
        with pytest.raises(WeightsIntegrityError, match="changed after it was sealed"):
            load()
    rows = verify(str(folder))
    assert [(r["file"], r["status"]) for r in rows] == [(card_path.name, "mismatch")]
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    code, out = _cli(capsys, "weights", "verify")
    assert code == cli.EXIT_INPUT and out[0]["status"] == "mismatch" and "gene names" in out[0]["message"]


def test_seal_binds_card_to_weights(tmp_path: Path) -> None:
    _models(tmp_path)
    good = json.loads((tmp_path / "good.json").read_text())
    other_sha = json.loads((tmp_path / "other.json").read_text())["sha256"]
    # point the card at other weights without re-sealing: the card hash changes
    moved = {**good, "sha256": other_sha}
    with pytest.raises(WeightsIntegrityError, match="changed after it was sealed"):
        check_seal(moved, "good.json")
    # re-hash the card but keep the old integrity digest: still bound to the old weights
    moved["card_sha256"] = card_sha256(moved)
    with pytest.raises(WeightsIntegrityError, match="does not belong to these weights"):
        check_seal(moved, "good.json")
    # an unsealed card (the seal fields dropped) is refused, like a card without sha256
    bare = {k: v for k, v in good.items() if k not in ("card_sha256", "integrity")}
    (tmp_path / "good.json").write_text(json.dumps(bare))
    with pytest.raises(WeightsIntegrityError, match="no card_sha256/integrity seal"):
        resolve_weights(str(tmp_path), name="good")
    # the seal ignores layout and key order, not content
    resealed = seal_card(bare, bare["sha256"])
    (tmp_path / "good.json").write_text(json.dumps(dict(reversed(list(resealed.items())))))
    assert resolve_weights(str(tmp_path), name="good").card["card_sha256"] == good["card_sha256"]


def test_publish_seal_adds_only_the_seal(tmp_path: Path) -> None:
    import subprocess
    import sys

    _models(tmp_path)
    card = json.loads((tmp_path / "good.json").read_text())
    bare = dict(reversed([(k, v) for k, v in card.items() if k not in ("card_sha256", "integrity")]))  # unsorted
    (tmp_path / "good.json").write_text(json.dumps(bare, indent=1))
    (tmp_path / "other.safetensors").write_bytes(b"\0" * 8)  # damaged: never sealed
    proc = subprocess.run([sys.executable, str(paths.REPO_DIR / "scripts" / "publish_weights.py"), "--seal",
                           str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=paths.REPO_DIR)
    assert proc.returncode == 2 and "does not match" in proc.stderr
    (tmp_path / "other.json").unlink()
    (tmp_path / "other.safetensors").unlink()
    proc = subprocess.run([sys.executable, str(paths.REPO_DIR / "scripts" / "publish_weights.py"), "--seal",
                           str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=paths.REPO_DIR)
    assert proc.returncode == 0, proc.stderr
    sealed = json.loads((tmp_path / "good.json").read_text())
    assert sealed == card and list(sealed)[: len(bare)] == list(bare)  # same content, layout kept, seal added


# ------------------------------------------------------------------------------ files outside the folder
@pytest.mark.parametrize("entry", ["../secret", "../../../../etc/shadow", "/etc/shadow", "sub/../../secret",
                                   "..\\secret", "C:secret", "./good.safetensors", ""])
def test_card_files_cannot_leave_the_weights_folder(tmp_path: Path, entry: str, capsys, monkeypatch) -> None:
    folder = tmp_path / "w"
    _models(folder)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the weights loader")
    card = json.loads((folder / "good.json").read_text())
    card["files"][entry] = {"sha256": "0" * 64}
    (folder / "good.json").write_text(json.dumps(seal_card(card, card["sha256"])))
    with pytest.raises(ModelCardError, match="outside its weights folder") as err:
        resolve_weights(str(folder), name="good")
    assert hashlib.sha256(secret.read_bytes()).hexdigest()[:12] not in str(err.value)
    rows = verify(str(folder))
    assert [(r["name"], r["status"]) for r in rows if r["name"] == "good"] == [("good", "bad card")]
    assert all(r["ok"] for r in rows if r["name"] == "other")
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    code, listed = _cli(capsys, "weights", "list")
    assert code == 0 and {m["name"]: bool(m["error"]) for m in listed} == {"good": True, "other": False}


# ------------------------------------------------------------------------------ malformed cards
def _deep(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


MALFORMED: dict[str, bytes] = {
    "not json": b"this is not json {",
    "empty": b"",
    "json array": b'["ERBB2", "ESR1"]',
    "json string": b'"a card"',
    "deeply nested (stack)": b"[" * 100_000 + b"]" * 100_000,
    "nested past the limit": _deep(60),
    "huge": b'{"description": "' + b"x" * (CARD_MAX_BYTES + 10) + b'"}',
    "NaN": b'{"mpp": NaN}',
    "Infinity": b'{"metrics": {"r": Infinity}}',
    "non-UTF-8": '{"description": "café"}'.encode("latin-1"),
    "duplicate key": b'{"genes": ["A"], "genes": ["B"]}',
    "genes a string": b'{"genes": "ERBB2,ESR1"}',
    "genes with numbers": b'{"genes": ["ERBB2", 7]}',
    "config a list": b'{"config": [1, 2]}',
    "config nested": b'{"config": {"widths": {"a": 1}}}',
    "config genes not text": b'{"config": {"genes": [null]}}',
    "architecture a string": b'{"architecture": "resnet"}',
    "postprocess a list": b'{"postprocess": [0.5]}',
    "files a string": b'{"files": "good.safetensors"}',
    "files entry without hash": b'{"files": {"good.safetensors": {"size": 3}}}',
    "files list of strings": b'{"files": ["good.safetensors"]}',
    "sha256 a number": b'{"sha256": 12345}',
    "seal not hex": b'{"card_sha256": "zz"}',
    "size negative": b'{"size": -1}',
    "size true": b'{"size": true}',
    "mpp text": b'{"mpp": "0.5"}',
    "kind a list": b'{"kind": ["ghist"]}',
    "description an object": b'{"description": {"x": 1}}',
    "expression_units a number": b'{"expression_units": 3}',
    "missing everything": b"{}",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_card_is_a_plain_weights_error(tmp_path: Path, kind: str, capsys, monkeypatch) -> None:
    folder = tmp_path / "w"
    _models(folder)
    (folder / "good.json").write_bytes(MALFORMED[kind])
    with pytest.raises(WeightsError) as err:
        resolve_weights(str(folder), name="good")
    assert isinstance(err.value, (ModelCardError, WeightsIntegrityError))
    message = str(err.value)
    assert "good.json" in message and len(message) < 600 and "Traceback" not in message
    with pytest.raises(WeightsError):
        load_ghist(device="cpu", path=folder / "good.safetensors")
    # list and verify name the bad card and still show the other model
    listed = {m["name"]: m for m in list_models(weights_dir=folder)}
    assert listed["good"]["error"] and listed["good"]["card"] == {} and listed["other"]["error"] is None
    rows = verify(str(folder))
    assert {r["name"]: r["status"] for r in rows}["good"] in ("bad card", "mismatch")
    assert all(r["ok"] for r in rows if r["name"] == "other")
    monkeypatch.setenv("GHIST_WEIGHTS_DIR", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    code, out = _cli(capsys, "weights", "list")
    assert code == 0 and sorted(m["name"] for m in out) == ["good", "other"]
    code, out = _cli(capsys, "weights", "verify")
    assert code == cli.EXIT_INPUT and any(r["name"] == "good" and not r["ok"] for r in out)


# ------------------------------------------------------------------------------ properties
_json = hs.recursive(
    hs.none() | hs.booleans() | hs.integers() | hs.floats(allow_nan=False, allow_infinity=False) | hs.text(max_size=20),
    lambda children: hs.lists(children, max_size=4) | hs.dictionaries(hs.text(max_size=12), children, max_size=4),
    max_leaves=30,
)
#: The same shapes with small numbers: a card asking for a 10^9-channel layer would be a memory test.
_small_json = hs.recursive(
    hs.none() | hs.booleans() | hs.integers(-2, 24) | hs.floats(-2, 40) | hs.text(max_size=12),
    lambda children: hs.lists(children, max_size=5) | hs.dictionaries(hs.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
_FIELDS = ["genes", "cell_types", "config", "architecture", "postprocess", "files", "sha256", "size", "mpp",
           "kind", "name", "description", "expression_units", "metrics", "card_sha256", "integrity", "patch_px"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json)
def test_any_json_is_a_card_or_a_model_card_error(value) -> None:
    data = json.dumps(value).encode()
    try:
        card = parse_card(data, "x.json")
    except ModelCardError:
        return
    assert isinstance(card, dict)
    card_sha256(card)  # a card that parses can always be hashed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(field=hs.sampled_from(_FIELDS), value=_small_json, sub=hs.sampled_from(["genes", "cell_types", "widths", "fpn_dim",
                                                                           "embed_dim", "patch_px", "dropout"]))
def test_any_sealed_card_field_gives_a_weights_error_or_a_model(tmp_path_factory, field, value, sub) -> None:
    """A correctly sealed card with any field (or config entry) of any shape: the loaders give a model or a WeightsError."""
    from testkit import make_tiny_ghist

    folder = tmp_path_factory.mktemp("prop")
    wp = make_tiny_ghist(folder)
    card = json.loads(wp.with_suffix(".json").read_text())
    if field == "config" and not isinstance(value, dict):
        card["config"][sub] = value
    else:
        card[field] = value
    card.pop("card_sha256", None)
    sealed = seal_card(card, card["sha256"]) if field not in ("sha256", "card_sha256", "integrity") else card
    wp.with_suffix(".json").write_text(json.dumps(sealed))
    for load in (lambda: load_ghist(str(folder), device="cpu"), lambda: load_ghist(device="cpu", path=wp)):
        try:
            load()
        except WeightsError:
            pass
    listed = list_models(weights_dir=folder)
    assert len(listed) == 1 and (listed[0]["error"] is None) == bool(listed[0]["card"])
    assert verify(str(folder))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(section=hs.sampled_from(["architecture", "postprocess"]), key=hs.sampled_from(
    ["widths", "blocks", "head_width", "n_types", "mpp", "type_names", "np_threshold", "min_area_um2"]), value=_small_json)
def test_any_segmenter_card_gives_a_weights_error_or_a_segmenter(tmp_path_factory, section, key, value) -> None:
    from ghist_core.segmentation.model import SegNet, SegNetConfig, load_learned_segmenter

    folder = tmp_path_factory.mktemp("seg")
    cfg = SegNetConfig(widths=(8, 8, 8, 8, 8), blocks=(1, 1, 1, 1, 1), head_width=8)
    arch = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    card = {"kind": "segmentation", "architecture": arch, "postprocess": {"np_threshold": 0.5}}
    wp = save_weights(SegNet(cfg).state_dict(), folder, "seg", card).weights_path
    card = json.loads(wp.with_suffix(".json").read_text())
    card[section][key] = value
    wp.with_suffix(".json").write_text(json.dumps(seal_card(card, card["sha256"])))
    try:
        load_learned_segmenter(str(wp), device="cpu")
    except WeightsError:
        pass


def test_model_cell_inputs_reads_the_chosen_card(tmp_path: Path) -> None:
    """Which cell-table columns a listed GHIST model reads, from its card (``None`` = the bundled one)."""
    from testkit import make_tiny_ghist

    reads = ("prob_other", "prob_epithelial")
    make_tiny_ghist(tmp_path / "with", cell_inputs=reads)
    make_tiny_ghist(tmp_path / "plain")
    listed = list_models(weights_dir=tmp_path / "with")
    name = listed[0]["name"]
    assert model_cell_inputs(listed, None) == list(reads)
    assert model_cell_inputs(listed, name) == list(reads)
    assert model_cell_inputs(listed, "some/other-model") == []
    assert model_cell_inputs(list_models(weights_dir=tmp_path / "plain"), None) == []
    # a segmenter's entry is never taken for the GHIST model
    assert model_cell_inputs([{**listed[0], "kind": "segmentation"}], None) == []


# --- segmenters among the models -----------------------------------------------------------------
def test_segmenters_are_told_apart_from_expression_models():
    """The bundled segmentation cards say kind "segmentation"; older cards without a kind are
    recognised by their watershed settings; GHIST cards never count as segmenters."""
    from ghist_core.weights.card import is_segmenter, model_cell_inputs, segmenter_choices
    from ghist_core.weights.resolve import list_models

    models = [m for m in list_models() if m["source"] == "bundled"]
    kinds = {m["name"]: is_segmenter(m) for m in models}
    assert kinds["nuclei-seg"] and not kinds["ghist-her2st"]
    names = [n for n, _ in segmenter_choices(models)]
    assert "nuclei-seg" in names and "ghist-her2st" not in names
    # a kind-less card with watershed settings (an older segmenter card) is a segmenter, one without is not
    assert is_segmenter({"kind": None, "card": {"postprocess": {}}})
    assert not is_segmenter({"kind": None, "card": {"config": {}}})
    # the expression model is found whatever order the segmenters come in
    assert model_cell_inputs(list(reversed(models)), None) == model_cell_inputs(models, None) != []


def test_segmenter_labels_say_which_is_stain_robust():
    from ghist_core.weights.card import segmenter_choices

    entries = [{"name": "a", "source": "bundled", "kind": "segmentation", "card": {"stain_bank": {}}, "error": None},
               {"name": "b", "source": "bundled", "kind": "segmentation", "card": {}, "error": None},
               {"name": "c", "source": "cache", "kind": "segmentation", "card": {}, "error": None},
               {"name": "d", "source": "bundled", "kind": "segmentation", "card": {}, "error": "edited"}]
    assert segmenter_choices(entries) == [("a", "learned a (stain-robust)"), ("b", "learned b")]


def test_stain_robust_is_read_from_the_card_not_a_label():
    from ghist_core.weights.card import is_stain_robust, segmenter_card
    from ghist_core.weights.resolve import list_models

    models = list_models()
    assert is_stain_robust(segmenter_card(models, "nuclei-seg-stain"))
    assert not is_stain_robust(segmenter_card(models, "nuclei-seg"))
    assert segmenter_card(models, "ghist-her2st") is None  # an expression model is no segmenter
    assert segmenter_card(models, "no-such-model") is None
    assert not is_stain_robust(None) and not is_stain_robust({})


def test_run_segmenter_is_the_one_rule_for_auto():
    """auto → the segmenter a type-reading model was trained on, else the default; a named one as named;
    a card naming a path or junk as its segmenter is a ModelCardError (never a file to load)."""
    from ghist_core.errors import ModelCardError
    from ghist_core.paths import DEFAULT_SEGMENTER
    from ghist_core.weights.card import run_segmenter, trained_segmenter

    typed = {"config": {"cell_inputs": ["prob_other"]}, "segmenter": "nuclei-seg"}
    assert trained_segmenter(typed) == "nuclei-seg"
    assert run_segmenter(None, typed) == run_segmenter("auto", typed) == "nuclei-seg"
    assert run_segmenter("nuclei-seg-stain", typed) == "nuclei-seg-stain" and run_segmenter("classical", typed) == "classical"
    # a model that reads no nucleus types, or a card that names no segmenter: the default
    assert trained_segmenter({"config": {"cell_inputs": []}, "segmenter": "nuclei-seg"}) is None
    assert run_segmenter(None, {"config": {"cell_inputs": []}, "segmenter": "nuclei-seg"}) == DEFAULT_SEGMENTER
    assert run_segmenter(None, {"config": {"cell_inputs": ["prob_other"]}}) == DEFAULT_SEGMENTER
    assert run_segmenter(None, None) == DEFAULT_SEGMENTER
    for bad in ("../../etc/x", "/tmp/evil.safetensors", "x.safetensors", "", 3, ["nuclei-seg"]):
        with pytest.raises(ModelCardError):
            trained_segmenter({**typed, "segmenter": bad})
    # the bundled expression model names the segmenter of its training pack
    from ghist_core.paths import BUNDLED_WEIGHTS_DIR

    card = json.loads((BUNDLED_WEIGHTS_DIR / "ghist-her2st.json").read_text())
    assert run_segmenter(None, card) == "nuclei-seg-stain" == DEFAULT_SEGMENTER  # retrained on it (session 10)
