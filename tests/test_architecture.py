"""The layer rule of docs/ARCHITECTURE.md, checked on the source with ``ast``.

Every ``import`` in every module of ``ghist_core`` counts, at module level or inside a
function (a lazy import is still a dependency), as does ``importlib.import_module("...")``
with a literal name. Each test lists every violation it finds, with file and line, so one
run shows the whole picture while several people refactor.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import ghist_core

PACKAGE = Path(ghist_core.__file__).resolve().parent

#: Layer of each top-level part of ghist_core (docs/ARCHITECTURE.md): a part imports its own
#: modules and parts of lower layers, never a higher one.
LAYERS: dict[str, int] = {
    "errors": 0,
    "paths": 1, "_keys": 1, "_types": 1, "device": 1, "safe_text": 1,
    "imaging": 2,  # arrays in, arrays out (stain, tissue mask); the Slide's tissue-aware tiling uses it
    "io": 3,
    "weights": 4,
    "segmentation": 5, "model": 5,
    "training": 6, "project": 6,
    "pipeline": 7,
    "analysis": 8,
    "viz": 9,
    "export": 10,  # colours cell types with viz.palette
    "cli": 11,
    "testing": 12,  # test support (Hub server): tests, bench and scripts only
}
#: Parts of one layer that may use each other, with the reason (one direction each).
SAME_LAYER: dict[tuple[str, str], str] = {
    ("model", "segmentation"): "the GHIST model reads the segmenter's nucleus types and pools per-nucleus "
                               "type probabilities with segmentation.features",
}
#: Optional dependencies (install extras) and the only parts allowed to import them; everything
#: else must run on the base install (`ghist predict` in tests/test_packaging.py).
EXTRAS: dict[str, frozenset[str]] = {
    "streamlit": frozenset(),
    "plotly": frozenset({"viz"}),
    "pydeck": frozenset({"viz"}),
    "dask": frozenset({"pipeline"}),
    "distributed": frozenset({"pipeline"}),
}
#: Documented exceptions: (importing module, imported module) -> reason. Each is an import
#: inside a method, so the importing module still loads without the higher layer's extras.
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("ghist_core.analysis.survival", "ghist_core.viz.survival_plots"):
        "lifelines-style results: GroupComparison.plot() (KM curves) and CoxResult.plot() (forest) hand "
        "themselves to the viz figure builders",
    ("ghist_core.analysis.compare", "ghist_core.viz.plots"):
        "lifelines-style results: GroupTests.plot() hands itself to the viz figure builder",
}


@dataclass(frozen=True)
class Import:
    """One import statement: who imports what, and where."""

    module: str  # importing module, e.g. "ghist_core.pipeline.blocks"
    target: str  # imported module, e.g. "ghist_core.io.slide" or "plotly.graph_objects"
    line: int

    @property
    def where(self) -> str:
        return f"{self.module.replace('.', '/')}.py:{self.line}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _public_module(name: str) -> str | None:
    """Where ``from ghist_core import <name>`` really goes (a submodule or the lazy public API)."""
    if (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file():
        return f"ghist_core.{name}"
    return getattr(ghist_core, "_PUBLIC", {}).get(name)


def collect_imports() -> list[Import]:
    """Every import of every module under ghist_core (module level and inside functions)."""
    found: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "_bundled" in path.parts:
            continue
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [Import(module, alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve_from(module, path.name == "__init__.py", node)
                if target == "ghist_core":
                    for alias in node.names:
                        found.append(Import(module, _public_module(alias.name) or "ghist_core", node.lineno))
                else:
                    found.append(Import(module, target, node.lineno))
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)
                  and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                       or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
                found.append(Import(module, node.args[0].value, node.lineno))
    return found


IMPORTS = collect_imports()


def _part(module: str) -> str | None:
    """``ghist_core.pipeline.blocks`` -> ``pipeline``; the package root itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ghist_core" else None


def _report(violations: list[str], rule: str) -> None:
    if violations:
        pytest.fail(f"{len(violations)} import(s) break the rule '{rule}' (docs/ARCHITECTURE.md):\n  "
                    + "\n  ".join(sorted(violations)), pytrace=False)


def test_the_import_scanner_sees_lazy_and_relative_imports() -> None:
    """The rules below are only as good as the scanner: it must see imports inside functions."""
    cli = {i.target for i in IMPORTS if i.module == "ghist_core.cli"}
    assert "ghist_core.errors" in cli  # module level
    assert any(t.startswith("ghist_core.project") for t in cli)  # inside the subcommand functions
    assert any(i.module == "ghist_core" and i.target == "importlib" for i in IMPORTS)


def test_every_part_of_ghist_core_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    missing = sorted(parts - set(LAYERS))
    assert not missing, (f"ghist_core parts without a layer: {missing}; add them to LAYERS here and to the table "
                         f"in docs/ARCHITECTURE.md")


