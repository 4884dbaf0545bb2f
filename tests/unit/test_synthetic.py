"""data.synthetic: determinism, any depth, unseen species, and that the images are neither trivial nor unlearnable."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taxonet.data.synthetic import (
    PATTERNS,
    SyntheticInsects,
    SyntheticSample,
    synthetic_taxonomy,
    to_arrays,
    unseen_species,
    write_image_folder,
)
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.unit

PATTERN_FIELDS = {"pattern", "pattern_rgb", "pattern_count", "pattern_points"}


@pytest.fixture(scope="module")
def demo() -> Taxonomy:
    return Taxonomy.demo()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def differing_fields(a: object, b: object) -> set[str]:
    return {f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)}


# ---------------------------------------------------------------------- determinism, shapes
def test_same_seed_gives_identical_pixels_and_index_seed_change_them(demo: Taxonomy) -> None:
    chain = tuple(demo.rows()[3])
    first = SyntheticInsects(demo, image_size=40, seed=7)
    second = SyntheticInsects(demo, image_size=40, seed=7)
    assert np.array_equal(pixels(first.render(chain, 5)), pixels(second.render(chain, 5)))
    assert not np.array_equal(pixels(first.render(chain, 5)), pixels(first.render(chain, 6)))
    other_seed = SyntheticInsects(demo, image_size=40, seed=8)
    assert not np.array_equal(pixels(first.render(chain, 5)), pixels(other_seed.render(chain, 5)))


def test_class_appearance_does_not_depend_on_request_order(demo: Taxonomy) -> None:
    forward = SyntheticInsects(demo, image_size=32, seed=3)
    backward = SyntheticInsects(demo, image_size=32, seed=3)
    chains = forward.chains
    # The second generator sees unseen chains first, then the known ones in reverse, via samples() with an offset.
    for chain in unseen_species(demo, seed=3):
        backward.render(chain, 0)
    later = {(s.labels, s.index): pixels(s.image) for s in backward.samples(2, chains=chains[::-1], start_index=4)}
    for chain in chains:
        for index in (4, 5):
            assert np.array_equal(pixels(forward.render(chain, index)), later[(chain, index)]), chain
        assert forward._resolve(chain) == backward._resolve(chain)


def test_class_traits_differ_between_seeds(demo: Taxonomy) -> None:
    chains = [tuple(row) for row in demo.rows()]
    a, b = SyntheticInsects(demo, seed=0), SyntheticInsects(demo, seed=1)
    assert [a._resolve(c) for c in chains] != [b._resolve(c) for c in chains]


@pytest.mark.parametrize("size", [32, 48, 128])
def test_images_are_rgb_of_the_requested_size(demo: Taxonomy, size: int) -> None:
    generator = SyntheticInsects(demo, image_size=size, seed=0)
    samples = list(generator.samples(2))
    assert len(samples) == 2 * 9
    assert all(isinstance(s, SyntheticSample) for s in samples)
    assert {(s.image.mode, s.image.size) for s in samples} == {("RGB", (size, size))}
    images, labels = to_arrays(samples)
    assert images.shape == (18, size, size, 3) and images.dtype == np.uint8
    assert labels == [s.labels for s in samples] and set(labels) == set(generator.chains)
    # Interleaved: every class's image 0 comes before any image 1.
    assert [s.index for s in samples] == [0] * 9 + [1] * 9
    # Not blank: an insect and a cluttered background give a wide range of values in every image.
    assert all(np.ptp(image) > 80 for image in images)


def test_bad_arguments_are_refused_with_a_clear_message(demo: Taxonomy) -> None:
    with pytest.raises(ValueError, match="image_size"):
        SyntheticInsects(demo, image_size=8)
    with pytest.raises(TypeError, match="Taxonomy"):
        SyntheticInsects({"ranks": ["order"]})  # type: ignore[arg-type]
    generator = SyntheticInsects(demo)
    with pytest.raises(ValueError, match="expected 3"):
        generator.render(("Diptera", "Syrphidae"), 0)
    with pytest.raises(ValueError, match="belongs to family 'Syrphidae', not 'Apidae'"):
        generator.render(("Hymenoptera", "Apidae", "Eristalis tenax"), 0)
    with pytest.raises(ValueError, match="index"):
        generator.render(tuple(demo.rows()[0]), -1)
    with pytest.raises(ValueError, match="n_per_class"):
        list(generator.samples(-1))


# ---------------------------------------------------------------------- any depth
def test_two_rank_taxonomy_puts_shape_on_top_and_pattern_on_the_leaf() -> None:
    taxonomy = Taxonomy.from_rows([("Alpha", "a1"), ("Alpha", "a2"), ("Beta", "b1")], ranks=("group", "kind"))
    generator = SyntheticInsects(taxonomy, image_size=32, seed=0)
    images, labels = to_arrays(generator.samples(1))
    assert images.shape == (3, 32, 32, 3) and {len(chain) for chain in labels} == {2}
    a1, a2, b1 = (generator._resolve(c) for c in (("Alpha", "a1"), ("Alpha", "a2"), ("Beta", "b1")))
    assert differing_fields(a1, a2) <= PATTERN_FIELDS and a1.pattern != a2.pattern
    assert {"body_rgb", "plan", "wings"} & differing_fields(a1, b1)


def test_four_rank_taxonomy_gives_every_rank_its_own_trace() -> None:
    rows = [
        ("O1", "F1", "G1", "S1"), ("O1", "F1", "G1", "S2"), ("O1", "F1", "G2", "S3"),
        ("O1", "F2", "G3", "S4"), ("O2", "F3", "G4", "S5"),
    ]
    taxonomy = Taxonomy.from_rows(rows, ranks=("order", "family", "genus", "species"))
    generator = SyntheticInsects(taxonomy, image_size=32, seed=0)
    assert len(list(generator.samples(1))) == 5
    t = {row[-1]: generator._resolve(row) for row in rows}
    # Species under one genus differ only in their pattern.
    assert differing_fields(t["S1"], t["S2"]) <= PATTERN_FIELDS and t["S1"].pattern != t["S2"].pattern
    # Genera under one family differ in a genus-owned shape trait and share the family's.
    genus_diff = differing_fields(t["S1"], t["S3"]) - PATTERN_FIELDS
    assert genus_diff and "body_rgb" not in genus_diff
    # Families under one order differ in family-owned shape, never in the order's colour.
    family_diff = differing_fields(t["S1"], t["S4"]) - PATTERN_FIELDS
    assert family_diff - genus_diff and "body_rgb" not in family_diff
    # Orders differ in colour.
    assert t["S1"].body_rgb != t["S5"].body_rgb


def test_single_rank_taxonomy_renders() -> None:
    taxonomy = Taxonomy.from_rows([("x",), ("y",)], ranks=("species",))
    generator = SyntheticInsects(taxonomy, image_size=32)
    assert generator.render(("x",), 0).size == (32, 32)
    assert generator._resolve(("x",)) != generator._resolve(("y",))
    with pytest.raises(ValueError, match="single rank"):
        unseen_species(taxonomy)


def test_siblings_get_distinct_patterns_even_in_a_crowded_family() -> None:
    taxonomy = synthetic_taxonomy(orders=1, families_per_order=1, species_per_family=20)
    generator = SyntheticInsects(taxonomy, seed=0)
    traits = [generator._resolve(chain) for chain in generator.chains]
    # More siblings than pattern kinds: kinds repeat, but (kind, mark colour, count) never do.
    assert len({(t.pattern, t.pattern_rgb, t.pattern_count, t.pattern_points) for t in traits}) == 20
    assert len({t.pattern for t in traits}) == len(PATTERNS)


def test_synthetic_taxonomy_shape_and_errors() -> None:
    taxonomy = synthetic_taxonomy()
    assert taxonomy.sizes == (3, 5, 12)
    assert taxonomy.rows()[0] == ["Ordo A", "Familia A1", "Species A1a"]
    assert synthetic_taxonomy(orders=2, families_per_order=2, species_per_family=3).sizes == (2, 4, 12)
    with pytest.raises(ValueError, match="families_per_order needs 3 counts"):
        synthetic_taxonomy(orders=3, families_per_order=(1, 2))
    with pytest.raises(ValueError, match="species_per_family must be positive"):
        synthetic_taxonomy(orders=1, families_per_order=1, species_per_family=0)


# ---------------------------------------------------------------------- unseen species
def test_unseen_species_keep_their_parents_and_get_a_new_pattern(demo: Taxonomy) -> None:
    chains = unseen_species(demo, per_family=2, seed=0)
    assert len(chains) == 2 * demo.num_classes("family")
    generator = SyntheticInsects(demo, image_size=32, seed=0)
    for chain in chains:
        family = demo.index("family", chain[1])
        assert list(chain[:2]) == demo.chain_names("family", family)  # real order and family
        assert chain[2] not in demo.names[2] and chain[2].startswith(f"{chain[1]} sp. novum ")
        assert generator.render(chain, 0).size == (32, 32)
        new = generator._resolve(chain)
        siblings = [generator._resolve(tuple(demo.chain_names("species", i))) for i in demo.children("family", family)]
        for known in siblings:
            assert differing_fields(new, known) <= PATTERN_FIELDS  # higher-rank traits come from the ancestors
            assert new.pattern != known.pattern
    # Two new species of one family differ from each other too.
    for family in demo.names[1]:
        pair = [generator._resolve(c) for c in chains if c[1] == family]
        assert pair[0] != pair[1]
    assert unseen_species(demo, per_family=2, seed=0) == chains  # reproducible


def test_outlier_species_wear_known_marks_their_siblings_lack_and_never_the_unseen_ones() -> None:
    taxonomy = synthetic_taxonomy(orders=3, families_per_order=(2, 1, 1), species_per_family=3)
    generator = SyntheticInsects(taxonomy, image_size=32, seed=0)
    unseen = unseen_species(taxonomy, per_family=1, seed=0)
    unseen_kinds = {generator._resolve(c).pattern for c in unseen}
    known_kinds = {generator._resolve(c).pattern for c in generator.chains}
    outliers = generator.outlier_species(per_family=4)
    assert len(outliers) == 4 * taxonomy.num_classes("family")
    for chain in outliers:
        family = taxonomy.index("family", chain[1])
        assert list(chain[:2]) == taxonomy.chain_names("family", family)
        assert chain[2] not in taxonomy.names[2] and chain[2].startswith(f"{chain[1]} bycatch ")
        new = generator._resolve(chain)
        siblings = [generator._resolve(tuple(taxonomy.chain_names("species", i)))
                    for i in taxonomy.children("family", family)]
        for known in siblings:
            assert differing_fields(new, known) <= PATTERN_FIELDS  # a member of the family by every other trait
            assert new.pattern != known.pattern
        assert PATTERNS[new.pattern] in PATTERNS[:8] and new.pattern not in unseen_kinds
    # the exposure set is made of marks known species wear elsewhere, not of the unseen species' marks
    assert {generator._resolve(c).pattern for c in outliers} <= known_kinds | set(range(8))
    assert unseen_kinds.isdisjoint({generator._resolve(c).pattern for c in outliers})
    # rendering them is deterministic, and differs from the unseen species of the same family
    again = SyntheticInsects(taxonomy, image_size=32, seed=0)
    assert again.outlier_species(per_family=4) == outliers
    assert np.array_equal(pixels(again.render(outliers[0], 3)), pixels(generator.render(outliers[0], 3)))
    with pytest.raises(ValueError, match="per_family"):
        generator.outlier_species(per_family=0)


# ---------------------------------------------------------------------- files
def test_write_image_folder_uses_one_folder_per_rank(tmp_path: Path, demo: Taxonomy) -> None:
    generator = SyntheticInsects(demo, image_size=32, seed=0)
    written = write_image_folder(tmp_path, generator.samples(2))
    assert len(written) == 18
    expected = tmp_path / "Hymenoptera" / "Apidae" / "Apis mellifera" / "1.jpg"
    assert expected in written
    with Image.open(expected) as image:
        assert image.format == "JPEG" and image.size == (32, 32)
    bad = SyntheticSample(generator.render(tuple(demo.rows()[0]), 0), ("a/b", "c", "d"), 0)
    with pytest.raises(ValueError, match="folder name"):
        write_image_folder(tmp_path, [bad])


# ---------------------------------------------------------------------- difficulty: not trivial, but learnable
def test_logistic_regression_on_raw_pixels_stays_below_60_percent_species_accuracy(demo: Taxonomy) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    generator = SyntheticInsects(demo, image_size=32, seed=0)
    train_images, train_labels = to_arrays(generator.samples(40))
    test_images, test_labels = to_arrays(generator.samples(20, start_index=40))  # held out: other sample indices
    # One BLAS thread: on a shared 2-core machine, two threads made this fit 25× slower.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(max_iter=200).fit(
            train_images.reshape(len(train_images), -1) / 255.0, [c[-1] for c in train_labels]
        )
    accuracy = model.score(test_images.reshape(len(test_images), -1) / 255.0, [c[-1] for c in test_labels])
    # Chance is 1/9; knowing the family alone would give 5/9 on this tree (three single-species families).
    assert 1 / 9 < accuracy < 0.6


def test_every_rank_is_learnable_by_a_tiny_cnn(demo: Taxonomy) -> None:
    torch = pytest.importorskip("torch")
    from taxonet.models import build_backbone

    generator = SyntheticInsects(demo, image_size=32, seed=0)
    train_images, train_labels = to_arrays(generator.samples(80))
    test_images, test_labels = to_arrays(generator.samples(20, start_index=1000))

    def tensors(images: np.ndarray, labels: list[tuple[str, ...]]) -> tuple[object, list[object]]:
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        y = [torch.tensor([demo.index(level, c[level]) for c in labels]) for level in range(demo.depth)]
        return x, y

    (x_train, y_train), (x_test, y_test) = tensors(train_images, train_labels), tensors(test_images, test_labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and the machine is shared
    try:
        torch.manual_seed(0)
        backbone, dim = build_backbone("tiny_cnn")
        heads = torch.nn.ModuleList(torch.nn.Linear(dim, n) for n in demo.sizes)
        optimizer = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=3e-3)
        epochs, batch = 12, 32
        steps = len(x_train) // batch
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * steps)
        for _ in range(epochs):
            backbone.train()
            order = torch.randperm(len(x_train))
            for step in range(steps):
                rows = order[step * batch:(step + 1) * batch]
                features = backbone(x_train[rows])
                loss = sum(torch.nn.functional.cross_entropy(h(features), y[rows]) for h, y in zip(heads, y_train))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        backbone.eval()
        with torch.no_grad():
            features = backbone(x_test)
            accuracy = {rank: (h(features).argmax(1) == y).float().mean().item()
                        for rank, h, y in zip(demo.ranks, heads, y_test)}
    finally:
        torch.set_num_threads(threads)
    # Every rank leaves a trace a small CNN finds in seconds, far above what a linear model on pixels reaches.
    assert accuracy["order"] >= 0.9, accuracy
    assert accuracy["family"] >= 0.85, accuracy
    assert accuracy["species"] >= 0.7, accuracy
