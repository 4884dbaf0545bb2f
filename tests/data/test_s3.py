"""Datasets on S3 over HTTP (moto's standalone server on 127.0.0.1): prepare into s3://bucket/ds, read it back through
the plain reader, the Collator and Ray Data; storage failures stop a prepare before anything is written."""

from __future__ import annotations

import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from taxonet import storage
from taxonet.data import prepare as prepare_module
from taxonet.data.dataset import DatasetInfo
from taxonet.data.pipeline import Collator, iter_parquet_batches
from taxonet.data.ray_splits import read_split
from taxonet.data.prepare import PrepareOptions, prepare_dataset
from taxonet.data.transforms import TransformSpec
from taxonet.errors import DatasetError, StorageError
from taxonet.taxonomy import Taxonomy

pytestmark = [pytest.mark.data, pytest.mark.integration]

SPEC = TransformSpec(input_size=24)
OPTIONS = PrepareOptions(shard_size=8, row_group_size=4, val_fraction=0.25, test_fraction=0.25, workers=2,
                         progress=False)


def folder_counts(root: Path) -> Counter:
    return Counter(p.parent.relative_to(root).parts for p in root.rglob("*.jpg"))


def test_folder_to_s3_and_back_through_the_pipeline(image_folder: Path, s3_bucket: str, demo_taxonomy: Taxonomy,
                                                    ray_local: None) -> None:
    uri = f"s3://{s3_bucket}/ds"
    result = prepare_dataset(str(image_folder), uri, taxonomy=demo_taxonomy, options=OPTIONS)
    assert result.written == 36
    assert storage.exists(f"{uri}/dataset.json")
    info = DatasetInfo.load(uri)
    assert info.verify()["rows"] == 36
    assert all(storage.exists(u) for u in info.shard_uris())

    # plain reader + Collator: every split, labels equal to the source folders
    expected = folder_counts(image_folder)
    seen: Counter = Counter()
    for split in info.splits:
        collator = Collator(demo_taxonomy, SPEC, train=split == "train")
        n = 0
        for batch in iter_parquet_batches(uri, split, 5, seed=3):
            images, targets = collator(batch)
            assert images.shape[1:] == (3, 24, 24)
            n += images.shape[0]
            seen.update(tuple(demo_taxonomy.decode(t)) for t in targets.tolist())
        assert n == info.num_rows(split) == info.counts["splits"][split]
        assert collator.skipped == 0
    assert seen == expected

    # Ray Data over the same shards (what Ray Train workers get), decoded by the same Collator
    train = read_split(uri, "train", num_cpus=0.5)
    collator = Collator(demo_taxonomy, SPEC, train=True)
    total, species = 0, Counter()
    for batch in train.iter_batches(batch_size=7, batch_format="numpy"):
        images, targets = collator(batch)
        total += images.shape[0]
        species.update(demo_taxonomy.decode(t)[2] for t in targets.tolist())
    assert total == info.num_rows("train") == 18
    assert species == Counter({name: 2 for name in demo_taxonomy.names[2]})  # stratified: 2 train images each


def test_s3_table_source_with_relative_paths(tmp_path: Path, s3_bucket: str, image_folder: Path,
                                             demo_taxonomy: Taxonomy) -> None:
    """A CSV on S3 whose paths are relative to it: images are read from S3 by the worker processes."""
    lines = ["path,order,family,species"]
    for path in sorted(image_folder.rglob("*.jpg"))[:12]:
        relative = path.relative_to(image_folder).as_posix()
        storage.write_bytes(f"s3://{s3_bucket}/raw/{relative}", path.read_bytes())
        lines.append(",".join(['"' + relative + '"', *path.parent.relative_to(image_folder).parts]))
    storage.write_bytes(f"s3://{s3_bucket}/raw/labels.csv", ("\n".join(lines) + "\n").encode())
    result = prepare_dataset(f"s3://{s3_bucket}/raw/labels.csv", f"s3://{s3_bucket}/ds", options=OPTIONS)
    assert result.written == 12 and not result.skipped
    origins = [origin for split in result.info.splits
               for b in iter_parquet_batches(f"s3://{s3_bucket}/ds", split, 50, columns=["origin"])
               for origin in b["origin"]]
    assert len(origins) == 12 and all(o.startswith(f"s3://{s3_bucket}/raw/") for o in origins)


def _set_moto_auth(endpoint: str, allowed_unauthenticated: str) -> None:
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=allowed_unauthenticated.encode(),
                                     method="POST", headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_wrong_credentials_stop_before_anything_is_written(image_folder: Path, s3_server: str, s3_bucket: str,
                                                           demo_taxonomy: Taxonomy) -> None:
    _set_moto_auth(s3_server, "0")  # from now on the server checks signatures like AWS: our key is unknown to it
    try:
        with pytest.raises(StorageError) as caught:
            prepare_dataset(str(image_folder), f"s3://{s3_bucket}/ds", taxonomy=demo_taxonomy, options=OPTIONS)
    finally:
        _set_moto_auth(s3_server, "inf")
    assert "wrong credentials" in str(caught.value) and s3_bucket in str(caught.value)
    assert "taxonet-test-secret" not in str(caught.value)
    assert storage.list_files(f"s3://{s3_bucket}/ds") == []  # no shard, no dataset.json


def test_missing_bucket_is_a_clear_error(image_folder: Path, s3_server: str, demo_taxonomy: Taxonomy) -> None:
    with pytest.raises(StorageError, match="bucket 'taxonet-missing-bucket' does not exist"):
        prepare_dataset(str(image_folder), "s3://taxonet-missing-bucket/ds", taxonomy=demo_taxonomy, options=OPTIONS)
    with pytest.raises(StorageError, match="does not exist"):
        DatasetInfo.load("s3://taxonet-missing-bucket/ds")


def test_interrupted_prepare_on_s3_leaves_no_dataset(image_folder: Path, s3_bucket: str, demo_taxonomy: Taxonomy,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{s3_bucket}/ds"
    original = prepare_module.write_shard

    def fail_after_first(target: str, table, row_group_size: int) -> int:
        if storage.list_files(f"{uri}/shards"):
            raise ConnectionError("connection lost (injected)")
        return original(target, table, row_group_size)

    monkeypatch.setattr(prepare_module, "write_shard", fail_after_first)
    with pytest.raises(ConnectionError):
        prepare_dataset(str(image_folder), uri, taxonomy=demo_taxonomy, options=OPTIONS)
    assert len(storage.list_files(f"{uri}/shards")) == 1 and not storage.exists(f"{uri}/dataset.json")
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        DatasetInfo.load(uri)
    monkeypatch.setattr(prepare_module, "write_shard", original)
    info = prepare_dataset(str(image_folder), uri, taxonomy=demo_taxonomy, options=OPTIONS).info
    assert info.verify()["rows"] == 36
    assert sorted(storage.list_files(f"{uri}/shards")) == sorted(info.shard_uris())
