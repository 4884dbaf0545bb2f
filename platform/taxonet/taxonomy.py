"""Taxonomy: the tree of ranks (order → family → species by default) and everything derived from it.

A :class:`Taxonomy` owns the rank names, the class names per rank (name ↔ index), the parent of every class
(an index into the rank above), the mask of allowed parent/child pairs, the check of a prediction chain, and the
encoding of (possibly partial) labels. Pure Python + NumPy: no torch, no ray.

Two input forms are accepted (YAML or JSON):

* tree form::

      ranks: [order, family, species]
      tree:
        Coleoptera:
          Coccinellidae: [Coccinella septempunctata]

* flat rows (e.g. from a CSV ``order,family,species``)::

      ranks: [order, family, species]
      rows:
        - [Coleoptera, Coccinellidae, Coccinella septempunctata]

Class indices are assigned in sorted name order per rank, so the same tree always gives the same indices
whatever order it was written in.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

#: Index used for a rank whose label is not known ("unspecified"); excluded from that rank's loss and metrics.
UNSPECIFIED = -1
#: Strings accepted as "no label at this rank" in tables and folder names.
UNSPECIFIED_TOKENS = frozenset({"", "unspecified", "unknown", "none", "nan", "na", "n/a", "-"})
DEFAULT_RANKS = ("order", "family", "species")


class TaxonomyError(ValueError):
    """A taxonomy that cannot be built; the message names the offending rank/taxon."""


class UnknownTaxonError(KeyError):
    """A label that is not in the taxonomy (or a chain that breaks it)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


def _load_yaml_unique(text: str) -> Any:
    """yaml.safe_load that refuses duplicate mapping keys (plain YAML silently keeps the last one)."""

    class UniqueKeyLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        mapping: dict = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in mapping:
                raise TaxonomyError(f"duplicate name {key!r} at line {key_node.start_mark.line + 1}")
            mapping[key] = loader.construct_object(value_node, deep=deep)
        return mapping

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise TaxonomyError(f"taxonomy is not valid YAML/JSON: {exc}") from exc


def is_unspecified(label: Any) -> bool:
    """True for None/NaN/empty/"unspecified"-like labels."""
    if label is None:
        return True
    if isinstance(label, float) and label != label:  # NaN from pandas/pyarrow
        return True
    return str(label).strip().lower() in UNSPECIFIED_TOKENS


