"""Taxonomy: the demo tree, the three input forms, bad trees and (partial) labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from taxonet.taxonomy import UNSPECIFIED, Taxonomy, TaxonomyError, UnknownTaxonError

pytestmark = pytest.mark.unit

TREE_YAML = """\
ranks: [order, family, species]
tree:
  Hymenoptera:
    Vespidae: [Vespula vulgaris]
    Apidae: [Bombus terrestris, Apis mellifera]
  Diptera:
    Syrphidae: [Eristalis tenax]
"""


@pytest.fixture(scope="module")
def demo() -> Taxonomy:
    return Taxonomy.demo()


# ---------------------------------------------------------------------------------------------------- the demo tree
def test_demo_tree_has_4_orders_5_families_9_species(demo: Taxonomy) -> None:
    assert demo.ranks == ("order", "family", "species")
    assert demo.sizes == (4, 5, 9)
    assert demo.depth == 3
    assert demo.describe() == "4 order, 5 family, 9 species"


def test_demo_chains_follow_the_authors_tree(demo: Taxonomy) -> None:
    assert demo.chain_names("species", demo.index("species", "Bombus terrestris")) == [
        "Hymenoptera", "Apidae", "Bombus terrestris"]
    assert demo.chain_names("species", demo.index("species", "Eristalis tenax")) == [
        "Diptera", "Syrphidae", "Eristalis tenax"]
    hymenoptera = demo.index("order", "Hymenoptera")
    assert sorted(demo.names[1][i] for i in demo.children("order", hymenoptera)) == ["Apidae", "Vespidae"]
    apidae = demo.index("family", "Apidae")
    assert sorted(demo.names[2][i] for i in demo.children("family", apidae)) == [
        "Apis mellifera", "Bombus lapidarius", "Bombus terrestris"]
    assert demo.children("species", 0) == []


def test_parent_table_and_allowed_mask_agree(demo: Taxonomy) -> None:
    for level in (1, 2):
        table = demo.parent_table(level)
        mask = demo.allowed_mask(level)
        assert mask.shape == (demo.sizes[level - 1], demo.sizes[level])
        assert (mask.sum(axis=0) == 1).all()  # every child has exactly one parent
        assert (mask.argmax(axis=0) == table).all()
        for child, parent in enumerate(table):
            assert demo.name(level - 1, int(parent)) == demo.chain_names(level, child)[level - 1]
    with pytest.raises(ValueError, match="top rank"):
        demo.parent_table("order")


def test_consistency_of_prediction_chains(demo: Taxonomy) -> None:
    good = demo.encode(["Hymenoptera", "Apidae", "Apis mellifera"])
    bad_species = (good[0], good[1], demo.index("species", "Vespula vulgaris"))
    bad_family = (demo.index("order", "Diptera"), good[1], good[2])
    assert demo.is_consistent(good)
    assert not demo.is_consistent(bad_species)
    assert not demo.is_consistent(bad_family)
    assert demo.consistency(np.array([good, bad_species, bad_family])).tolist() == [True, False, False]


def test_indices_do_not_depend_on_the_order_of_the_input() -> None:
    rows = [["B", "b", "s2"], ["A", "a", "s1"], ["A", "a", "s0"]]
    one = Taxonomy.from_rows(rows)
    two = Taxonomy.from_rows(rows[::-1])
    assert one == two
    assert one.names == (("A", "B"), ("a", "b"), ("s0", "s1", "s2"))
    assert one.parents == ((), (0, 1), (0, 0, 1))


# ---------------------------------------------------------------------------------------------------- input forms
def test_tree_yaml_json_csv_and_rows_forms_give_the_same_taxonomy(tmp_path) -> None:
    from_tree = Taxonomy.loads(TREE_YAML)
    rows = from_tree.rows()
    assert sorted(rows) == sorted([["Hymenoptera", "Vespidae", "Vespula vulgaris"],
                                   ["Hymenoptera", "Apidae", "Bombus terrestris"],
                                   ["Hymenoptera", "Apidae", "Apis mellifera"],
                                   ["Diptera", "Syrphidae", "Eristalis tenax"]])
    from_rows = Taxonomy.from_dict({"ranks": ["order", "family", "species"], "rows": rows})
    from_json = Taxonomy.loads(json.dumps({"ranks": ["order", "family", "species"], "tree": from_tree.tree()}))
    csv_text = "order,family,species\n" + "".join(",".join(r) + "\n" for r in rows) + "\n"
    from_csv = Taxonomy.from_csv(csv_text)
    (tmp_path / "t.csv").write_text(csv_text)
    for other in (from_rows, from_json, from_csv, Taxonomy.load(tmp_path / "t.csv")):
        assert other == from_tree
    for name in ("t.yaml", "t.json"):
        from_tree.save(tmp_path / name)
        assert Taxonomy.load(tmp_path / name) == from_tree
    assert json.loads((tmp_path / "t.json").read_text())["ranks"] == ["order", "family", "species"]


@pytest.mark.parametrize("ranks", [["genus", "species"], ["class", "order", "family", "species"], ["species"]])
def test_rank_names_and_depth_are_configurable(ranks: list[str]) -> None:
    rows = [[f"{r}{i % 2}" if level < len(ranks) - 1 else f"leaf{i}" for level, r in enumerate(ranks)]
            for i in range(4)]
    taxonomy = Taxonomy.from_dict({"ranks": ranks, "rows": rows})
    assert taxonomy.ranks == tuple(ranks)
    assert taxonomy.depth == len(ranks)
    assert taxonomy.sizes[-1] == 4
    assert Taxonomy.loads(taxonomy.to_json()) == taxonomy
    assert taxonomy.encode(rows[3]) == tuple(taxonomy.ancestors(len(ranks) - 1, taxonomy.index(ranks[-1], "leaf3")))


def test_from_dict_needs_exactly_one_form_and_known_keys() -> None:
    with pytest.raises(TaxonomyError, match="exactly one of 'tree' or 'rows'"):
        Taxonomy.from_dict({"ranks": ["order"], "rows": [["A"]], "tree": {"A": None}})
    with pytest.raises(TaxonomyError, match="exactly one"):
        Taxonomy.from_dict({"ranks": ["order"]})
    with pytest.raises(TaxonomyError, match=r"unknown taxonomy keys \['extra'\]"):
        Taxonomy.loads(TREE_YAML + "extra: 1\n")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        Taxonomy.loads("[1, 2")


# ---------------------------------------------------------------------------------------------------- bad trees
def test_species_under_two_families_names_it_and_both_families() -> None:
    with pytest.raises(TaxonomyError, match=r"species 's1' is listed under two family taxa: 'a' and 'b'"):
        Taxonomy.from_rows([["A", "a", "s1"], ["A", "b", "s1"]])
    with pytest.raises(TaxonomyError, match=r"species 's1' is listed under two family"):
        Taxonomy.loads("tree:\n  A:\n    a: [s1]\n    b: [s1, s2]\n")
    with pytest.raises(TaxonomyError, match=r"family 'a' is listed under two order taxa: 'A' and 'B'"):
        Taxonomy.from_rows([["A", "a", "s1"], ["B", "a", "s2"]])


def test_duplicate_names_are_rejected_including_duplicate_yaml_keys() -> None:
    duplicate_order_key = "tree:\n  A:\n    a: [s1]\n  A:\n    b: [s2]\n"
    with pytest.raises(TaxonomyError, match=r"duplicate name 'A' at line 4"):
        Taxonomy.loads(duplicate_order_key)
    duplicate_family_key = "tree:\n  A:\n    a: [s1]\n    a: [s2]\n"
    with pytest.raises(TaxonomyError, match=r"duplicate name 'a'"):
        Taxonomy.loads(duplicate_family_key)
    with pytest.raises(TaxonomyError, match=r"A > a: duplicate name\(s\) \['s1'\]"):
        Taxonomy.loads("tree:\n  A:\n    a: [s1, s1]\n")
    with pytest.raises(TaxonomyError, match=r"duplicate class name 'x'"):
        Taxonomy(ranks=("order",), names=(("x", "x"),), parents=((),))
    with pytest.raises(TaxonomyError, match="duplicate rank names"):
        Taxonomy(ranks=("order", "order"), names=(("x",), ("y",)), parents=((), (0,)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tree:\n  A: {}\n", r"A has no 'family' below it \(empty rank\)"),
        ("tree:\n  A:\n    a: []\n", r"A > a has an empty 'species' list"),
        ("tree: {}\n", r"has no 'order' below it"),
        ("rows: []\n", r"empty taxonomy: no rows"),
        ("tree:\n  A:\n    a: s1\n", r"A > a: expected 'species' names below it"),
        ("tree:\n  A: [a]\n", r"a list is only allowed at the last rank"),
        ("ranks: [order, family]\ntree:\n  A:\n    a: [s1]\n", r"deeper than the 2 ranks"),
        ("ranks: [order, family, species]\nrows:\n  - [A, a]\n", r"row 1: expected 3 names"),
        ("ranks: [order, family, species]\nrows:\n  - [A, '', s1]\n", r"row 1: taxonomy rows must name every rank"),
    ],
)
def test_empty_or_malformed_trees_are_rejected(text: str, message: str) -> None:
    with pytest.raises(TaxonomyError, match=message):
        Taxonomy.loads(text)


def test_empty_rank_and_missing_ranks_in_direct_construction() -> None:
    with pytest.raises(TaxonomyError, match="rank 'family' has no classes"):
        Taxonomy(ranks=("order", "family"), names=(("A",), ()), parents=((), ()))
    with pytest.raises(TaxonomyError, match="at least one rank"):
        Taxonomy(ranks=(), names=(), parents=())
    with pytest.raises(TaxonomyError, match=r"\['B'\] have no 'family' below them"):
        Taxonomy(ranks=("order", "family"), names=(("A", "B"), ("a",)), parents=((), (0,)))
    with pytest.raises(TaxonomyError, match="empty taxonomy CSV"):
        Taxonomy.from_csv("")


# ---------------------------------------------------------------------------------------------------- labels
def test_unknown_rank_names_are_rejected(demo: Taxonomy) -> None:
    with pytest.raises(UnknownTaxonError, match=r"unknown rank\(s\) \['genus'\]; ranks are"):
        demo.encode({"genus": "Bombus", "species": "Bombus terrestris"})
    with pytest.raises(UnknownTaxonError, match="unknown rank 'genus'"):
        demo.level("genus")
    with pytest.raises(UnknownTaxonError, match="rank level 3 out of range"):
        demo.level(3)
    with pytest.raises(UnknownTaxonError, match="unknown rank"):
        demo.num_classes("kingdom")


def test_labels_outside_the_taxonomy_are_named(demo: Taxonomy) -> None:
    with pytest.raises(UnknownTaxonError, match="unknown species 'Apis cerana'"):
        demo.encode(["Hymenoptera", "Apidae", "Apis cerana"])
    with pytest.raises(UnknownTaxonError, match="unknown family 'Culicidae'"):
        demo.encode({"family": "Culicidae"})
    with pytest.raises(UnknownTaxonError, match="expected 3 labels"):
        demo.encode(["Hymenoptera", "Apidae"])
    with pytest.raises(UnknownTaxonError, match="out of range"):
        demo.name("species", 9)
    # str() of the KeyError subclass is the plain message, not a quoted repr
    with pytest.raises(UnknownTaxonError) as excinfo:
        demo.index("order", "Odonata")
    assert str(excinfo.value) == "unknown order 'Odonata'"


def test_partial_labels_are_unspecified_below_and_filled_above(demo: Taxonomy) -> None:
    hymenoptera, apidae = demo.index("order", "Hymenoptera"), demo.index("family", "Apidae")
    apis = demo.index("species", "Apis mellifera")
    assert demo.encode(["Hymenoptera", "Apidae", None]) == (hymenoptera, apidae, UNSPECIFIED)
    assert demo.encode(["Hymenoptera", "", "unspecified"]) == (hymenoptera, UNSPECIFIED, UNSPECIFIED)
    assert demo.encode([None, float("nan"), "n/a"]) == (UNSPECIFIED,) * 3
    # a known family determines its order; a species its whole chain
    assert demo.encode({"family": "Apidae"}) == (hymenoptera, apidae, UNSPECIFIED)
    assert demo.encode({"species": "Apis mellifera"}) == (hymenoptera, apidae, apis)
    assert demo.decode((hymenoptera, apidae, UNSPECIFIED)) == ["Hymenoptera", "Apidae", None]


def test_contradicting_partial_labels_are_errors(demo: Taxonomy) -> None:
    with pytest.raises(UnknownTaxonError, match="family 'Apidae' belongs to order 'Hymenoptera', not 'Diptera'"):
        demo.encode(["Diptera", "Apidae", None])
    with pytest.raises(UnknownTaxonError, match="'Vespula vulgaris' belongs to family 'Vespidae', not 'Apidae'"):
        demo.encode({"family": "Apidae", "species": "Vespula vulgaris"})


def test_subset_keeps_ancestors_and_rejects_unknown_leaves(demo: Taxonomy) -> None:
    small = demo.subset(["Apis mellifera", "Eristalis tenax"])
    assert small.sizes == (2, 2, 2)
    with pytest.raises(UnknownTaxonError, match="Apis cerana"):
        demo.subset(["Apis cerana"])
