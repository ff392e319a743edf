"""How far to trust each predicted gene and cell type: the held-out reliability in the model card.

A model card may carry two optional fields, written by the benchmark that trained the model::

    "gene_reliability": {"rule": "...", "floor": "...", "units": ["B4", ..., "C"],
                         "genes": {"ERBB2": {"pcc_mean": 0.21, "pcc_min": 0.05, "pcc_max": 0.4,
                                             "floor_pcc_mean": 0.18, "beats_floor": true}, ...}}
    "type_reliability": {"rule": "...",
                         "types": {"Malignant": {"pcc_mean": 0.4, "baseline_pcc_mean": 0.2,
                                                 "beats_baseline": true}, ...}}

``pcc_*`` are held-out Pearson r (mean, min and max over the held-out units); a gene is
reliable when it beats the floor, a baseline that predicts expression from cell density
alone. :meth:`Reliability.from_card` / :meth:`Reliability.from_adata` read them (the card
sits in ``uns["ghist"]["model_card"]`` of every prediction); older cards and user-supplied
models have neither field, and a malformed one counts as absent: reliability is then
unknown (:attr:`Reliability.known` is False) and nothing is marked or hidden. Reading never
raises.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from ghist_core import _keys as K

__all__ = ["NOT_RELIABLE", "TYPE_NOT_RELIABLE", "UNKNOWN", "GeneReliability", "TypeReliability", "Reliability"]

#: The warning shown beside a gene that does no better than cell density on held-out tissue.
NOT_RELIABLE = "not reliable: no better than cell density"
#: The warning shown beside a cell type whose held-out composition is no better than the baseline.
TYPE_NOT_RELIABLE = "not reliable: no better than the baseline"
#: What is said when the model card has no reliability.
UNKNOWN = "reliability unknown for this model"
#: Values of the column :meth:`Reliability.annotate` adds.
RELIABLE, UNRELIABLE, UNKNOWN_MARK = "reliable", "not reliable", "unknown"

GENE_FIELD, TYPE_FIELD = "gene_reliability", "type_reliability"


@dataclass(frozen=True)
class GeneReliability:
    """One gene's held-out Pearson r (mean, min, max over the held-out units) and its floor's."""

    gene: str
    pcc_mean: float
    pcc_min: float | None = None
    pcc_max: float | None = None
    floor_pcc_mean: float | None = None
    beats_floor: bool = False

    @property
    def label(self) -> str:
        """``"r = 0.21 (0.05–0.40) · beats cell density"`` or :data:`NOT_RELIABLE` with the numbers."""
        if not self.beats_floor:
            floor = f"; cell density alone {self.floor_pcc_mean:.2f}" if self.floor_pcc_mean is not None else ""
            return f"{NOT_RELIABLE} (r = {self.pcc_mean:.2f}{floor})"
        spread = (f" ({self.pcc_min:.2f}–{self.pcc_max:.2f})"
                  if self.pcc_min is not None and self.pcc_max is not None else "")
        return f"r = {self.pcc_mean:.2f}{spread} · beats cell density"


@dataclass(frozen=True)
class TypeReliability:
    """One cell type's held-out agreement (Pearson r over spots) with the reference composition."""

    cell_type: str
    pcc_mean: float
    baseline_pcc_mean: float | None = None
    beats_baseline: bool = False

    @property
    def label(self) -> str:
        """``"r = 0.40 · beats the baseline (0.20)"`` or :data:`TYPE_NOT_RELIABLE` with the numbers."""
        base = f"{self.baseline_pcc_mean:.2f}" if self.baseline_pcc_mean is not None else ""
        if not self.beats_baseline:
            return f"{TYPE_NOT_RELIABLE} (r = {self.pcc_mean:.2f}{'; baseline ' + base if base else ''})"
        return f"r = {self.pcc_mean:.2f} · beats the baseline{f' ({base})' if base else ''}"


