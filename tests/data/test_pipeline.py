"""pipeline: the plain pyarrow reader (sharding, shuffling) and the Collator (decode, transforms, labels, bad
records)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from taxonet.data.dataset import DatasetInfo
from taxonet.data.pipeline import Collator, iter_parquet_batches
from taxonet.data.prepare import PrepareOptions, prepare_dataset
from taxonet.data.transforms import TransformSpec, build_eval_transform, decode_image
from taxonet.errors import DatasetError
from taxonet.taxonomy import UNSPECIFIED, Taxonomy

pytestmark = pytest.mark.data

SPEC = TransformSpec(input_size=24)


@pytest.fixture()
def dataset(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> str:
    """36 images, 9 species; train 18 / val 9 / test 9, shards of 5 rows in row groups of 2."""
    dst = tmp_path / "ds"
    prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy,
                    options=PrepareOptions(shard_size=5, row_group_size=2, val_fraction=0.25, test_fraction=0.25,
                                           workers=0, progress=False))
    return str(dst)


def rows_of(batches) -> list[str]:
    return [sha for batch in batches for sha in batch["sha256"]]


# ---------------------------------------------------------------------------------------------------- reader
def test_reader_yields_every_row_of_the_split_once(dataset: str) -> None:
    batches = list(iter_parquet_batches(dataset, "train", 4, columns=["image", "species", "sha256", "width"]))
    assert [len(b["sha256"]) for b in batches] == [4, 4, 4, 4, 2]
    shas = rows_of(batches)
    assert len(shas) == 18 and len(set(shas)) == 18
    assert isinstance(batches[0]["image"][0], bytes) and isinstance(batches[0]["width"], np.ndarray)
    assert len(rows_of(iter_parquet_batches(dataset, "train", 4, columns=["sha256"], drop_last=True))) == 16
    with pytest.raises(DatasetError, match="no split 'holdout'"):
        next(iter_parquet_batches(dataset, "holdout", 4))


def test_reader_shards_are_disjoint_and_cover_the_split(dataset: str) -> None:
    parts = [rows_of(iter_parquet_batches(dataset, "train", 3, columns=["sha256"], seed=5, shard_index=i,
                                          num_shards=3)) for i in range(3)]
    assert all(parts)
    assert sum(len(p) for p in parts) == 18 and len(set().union(*map(set, parts))) == 18
    with pytest.raises(ValueError, match="shard_index"):
        next(iter_parquet_batches(dataset, "train", 3, shard_index=3, num_shards=3))


def test_reader_shuffle_follows_the_seed(dataset: str) -> None:
    def order(**kwargs) -> list[str]:
        return rows_of(iter_parquet_batches(dataset, "train", 5, columns=["sha256"], **kwargs))

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert sorted(order(seed=1)) == sorted(order(seed=2))
    assert order(shuffle=False) == order(shuffle=False, seed=9)  # unshuffled: the stored order


def test_plain_reader_does_not_import_ray(dataset: str) -> None:
    code = ("import sys; from taxonet.data.pipeline import iter_parquet_batches; "
            f"n = sum(len(b['image']) for b in iter_parquet_batches({dataset!r}, 'val', 4)); "
            "assert 'ray' not in sys.modules, 'ray was imported'; print(n)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "9"


# ---------------------------------------------------------------------------------------------------- collator
def test_collator_eval_matches_the_eval_transform(dataset: str, demo_taxonomy: Taxonomy) -> None:
    batch = next(iter_parquet_batches(dataset, "val", 9, shuffle=False))
    images, targets = Collator(demo_taxonomy, SPEC, train=False)(batch)
    assert images.shape == (9, 3, 24, 24) and images.dtype == torch.float32
    assert targets.shape == (9, 3) and targets.dtype == torch.long
    transform = build_eval_transform(SPEC)
    for i in range(9):  # the very transform serving uses: no restated preprocessing
        assert torch.equal(images[i], transform(decode_image(batch["image"][i])))
        assert demo_taxonomy.decode(targets[i].tolist()) == [batch[r][i] for r in demo_taxonomy.ranks]
        assert demo_taxonomy.is_consistent(targets[i].tolist())


def test_collator_threads_give_the_same_eval_batch(dataset: str, demo_taxonomy: Taxonomy) -> None:
    batch = next(iter_parquet_batches(dataset, "train", 8, shuffle=False))
    one = Collator(demo_taxonomy, SPEC, train=False)(batch)
    threaded = Collator(demo_taxonomy, SPEC, train=False, threads=3)
    four = threaded(batch)
    threaded.close()
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])


def test_collator_train_transform_augments(dataset: str, demo_taxonomy: Taxonomy) -> None:
    batch = next(iter_parquet_batches(dataset, "train", 6, shuffle=False))
    collator = Collator(demo_taxonomy, SPEC, train=True)
    torch.manual_seed(0)
    first, targets = collator(batch)
    second, _ = collator(batch)
    assert first.shape == (6, 3, 24, 24) and targets.shape == (6, 3)
    assert not torch.equal(first, second)  # random augmentations differ between epochs
    assert torch.isfinite(first).all()


def test_collator_skips_and_counts_bad_records(demo_taxonomy: Taxonomy, image_bytes: Callable[..., bytes],
                                               caplog: pytest.LogCaptureFixture) -> None:
    good = image_bytes(size=(30, 20))
    batch = {
        "image": [good, b"", good[: len(good) // 3], b"GIF89a-not-really", good, None],
        "order": ["Diptera", "Diptera", "Diptera", "Diptera", "Hymenoptera", "Diptera"],
        "family": ["Syrphidae", None, None, None, None, None],
        "species": ["Eristalis tenax", None, None, None, None, None],
    }
    collator = Collator(demo_taxonomy, SPEC, train=False)
    with caplog.at_level("WARNING"):
        images, targets = collator(batch)
    assert images.shape == (2, 3, 24, 24)
    expected_first = demo_taxonomy.encode(["Diptera", "Syrphidae", "Eristalis tenax"])
    assert targets.tolist() == [list(expected_first),
                                [demo_taxonomy.index("order", "Hymenoptera"), UNSPECIFIED, UNSPECIFIED]]
    assert collator.skipped == 4 and collator.skipped_by_reason == {"corrupt": 4}
    assert "skipping a record" in caplog.text

    all_bad = {"image": [b"", b"junk"], "order": ["Diptera"] * 2, "family": [None] * 2, "species": [None] * 2}
    images, targets = collator(all_bad)
    assert images.shape == (0, 3, 24, 24) and targets.shape == (0, 3) and targets.dtype == torch.long
    assert collator.skipped == 6


def test_collator_unknown_labels(demo_taxonomy: Taxonomy, image_bytes: Callable[..., bytes]) -> None:
    batch = {"image": [image_bytes()], "order": ["Hymenoptera"], "family": ["Apidae"],
             "species": ["Apidae sp. novum 1"]}
    skipping = Collator(demo_taxonomy, SPEC, train=False)
    images, _ = skipping(batch)
    assert images.shape[0] == 0 and skipping.skipped_by_reason == {"unknown_label": 1}
    keeping = Collator(demo_taxonomy, SPEC, train=False, unknown="unspecified")
    images, targets = keeping(batch)  # an unseen species keeps its known family and order
    assert targets.tolist() == [[demo_taxonomy.index("order", "Hymenoptera"), demo_taxonomy.index("family", "Apidae"),
                                 UNSPECIFIED]]


def test_collator_is_picklable(demo_taxonomy: Taxonomy, image_bytes: Callable[..., bytes]) -> None:
    import pickle

    collator = pickle.loads(pickle.dumps(Collator(demo_taxonomy, SPEC, train=True, threads=2)))
    images, _ = collator({"image": [image_bytes()] * 2, "order": ["Diptera"] * 2, "family": [None] * 2,
                          "species": [None] * 2})
    assert images.shape == (2, 3, 24, 24)


def test_dataset_json_is_plain_json_with_the_taxonomy(dataset: str, demo_taxonomy: Taxonomy) -> None:
    document = json.loads((Path(dataset) / "dataset.json").read_text())
    assert document["schema_version"] == 1
    assert Taxonomy.from_dict(document["taxonomy"]) == demo_taxonomy
    assert document["columns"] == ["image", "order", "family", "species", "split", "source", "sha256", "width",
                                   "height", "origin"]
    assert sum(s["rows"] for s in document["shards"]) == document["counts"]["total"] == 36
    assert DatasetInfo.load(dataset).splits == ("train", "val", "test")