@dataclass(frozen=True)
class Taxonomy:
    """An immutable taxonomy of ``len(ranks)`` levels.

    Attributes:
        ranks: rank names, top (coarsest) first.
        names: per rank, the class names in index order.
        parents: per rank, the parent index (into the rank above) of each class; ``()`` for the top rank.
    """

    ranks: tuple[str, ...]
    names: tuple[tuple[str, ...], ...]
    parents: tuple[tuple[int, ...], ...]
    _index: tuple[dict[str, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.ranks:
            raise TaxonomyError("a taxonomy needs at least one rank")
        if len(set(self.ranks)) != len(self.ranks):
            raise TaxonomyError(f"duplicate rank names in {list(self.ranks)}")
        if len(self.names) != len(self.ranks) or len(self.parents) != len(self.ranks):
            raise TaxonomyError("names/parents must have one entry per rank")
        index = []
        for level, (rank, names) in enumerate(zip(self.ranks, self.names)):
            if not names:
                raise TaxonomyError(f"rank {rank!r} has no classes")
            seen: dict[str, int] = {}
            for i, name in enumerate(names):
                if not isinstance(name, str) or is_unspecified(name):
                    raise TaxonomyError(f"rank {rank!r}: invalid class name {name!r}")
                if name in seen:
                    raise TaxonomyError(f"rank {rank!r}: duplicate class name {name!r}")
                seen[name] = i
            index.append(seen)
            parents = self.parents[level]
            if level == 0:
                if parents:
                    raise TaxonomyError(f"top rank {rank!r} cannot have parents")
                continue
            if len(parents) != len(names):
                raise TaxonomyError(f"rank {rank!r}: {len(names)} classes but {len(parents)} parents")
            n_up = len(self.names[level - 1])
            for name, p in zip(names, parents):
                if not 0 <= p < n_up:
                    raise TaxonomyError(f"rank {rank!r}: class {name!r} has invalid parent index {p}")
            childless = set(range(n_up)) - set(parents)
            if childless:
                missing = sorted(self.names[level - 1][p] for p in childless)
                raise TaxonomyError(f"rank {self.ranks[level - 1]!r}: {missing} have no {rank!r} below them")
        object.__setattr__(self, "_index", tuple(index))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]], ranks: Sequence[str] = DEFAULT_RANKS) -> "Taxonomy":
        """Build from full-depth rows ``(order, family, species)``; a taxon under two parents is an error."""
        ranks = tuple(str(r) for r in ranks)
        depth = len(ranks)
        parent_of: list[dict[str, str | None]] = [dict() for _ in ranks]
        n_rows = 0
        for row_number, row in enumerate(rows, start=1):
            row = [None if is_unspecified(x) else str(x).strip() for x in row]
            if len(row) != depth:
                raise TaxonomyError(f"row {row_number}: expected {depth} names ({', '.join(ranks)}), got {row}")
            if any(x is None for x in row):
                raise TaxonomyError(f"row {row_number}: taxonomy rows must name every rank, got {row}")
            n_rows += 1
            for level, name in enumerate(row):
                parent = row[level - 1] if level else None
                known = parent_of[level].get(name, ...)
                if known is ...:
                    parent_of[level][name] = parent
                elif known != parent:
                    raise TaxonomyError(
                        f"{ranks[level]} {name!r} is listed under two {ranks[level - 1]} taxa: {known!r} and {parent!r}"
                    )
        if n_rows == 0:
            raise TaxonomyError("empty taxonomy: no rows")
        return cls._from_parent_maps(ranks, parent_of)

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any], ranks: Sequence[str] = DEFAULT_RANKS) -> "Taxonomy":
        """Build from a nested mapping; the last rank may be a list of names."""
        ranks = tuple(str(r) for r in ranks)
        rows: list[list[str]] = []

        def walk(node: Any, prefix: list[str]) -> None:
            level = len(prefix)
            if level == len(ranks):
                if node not in (None, {}, []):
                    raise TaxonomyError(f"{' > '.join(prefix)} is deeper than the {len(ranks)} ranks {list(ranks)}")
                rows.append(list(prefix))
                return
            if isinstance(node, Mapping):
                if not node:
                    where = " > ".join(prefix) or "the tree"
                    raise TaxonomyError(f"{where} has no {ranks[level]!r} below it (empty rank)")
                for name, child in node.items():
                    walk(child, prefix + [str(name)])
            elif isinstance(node, (list, tuple)):
                if not node:
                    raise TaxonomyError(f"{' > '.join(prefix)} has an empty {ranks[level]!r} list")
                if level != len(ranks) - 1:
                    raise TaxonomyError(
                        f"{' > '.join(prefix)}: a list is only allowed at the last rank ({ranks[-1]!r}), "
                        f"here {ranks[level]!r} is expected"
                    )
                names = [str(n) for n in node]
                dup = sorted({n for n in names if names.count(n) > 1})
                if dup:
                    raise TaxonomyError(f"{' > '.join(prefix)}: duplicate name(s) {dup}")
                for name in names:
                    rows.append(prefix + [name])
            else:
                where = " > ".join(prefix) or "the tree"
                raise TaxonomyError(f"{where}: expected {ranks[level]!r} names below it, got {node!r}")

        walk(tree, [])
        return cls.from_rows(rows, ranks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Taxonomy":
        """Build from ``{"ranks": [...], "tree": {...}}`` or ``{"ranks": [...], "rows": [[...], ...]}``."""
        if not isinstance(data, Mapping):
            raise TaxonomyError(f"a taxonomy document must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"ranks", "tree", "rows", "name", "description"}
        if unknown:
            raise TaxonomyError(f"unknown taxonomy keys {sorted(unknown)} (expected ranks, tree or rows)")
        ranks = data.get("ranks", DEFAULT_RANKS)
        if not isinstance(ranks, (list, tuple)) or not all(isinstance(r, str) and r for r in ranks):
            raise TaxonomyError(f"'ranks' must be a list of rank names, got {ranks!r}")
        if ("tree" in data) == ("rows" in data):
            raise TaxonomyError("a taxonomy needs exactly one of 'tree' or 'rows'")
        if "tree" in data:
            return cls.from_tree(data["tree"], ranks)
        return cls.from_rows(data["rows"], ranks)

    @classmethod
    def loads(cls, text: str) -> "Taxonomy":
        """Parse YAML or JSON text (JSON is YAML)."""
        return cls.from_dict(_load_yaml_unique(text))

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        """Load from a YAML/JSON file, or a CSV with one column per rank (header = rank names)."""
        path = Path(path)
        return cls.parse(path.read_text(encoding="utf-8"), path.name)

    @classmethod
    def parse(cls, text: str, name: str) -> "Taxonomy":
        """The text of a taxonomy file named ``name``: CSV when the name ends in .csv, YAML/JSON otherwise."""
        return cls.from_csv(text) if name.lower().endswith(".csv") else cls.loads(text)

    @classmethod
    def from_csv(cls, text: str) -> "Taxonomy":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if not header:
            raise TaxonomyError("empty taxonomy CSV")
        return cls.from_rows((row for row in reader if any(c.strip() for c in row)), [h.strip() for h in header])

    @classmethod
    def demo(cls) -> "Taxonomy":
        """The demo tree of METHOD.md (the authors' code): 4 orders, 5 families, 9 species."""
        text = resources.files("taxonet.configs").joinpath("taxonomy_demo.yaml").read_text(encoding="utf-8")
        return cls.loads(text)

    @classmethod
    def _from_parent_maps(cls, ranks: tuple[str, ...], parent_of: list[dict[str, str | None]]) -> "Taxonomy":
        names = tuple(tuple(sorted(level_map)) for level_map in parent_of)
        parents: list[tuple[int, ...]] = [()]
        for level in range(1, len(ranks)):
            up = {n: i for i, n in enumerate(names[level - 1])}
            parents.append(tuple(up[parent_of[level][n]] for n in names[level]))
        return cls(ranks=ranks, names=names, parents=tuple(parents))

    # ------------------------------------------------------------------ serialisation
    def rows(self) -> list[list[str]]:
        """One full chain per leaf, top rank first."""
        return [self.chain_names(self.depth - 1, i) for i in range(self.num_classes(self.depth - 1))]

    def to_dict(self) -> dict[str, Any]:
        return {"ranks": list(self.ranks), "tree": self.tree()}

    def tree(self) -> dict[str, Any]:
        """Nested mapping, the last rank as lists."""
        root: dict[str, Any] = {}
        for chain in self.rows():
            node = root
            for name in chain[:-2]:
                node = node.setdefault(name, {})
            if len(chain) == 1:
                root[chain[0]] = None
            else:
                node.setdefault(chain[-2], []).append(chain[-1])
        return root

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
        else:
            path.write_text(self.to_json(), encoding="utf-8")

    # ------------------------------------------------------------------ lookups
    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(n) for n in self.names)

    def num_classes(self, rank: str | int) -> int:
        return len(self.names[self.level(rank)])

    def level(self, rank: str | int) -> int:
        """Rank name (or level) → level index, with a clear error for an unknown rank."""
        if isinstance(rank, int) and not isinstance(rank, bool):
            if not 0 <= rank < self.depth:
                raise UnknownTaxonError(f"rank level {rank} out of range 0..{self.depth - 1}")
            return rank
        try:
            return self.ranks.index(rank)
        except ValueError:
            raise UnknownTaxonError(f"unknown rank {rank!r}; ranks are {list(self.ranks)}") from None

    def index(self, rank: str | int, name: str) -> int:
        level = self.level(rank)
        try:
            return self._index[level][name]
        except KeyError:
            raise UnknownTaxonError(f"unknown {self.ranks[level]} {name!r}") from None

    def name(self, rank: str | int, index: int) -> str:
        level = self.level(rank)
        if not 0 <= index < len(self.names[level]):
            raise UnknownTaxonError(f"{self.ranks[level]} index {index} out of range")
        return self.names[level][index]

    def __contains__(self, item: tuple[str, str]) -> bool:
        rank, name = item
        return name in self._index[self.level(rank)]

    def parent_table(self, rank: str | int) -> np.ndarray:
        """int64 array: parent index (at rank−1) of every class at ``rank`` (level ≥ 1)."""
        level = self.level(rank)
        if level == 0:
            raise ValueError("the top rank has no parents")
        return np.asarray(self.parents[level], dtype=np.int64)

    def allowed_mask(self, rank: str | int) -> np.ndarray:
        """bool array [n_{rank-1}, n_rank]: True where (parent, child) is an edge of the tree."""
        level = self.level(rank)
        table = self.parent_table(level)
        mask = np.zeros((len(self.names[level - 1]), len(table)), dtype=bool)
        mask[table, np.arange(len(table))] = True
        return mask

    def ancestors(self, rank: str | int, index: int) -> list[int]:
        """Indices of the chain from the top rank down to (and including) ``index`` at ``rank``."""
        level = self.level(rank)
        chain = [index]
        for lv in range(level, 0, -1):
            chain.append(self.parents[lv][chain[-1]])
        return chain[::-1]

    def chain_names(self, rank: str | int, index: int) -> list[str]:
        return [self.names[lv][i] for lv, i in enumerate(self.ancestors(rank, index))]

    def children(self, rank: str | int, index: int) -> list[int]:
        """Indices at rank+1 whose parent is ``index``."""
        level = self.level(rank)
        if level + 1 >= self.depth:
            return []
        return [i for i, p in enumerate(self.parents[level + 1]) if p == index]

    # ------------------------------------------------------------------ labels and chains
    def encode(self, labels: Sequence[Any] | Mapping[str, Any]) -> tuple[int, ...]:
        """Labels (per rank, top first, or a ``{rank: name}`` mapping) → indices, ``UNSPECIFIED`` for unknown ranks.

        A partial label must be a prefix: once a rank is unspecified, all lower ranks are too. Given lower-rank
        names determine their parents, so a missing parent is filled in and a contradicting one is an error.
        """
        if isinstance(labels, Mapping):
            unknown = set(labels) - set(self.ranks)
            if unknown:
                raise UnknownTaxonError(f"unknown rank(s) {sorted(unknown)}; ranks are {list(self.ranks)}")
            values = [labels.get(r) for r in self.ranks]
        else:
            values = list(labels)
            if len(values) != self.depth:
                raise UnknownTaxonError(f"expected {self.depth} labels ({', '.join(self.ranks)}), got {values}")
        out = [UNSPECIFIED] * self.depth
        for level, value in enumerate(values):
            if is_unspecified(value):
                continue
            out[level] = self.index(level, str(value).strip())
        # fill parents of the deepest known rank; check that given ones agree
        deepest = max((lv for lv, v in enumerate(out) if v != UNSPECIFIED), default=None)
        if deepest is None:
            return tuple(out)
        chain = self.ancestors(deepest, out[deepest])
        for level in range(deepest):
            if out[level] != UNSPECIFIED and out[level] != chain[level]:
                raise UnknownTaxonError(
                    f"{self.ranks[deepest]} {self.names[deepest][out[deepest]]!r} belongs to "
                    f"{self.ranks[level]} {self.names[level][chain[level]]!r}, not {self.names[level][out[level]]!r}"
                )
            out[level] = chain[level]
        return tuple(out)

    def decode(self, indices: Sequence[int]) -> list[str | None]:
        return [None if i == UNSPECIFIED else self.names[lv][i] for lv, i in enumerate(indices)]

    def is_consistent(self, indices: Sequence[int]) -> bool:
        """True if every (parent, child) pair of a predicted chain is an edge of the tree."""
        if len(indices) != self.depth:
            raise ValueError(f"expected {self.depth} indices, got {len(indices)}")
        return all(self.parents[lv][indices[lv]] == indices[lv - 1] for lv in range(1, self.depth))

    def consistency(self, predictions: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`is_consistent` for an int array [N, depth] → bool [N]."""
        predictions = np.asarray(predictions)
        ok = np.ones(len(predictions), dtype=bool)
        for lv in range(1, self.depth):
            ok &= self.parent_table(lv)[predictions[:, lv]] == predictions[:, lv - 1]
        return ok

    def subset(self, leaves: Iterable[str]) -> "Taxonomy":
        """A taxonomy holding only the given leaf classes (and their ancestors)."""
        wanted = set(leaves)
        rows = [r for r in self.rows() if r[-1] in wanted]
        missing = wanted - {r[-1] for r in rows}
        if missing:
            raise UnknownTaxonError(f"unknown {self.ranks[-1]} {sorted(missing)}")
        return Taxonomy.from_rows(rows, self.ranks)

    def describe(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in zip(self.ranks, self.sizes))