@dataclass(frozen=True, eq=True)
class Reliability:
    """The reliability of a model's genes and cell types, as its card states it.

    Make one with :meth:`from_card`, :meth:`from_adata` or :meth:`from_h5ad`; the
    constructor is for tests. A gene or type the card does not list is *unknown*: not
    reliable, and sorted last.

    Attributes
    ----------
    genes : gene → :class:`GeneReliability` (empty when unknown).
    types : cell type → :class:`TypeReliability` (empty when unknown).
    rule, floor, units : the card's words for how genes were judged, what the floor is, and
        the held-out units.
    type_rule : the card's words for how cell types were judged.
    """

    genes: dict[str, GeneReliability] = field(default_factory=dict)
    types: dict[str, TypeReliability] = field(default_factory=dict)
    rule: str = ""
    floor: str = ""
    units: tuple[str, ...] = ()
    type_rule: str = ""

    __hash__ = None  # type: ignore[assignment]  # holds dicts

    # --- reading ------------------------------------------------------------------------
    @classmethod
    def from_card(cls, card: Mapping | str | bytes | None) -> "Reliability":
        """The reliability in a model card (a mapping or its JSON text); unknown when absent or malformed."""
        try:
            card = _mapping(card)
            if card is None:
                return cls()
            genes, rule, floor, units = _read_genes(card.get(GENE_FIELD))
            types, type_rule = _read_types(card.get(TYPE_FIELD))
        except Exception:  # anything unexpected in a card reads as "not stated"
            return cls()
        return cls(genes, types, rule, floor, units, type_rule)

    @classmethod
    def from_adata(cls, adata: Any) -> "Reliability":
        """The reliability in a prediction's ``uns["ghist"]["model_card"]`` (unknown when there is none)."""
        try:
            uns = getattr(adata, "uns", None)
            ghist = _mapping(uns.get(K.UNS_GHIST) if hasattr(uns, "get") else None)
            card = ghist.get(K.GHIST_MODEL_CARD, ghist.get("card")) if ghist is not None else None
        except Exception:
            return cls()
        return cls.from_card(card)

    @classmethod
    def from_h5ad(cls, path: Any) -> "Reliability":
        """The reliability in a prediction file, reading only its model card (not the cells)."""
        try:
            import h5py
            from anndata.io import read_elem

            with h5py.File(path, "r") as f:
                node = f.get(f"uns/{K.UNS_GHIST}/{K.GHIST_MODEL_CARD}")
                return cls.from_card(read_elem(node) if node is not None else None)
        except Exception:  # a missing or unreadable file: unknown, never an error on a page
            return cls()

    @classmethod
    def shared(cls, items: Iterable["Reliability"]) -> tuple["Reliability", int]:
        """The one reliability of several predictions and the number of distinct ones.

        Predictions made by different models (more than one distinct reliability) share
        none: the result is unknown.
        """
        distinct: list[Reliability] = []
        for r in items:
            if r not in distinct:
                distinct.append(r)
        return (distinct[0] if len(distinct) == 1 else cls()), len(distinct)

    # --- genes --------------------------------------------------------------------------
    @property
    def known(self) -> bool:
        """Whether the card states any gene's reliability."""
        return bool(self.genes)

    def gene(self, name: str) -> GeneReliability | None:
        """The gene's record, or ``None`` when the card does not list it."""
        return self.genes.get(str(name))

    def is_reliable(self, gene: str) -> bool:
        """Whether the card lists the gene as beating the floor."""
        g = self.gene(gene)
        return g is not None and g.beats_floor

    def reliable_genes(self, genes: Iterable[str]) -> list[str]:
        """The genes that beat the floor, in the order given (none when reliability is unknown)."""
        return [g for g in genes if self.is_reliable(g)]

    def sorted_genes(self, genes: Iterable[str]) -> list[str]:
        """Reliable genes first, then the others, each by held-out r (highest first); unlisted genes
        last in the order given (so all of them when reliability is unknown)."""
        genes = list(genes)
        listed = sorted((g for g in genes if self.gene(g) is not None),
                        key=lambda g: (not self.genes[g].beats_floor, -self.genes[g].pcc_mean))
        return listed + [g for g in genes if self.gene(g) is None]

    def gene_choices(self, genes: Iterable[str], *, include_unreliable: bool = False) -> list[str]:
        """The genes to offer in a picker: by :meth:`sorted_genes`, only the reliable ones unless
        ``include_unreliable``; every gene in the order given when reliability is unknown."""
        genes = list(genes)
        if not self.known:
            return genes
        ordered = self.sorted_genes(genes)
        return ordered if include_unreliable else [g for g in ordered if self.is_reliable(g)]

    def label(self, gene: str) -> str:
        """A short text: ``"r = 0.21 (0.05–0.40) · beats cell density"``, :data:`NOT_RELIABLE` (with
        the numbers), or that reliability is unknown."""
        g = self.gene(gene)
        if g is not None:
            return g.label
        return UNKNOWN if not self.known else "reliability unknown for this gene"

    def option_label(self, gene: str) -> str:
        """The gene as a picker shows it: ``"ERBB2 · r 0.21"``, ``"ESR1 · not reliable"``, or the bare
        name when reliability is unknown."""
        if not self.known:
            return str(gene)
        g = self.gene(gene)
        if g is None:
            return f"{gene} · reliability unknown"
        return f"{gene} · r {g.pcc_mean:.2f}" if g.beats_floor else f"{gene} · not reliable"

    def mark(self, gene: str) -> str:
        """``"reliable"``, ``"not reliable"`` or ``"unknown"``."""
        g = self.gene(gene)
        return UNKNOWN_MARK if g is None else (RELIABLE if g.beats_floor else UNRELIABLE)

    def annotate(self, table: Any, *, gene_col: str = "feature", key_added: str = "reliability") -> Any:
        """A copy of ``table`` (a DataFrame with a gene column) with a ``key_added`` column of :meth:`mark`."""
        out = table.copy()
        out[key_added] = [self.mark(g) for g in out[gene_col].astype(str)] if len(out) else []
        return out

    def describe(self) -> str:
        """What "reliable" means for this model, in words (the card's own rule and floor appended)."""
        if not self.known:
            return (f"{UNKNOWN[0].upper()}{UNKNOWN[1:]}: its card states no held-out test per gene, so every "
                    "gene is offered and none is marked.")
        units = f" ({len(self.units)} held-out units: {', '.join(self.units)})" if self.units else ""
        text = ("A gene is reliable when its predicted expression agreed with the measured expression on "
                f"tissue the model never saw in training{units} better than a baseline fitted on cell density "
                "alone (the nuclei in each spot). The number is the held-out Pearson r "
                "(mean, and its range over the held-out units). The map of a gene that is not reliable mostly "
                "shows where cells are dense.")
        if self.rule:
            text += f" Rule: {self.rule}."
        if self.floor:
            text += f" Baseline: {self.floor}."
        return text

    # --- cell types ---------------------------------------------------------------------
    @property
    def types_known(self) -> bool:
        """Whether the card states any cell type's reliability."""
        return bool(self.types)

    def type_label(self, cell_type: str) -> str:
        """A short text like :meth:`label` for a cell type."""
        t = self.types.get(str(cell_type))
        if t is not None:
            return t.label
        return UNKNOWN if not self.types_known else "reliability unknown for this type"

    def reliable_types(self, types: Iterable[str]) -> list[str]:
        """The types that beat the baseline, in the order given (none when unknown)."""
        return [t for t in types if (r := self.types.get(str(t))) is not None and r.beats_baseline]

    def describe_types(self, types: Iterable[str] | None = None) -> str:
        """One sentence naming the reliable and unreliable types (of ``types``, default all listed) with their r."""
        if not self.types_known:
            return f"Cell types: {UNKNOWN}."
        names = [str(t) for t in (self.types if types is None else types)]
        listed = [self.types[t] for t in names if t in self.types]
        good = sorted((t for t in listed if t.beats_baseline), key=lambda t: -t.pcc_mean)
        bad = sorted((t for t in listed if not t.beats_baseline), key=lambda t: -t.pcc_mean)
        parts = []
        if good:
            parts.append("Reliable cell types (held-out r of their composition): "
                         + ", ".join(f"{t.cell_type} {t.pcc_mean:.2f}" for t in good) + ".")
        if bad:
            parts.append("Not reliable (no better than the baseline): "
                         + ", ".join(f"{t.cell_type} {t.pcc_mean:.2f}" for t in bad) + ".")
        unlisted = [t for t in names if t not in self.types]
        if unlisted:
            parts.append("Not tested: " + ", ".join(unlisted) + ".")
        if self.type_rule:
            parts.append(f"Rule: {self.type_rule}.")
        return " ".join(parts)

    def __repr__(self) -> str:
        if not self.known and not self.types_known:
            return "<Reliability unknown>"
        n_good = sum(g.beats_floor for g in self.genes.values())
        n_types = sum(t.beats_baseline for t in self.types.values())
        return (f"<Reliability: {n_good} of {len(self.genes)} genes, "
                f"{n_types} of {len(self.types)} cell types beat their baseline>")


