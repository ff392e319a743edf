"""Supply chain: no code path can unpickle, and weights load only when their sha256 checks out.

Unpickling runs arbitrary code from the file; model weights come from the Hub, from
colleagues and from shared drives. So: a scan of every Python file in the repository (by
syntax tree, so comments and docstrings that *mention* pickle do not count), and tampered,
unverifiable and pickle-dressed weights offered to every loader.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from ghist_core.errors import WeightsError, WeightsFormatError, WeightsIntegrityError
from ghist_core.model.predict import load_ghist
from ghist_core.weights.resolve import load_state_dict, resolve_weights, save_weights, sha256_file
from ghist_core.weights.card import seal_card

REPO = Path(__file__).resolve().parents[2]
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "__pycache__", ".pytest_cache",
              ".hypothesis", "shared"}
#: Modules whose only purpose is (un)pickling arbitrary objects.
_PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib", "marshal"}


def python_files(root: Path = REPO) -> list[Path]:
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel[:-1]):
            continue
        out.append(p)
    return sorted(out)


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def unsafe_deserialisation(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that can unpickle: imports, and calls that load pickles."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in _PICKLING_MODULES:
                    found.append(f"{where}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _PICKLING_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            elif node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load (use torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" or name.endswith(".torch.load"):
                if not _is_true(_kw(node, "weights_only")):
                    found.append(f"{where}: {name}( without weights_only=True")
            elif last == "load" and name.split(".")[0] in {"np", "numpy"}:
                if _is_true(_kw(node, "allow_pickle")):
                    found.append(f"{where}: {name}(allow_pickle=True)")
            elif last in {"read_pickle", "to_pickle"} or name.startswith("joblib."):
                found.append(f"{where}: {name}(")
            elif last in {"load", "loads", "Unpickler"} and name.split(".")[0] in _PICKLING_MODULES:
                found.append(f"{where}: {name}(")
            elif last == "load" and name.split(".")[0] == "yaml" and _kw(node, "Loader") is None:
                found.append(f"{where}: {name}( without a safe Loader")
            elif isinstance(node.func, ast.Name) and node.func.id == "__import__" and node.args and \
                    isinstance(node.args[0], ast.Constant) and str(node.args[0].value) in _PICKLING_MODULES:
                found.append(f"{where}: __import__({node.args[0].value!r})")
    return found


# --------------------------------------------------------------------------- the scan
def test_scanner_finds_every_unsafe_pattern() -> None:
    """The scanner can fail: each pattern below is caught, the safe forms are not."""
    bad = {
        "import pickle": 1, "import cPickle as p": 1, "from pickle import loads": 1, "import dill": 1,
        "import joblib\njoblib.load('m.pkl')": 2, "torch.load('w.pt')": 1, "torch.load('w.pt', weights_only=False)": 1,
        "np.load('a.npy', allow_pickle=True)": 1, "numpy.load(f, allow_pickle=True)": 1, "pd.read_pickle('x')": 1,
        "df.to_pickle('x')": 1, "yaml.load(text)": 1, "from torch import load": 1, "m = __import__('pickle')": 1, "import shelve": 1,
    }
    for src, n in bad.items():
        assert len(unsafe_deserialisation(src)) == n, src
    safe = ["torch.load('w.pt', weights_only=True)", "np.load('a.npz', allow_pickle=False)", "np.load('a.npy')",
            "json.load(fh)", "# import pickle\nx = 1", "'''never pickle'''", "yaml.load(t, Loader=yaml.SafeLoader)",
            "from safetensors.torch import load_file\nload_file('w.safetensors')"]
    for src in safe:
        assert unsafe_deserialisation(src) == [], src


def test_no_pickle_anywhere_in_the_repository() -> None:
    files = python_files()
    assert len(files) > 30 and any(p.name == "resolve.py" for p in files)
    found = []
    for p in files:
        found += unsafe_deserialisation(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


def test_no_pickled_weights_shipped() -> None:
    """Bundled weights are safetensors + JSON cards only (no .pt/.pth/.pkl/.bin/.ckpt)."""
    weights = REPO / "weights"
    shipped = [p for p in weights.rglob("*") if p.is_file()] if weights.is_dir() else []
    bad = [p.name for p in shipped if p.suffix.lower() in {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib"}]
    assert not bad
    for card in (p for p in shipped if p.suffix == ".json"):
        data = json.loads(card.read_text())
        st = card.with_suffix(".safetensors")
        if st.exists():
            assert data.get("sha256") == sha256_file(st), f"{st.name} does not match its card"


# --------------------------------------------------------------------------- weights loading
@pytest.fixture()
def ghist_folder(tmp_path: Path) -> Path:
    from testkit import make_tiny_ghist

    folder = tmp_path / "w"
    folder.mkdir()
    make_tiny_ghist(folder)
    return folder


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit in the last tensor: still valid safetensors, different weights
    path.write_bytes(bytes(data))


def test_good_weights_load(ghist_folder: Path) -> None:
    m = load_ghist(str(ghist_folder), device="cpu")
    assert m.weights_sha256 == sha256_file(ghist_folder / "ghist-her2st.safetensors")
    m2 = load_ghist(device="cpu", path=ghist_folder / "ghist-her2st.safetensors")
    assert m2.weights_sha256 == m.weights_sha256


def test_tampered_weights_are_refused_by_every_loader(ghist_folder: Path) -> None:
    wp = ghist_folder / "ghist-her2st.safetensors"
    _tamper(wp)
    with pytest.raises(WeightsIntegrityError):
        resolve_weights(str(ghist_folder), name="ghist-her2st", kind="ghist")
    with pytest.raises(WeightsIntegrityError):
        load_ghist(str(ghist_folder), device="cpu")
    with pytest.raises(WeightsIntegrityError):
        load_ghist(device="cpu", path=wp)


def test_weights_without_a_sha256_are_refused(ghist_folder: Path) -> None:
    card_path = ghist_folder / "ghist-her2st.json"
    card = json.loads(card_path.read_text())
    card.pop("sha256")
    card.pop("files", None)
    card_path.write_text(json.dumps(card))
    with pytest.raises(WeightsIntegrityError):
        load_ghist(str(ghist_folder), device="cpu")
    with pytest.raises(WeightsIntegrityError):
        load_ghist(device="cpu", path=ghist_folder / "ghist-her2st.safetensors")


def test_weights_changed_after_the_check_are_refused(tmp_path: Path) -> None:
    """load_state_dict hashes the very bytes it parses: a swap after resolve_weights is caught."""
    r = save_weights({"a": torch.arange(10, dtype=torch.float32)}, tmp_path, "m", {"kind": "test"})
    resolved = resolve_weights(str(tmp_path), name="m", kind="test")
    _tamper(r.weights_path)
    with pytest.raises(WeightsIntegrityError):
        load_state_dict(resolved)


def test_pickle_dressed_as_safetensors_is_never_unpickled(tmp_path: Path) -> None:
    """A pickle whose unpickling would create a file, with a card that matches its sha256."""
    marker = tmp_path / "pwned"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    wp = tmp_path / "evil.safetensors"
    wp.write_bytes(payload)
    digest = sha256_file(wp)
    (tmp_path / "evil.json").write_text(json.dumps(seal_card({"name": "evil", "kind": "ghist",  # a well-sealed card
                                                              "config": {"genes": ["A"], "cell_types": ["T"]}}, digest)))
    resolved = resolve_weights(str(tmp_path), name="evil", kind="ghist")
    with pytest.raises(WeightsFormatError):
        load_state_dict(resolved)
    with pytest.raises(WeightsError):
        load_ghist(device="cpu", path=wp)
    assert not marker.exists()


def test_segmenter_weights_are_verified(tmp_path: Path) -> None:
    """The learned nucleus segmenter: tampered, unverifiable or pickle weights are refused."""
    import shutil

    from ghist_core.paths import BUNDLED_WEIGHTS_DIR
    from ghist_core.segmentation.model import SegNet, SegNetConfig, load_learned_segmenter

    cfg = SegNetConfig(widths=(8, 8, 8, 8, 8), blocks=(1, 1, 1, 1, 1), head_width=8)
    torch.manual_seed(0)
    card = {"kind": "segmentation", "architecture": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in cfg.to_dict().items()}}
    wp = save_weights(SegNet(cfg).state_dict(), tmp_path, "seg", card).weights_path
    load_learned_segmenter(str(wp), device="cpu")  # the genuine file loads
    _tamper(wp)
    with pytest.raises(WeightsIntegrityError):
        load_learned_segmenter(str(wp), device="cpu")
    card_path = wp.with_suffix(".json")
    data = json.loads(card_path.read_text())
    data.pop("sha256")
    card_path.write_text(json.dumps(data))
    with pytest.raises(WeightsIntegrityError):
        load_learned_segmenter(str(wp), device="cpu")
    evil = tmp_path / "evil.safetensors"
    marker = tmp_path / "pwned"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    evil_card = {k: v for k, v in data.items() if k != "files"}  # vouches only for evil.safetensors
    (tmp_path / "evil.json").write_text(json.dumps(seal_card(evil_card, sha256_file(evil))))
    with pytest.raises(WeightsFormatError):
        load_learned_segmenter(str(evil), device="cpu")
    assert not marker.exists()
    if (BUNDLED_WEIGHTS_DIR / "nuclei-seg.safetensors").exists():  # the bundled weights pass their own check
        shutil.copy(BUNDLED_WEIGHTS_DIR / "nuclei-seg.json", tmp_path / "bundled.json")
        assert json.loads((tmp_path / "bundled.json").read_text())["sha256"] == sha256_file(
            BUNDLED_WEIGHTS_DIR / "nuclei-seg.safetensors")