def layer_violations(imports: list[Import]) -> list[str]:
    """Imports of a higher layer, or of another part of the same layer not in SAME_LAYER."""
    violations = []
    for imp in imports:
        src, dst = _part(imp.module), _part(imp.target)
        if src is None or dst is None or src == dst or (imp.module, imp.target) in EXCEPTIONS:
            continue
        if src not in LAYERS or dst not in LAYERS:
            continue  # reported by test_every_part_of_ghist_core_has_a_layer
        if LAYERS[dst] > LAYERS[src]:
            violations.append(f"{imp.where}: {src} (layer {LAYERS[src]}) imports {imp.target} (layer {LAYERS[dst]})")
        elif LAYERS[dst] == LAYERS[src] and (src, dst) not in SAME_LAYER:
            violations.append(f"{imp.where}: {src} imports {imp.target}, another part of layer {LAYERS[src]}")
    return violations


def extras_violations(imports: list[Import]) -> list[str]:
    """Imports of an install extra outside the parts listed for it in EXTRAS."""
    violations = []
    for imp in imports:
        top = imp.target.split(".")[0]
        if top in EXTRAS and _part(imp.module) not in EXTRAS[top] and (imp.module, imp.target) not in EXCEPTIONS:
            allowed = ", ".join(sorted(EXTRAS[top])) or "nowhere in ghist_core"
            violations.append(f"{imp.where}: imports {imp.target} (install extra; allowed in: {allowed})")
    return violations


def test_lower_layers_never_import_higher_ones() -> None:
    _report(layer_violations(IMPORTS), "lower layers never import higher ones")


def test_documented_exceptions_still_exist() -> None:
    """An exception whose import is gone is removed from the list (the list stays honest)."""
    seen = {(i.module, i.target) for i in IMPORTS}
    stale = [f"{m} -> {t}" for m, t in EXCEPTIONS if (m, t) not in seen]
    assert not stale, f"EXCEPTIONS lists imports that no longer exist: {stale}"


def test_product_code_never_imports_the_public_api_root() -> None:
    """Inside ghist_core, import from the owning module: the lazy root API is for users."""
    violations = [f"{i.where}: imports {i.target!r} through 'ghist_core'" for i in IMPORTS
                  if i.target == "ghist_core" and i.module != "ghist_core"]
    _report(violations, "import from the owning module, not from ghist_core's root")


def test_product_code_never_imports_ghist_core_testing() -> None:
    violations = [f"{i.where}: imports {i.target}" for i in IMPORTS
                  if _part(i.target) == "testing" and _part(i.module) != "testing"]
    _report(violations, "ghist_core.testing is imported only by tests, bench and scripts")


def test_ghist_core_never_imports_streamlit() -> None:
    violations = [f"{i.where}: imports {i.target}" for i in IMPORTS if i.target.split(".")[0] == "streamlit"]
    _report(violations, "ghist_core never imports streamlit (pages hold the UI)")


def test_install_extras_are_imported_only_where_they_belong() -> None:
    _report(extras_violations(IMPORTS), "optional dependencies stay in the parts that need them")


def test_the_core_loads_without_the_app_extras() -> None:
    """Importing every module outside viz/export/testing pulls in no UI library (base install)."""
    modules = sorted({i.module for i in IMPORTS if _part(i.module) not in {"viz", "export", "testing"}})
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in ('streamlit', 'plotly', 'pydeck', 'distributed') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [], (
        "importing the core loaded UI/cluster libraries; find the module-level import with "
        "python -X importtime")


@pytest.mark.parametrize("planted, rule", [
    (Import("ghist_core.io.slide", "ghist_core.pipeline.blocks", 1), layer_violations),
    (Import("ghist_core.model.predict", "ghist_core.training.ghist", 1), layer_violations),
    (Import("ghist_core.project.store", "ghist_core.training.her2st", 1), layer_violations),
    (Import("ghist_core.errors", "ghist_core.paths", 1), layer_violations),
    (Import("ghist_core.analysis.cohort", "plotly.graph_objects", 1), extras_violations),
    (Import("ghist_core.pipeline.blocks", "streamlit", 1), extras_violations),
])
def test_the_rules_catch_a_planted_violation(planted: Import, rule) -> None:
    """A bad import planted in the scan is reported, with its file and line (the checks can fail)."""
    (message,) = rule([planted])
    assert planted.where in message


def test_the_rules_accept_allowed_imports() -> None:
    allowed = [Import("ghist_core.pipeline.blocks", "ghist_core.io.slide", 1),
               Import("ghist_core.model.predict", "ghist_core.segmentation.features", 1),
               Import("ghist_core.viz.figures", "plotly.graph_objects", 1),
               Import("ghist_core.io.slide", "numpy", 1)]
    assert layer_violations(allowed) == [] and extras_violations(allowed) == []


def test_test_modules_have_unique_names() -> None:
    """Test folders have no __init__.py, so two test files with one basename break collection."""
    tests = Path(__file__).resolve().parent
    names: dict[str, list[str]] = {}
    for p in tests.rglob("*.py"):
        if p.name != "conftest.py":
            names.setdefault(p.name, []).append(str(p.relative_to(tests)))
    clashes = {n: ps for n, ps in names.items() if len(ps) > 1}
    assert not clashes, f"test modules sharing a name: {clashes}"