# --- tolerant parsing: anything malformed reads as "not stated" ---------------------------

def _mapping(value: Any) -> Mapping | None:
    """A mapping, or the mapping a JSON text holds; ``None`` for anything else."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, Mapping) else None


def _number(value: Any) -> float | None:
    """A finite float (numpy scalars and numeric text too), else ``None``."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _flag(value: Any) -> bool | None:
    """A boolean from a bool, numpy bool, 0/1 or ``"true"``/``"false"``; ``None`` otherwise."""
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    if type(value).__name__ in ("bool", "bool_") or (_number(value) in (0.0, 1.0)):
        return bool(value)
    return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _records(value: Any, name_key: str) -> dict[str, Mapping]:
    """``{name: record}`` from a mapping of records or a list of records with ``name_key``."""
    if isinstance(value, (str, bytes)):
        value = _mapping(value)
    out: dict[str, Mapping] = {}
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((r.get(name_key), r) for r in map(_mapping, value) if r is not None)
    else:
        return out
    for name, rec in items:
        rec = _mapping(rec)
        if rec is not None and isinstance(name, str) and name:
            out[name] = rec
    return out


def _read_genes(value: Any) -> tuple[dict[str, GeneReliability], str, str, tuple[str, ...]]:
    block = _mapping(value)
    if block is None:
        return {}, "", "", ()
    genes = {}
    for name, rec in _records(block.get("genes"), "gene").items():
        pcc, beats = _number(rec.get("pcc_mean")), _flag(rec.get("beats_floor"))
        if pcc is None or beats is None:  # without both there is no claim to show
            continue
        genes[name] = GeneReliability(name, pcc, _number(rec.get("pcc_min")), _number(rec.get("pcc_max")),
                                      _number(rec.get("floor_pcc_mean")), beats)
    units = block.get("units")
    units = tuple(str(u) for u in units) if hasattr(units, "__iter__") and not isinstance(units, (str, bytes, Mapping)) else ()
    return genes, _text(block.get("rule")), _text(block.get("floor")), units


def _read_types(value: Any) -> tuple[dict[str, TypeReliability], str]:
    block = _mapping(value)
    if block is None:
        return {}, ""
    types = {}
    for name, rec in _records(block.get("types"), "cell_type").items():
        pcc, beats = _number(rec.get("pcc_mean")), _flag(rec.get("beats_baseline"))
        if pcc is None or beats is None:
            continue
        types[name] = TypeReliability(name, pcc, _number(rec.get("baseline_pcc_mean")), beats)
    return types, _text(block.get("rule"))
