"""prepare: folder trees, word-named folders and tables in; validated, deduplicated, resized, split, sharded out.

Every bad input of the issue has a test here: labels outside the taxonomy, a taxon under two parents, corrupt /
truncated / zero-byte / non-image files, duplicates, an existing dataset, and a prepare killed midway.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from taxonet import storage
from taxonet.data import prepare as prepare_module
from taxonet.data.dataset import DATASET_JSON, DatasetInfo
from taxonet.data.prepare import PrepareOptions, assign_splits, labels_from_folder, prepare_dataset
from taxonet.errors import DatasetError
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.data

FAST = dict(workers=0, progress=False)


def read_rows(dataset: str | Path) -> list[dict]:
    """Every row of every listed shard (without the image bytes)."""
    info = DatasetInfo.load(str(dataset))
    rows = []
    for uri in info.shard_uris():
        table = pq.read_table(uri, columns=[c for c in pq.read_schema(uri).names if c != "image"])
        rows.extend(table.to_pylist())
    return rows


def folder_labels(path: str, root: Path) -> tuple[str, ...]:
    return tuple(Path(path).relative_to(root).parts[:-1])


# ---------------------------------------------------------------------------------------------------- happy paths
def test_folder_tree_to_local_dataset(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    dst = tmp_path / "ds"
    result = prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy,
                             options=PrepareOptions(shard_size=5, val_fraction=0.25, test_fraction=0.25, workers=2,
                                                    progress=False))
    info = DatasetInfo.load(str(dst))
    assert info.num_rows() == 36 and result.written == 36 and result.files_found == 36
    # stratified by species: 4 images each → 2 train, 1 val, 1 test per species
    assert info.counts["splits"] == {"test": 9, "train": 18, "val": 9}
    for name in demo_taxonomy.names[2]:
        assert info.counts["classes"]["species"][name] == {"test": 1, "train": 2, "val": 1}
    assert all(len({s.split for s in info.shards if s.path == shard.path}) == 1 for shard in info.shards)
    assert max(s.rows for s in info.shards) <= 5
    assert info.taxonomy == demo_taxonomy
    rows = read_rows(dst)
    assert len(rows) == 36 and len({r["sha256"] for r in rows}) == 36
    for row in rows:  # every row carries the labels of its source folder
        assert (row["order"], row["family"], row["species"]) == folder_labels(row["origin"], image_folder)
        assert row["source"] == "src" and (row["width"], row["height"]) == (32, 32)
    assert info.verify()["rows"] == 36
    # the shard files on disk are exactly the listed ones
    assert sorted(storage.relative_to(u, str(dst)) for u in storage.list_files(str(dst / "shards"))) == \
        sorted(s.path for s in info.shards)


def test_split_is_reproducible_from_the_seed(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    def splits(name: str, seed: int) -> dict[str, str]:
        prepare_dataset(str(image_folder), str(tmp_path / name), taxonomy=demo_taxonomy,
                        options=PrepareOptions(seed=seed, val_fraction=0.25, test_fraction=0.25, **FAST))
        return {r["sha256"]: r["split"] for r in read_rows(tmp_path / name)}

    first, again, other = splits("a", 7), splits("b", 7), splits("c", 8)
    assert first == again
    assert first != other


def test_assign_splits_is_stratified_and_order_independent() -> None:
    strata = [f"species-{i % 3}" for i in range(30)]
    keys = [f"{i:04d}" for i in range(30)]
    given = [None] * 29 + ["test"]
    out = assign_splits(strata, keys, given, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert out[29] == "test"  # a given split is kept
    for stratum in {"species-0", "species-1", "species-2"}:
        members = [s for s, st, g in zip(out, strata, given) if st == stratum and g is None]
        n = len(members)
        assert Counter(members) == Counter({"train": n - 2 * round(n * 0.2), "val": round(n * 0.2),
                                            "test": round(n * 0.2)})
    reversed_out = assign_splits(strata[::-1], keys[::-1], given[::-1], 0.2, 0.2, seed=3)[::-1]
    assert reversed_out == out
    # a stratum of one keeps its single example for training
    assert assign_splits(["x"], ["k"], [None], 0.4, 0.4, seed=0) == ["train"]


def test_images_are_resized_to_max_side_and_reencoded(tmp_path: Path, image_bytes: Callable[..., bytes],
                                                      demo_taxonomy: Taxonomy) -> None:
    folder = tmp_path / "src" / "Diptera" / "Syrphidae" / "Eristalis tenax"
    folder.mkdir(parents=True)
    (folder / "wide.png").write_bytes(image_bytes(size=(300, 150), fmt="PNG"))
    (folder / "small.jpg").write_bytes(image_bytes(colour=(10, 200, 10), size=(40, 30)))
    prepare_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), taxonomy=demo_taxonomy,
                    options=PrepareOptions(max_side=64, val_fraction=0.0, test_fraction=0.0, **FAST))
    info = DatasetInfo.load(str(tmp_path / "ds"))
    table = pq.read_table(info.shard_uris()[0])
    sizes = {}
    for row in table.to_pylist():
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (row["width"], row["height"])
        sizes[Path(row["origin"]).name] = image.size
    assert sizes == {"wide.png": (64, 32), "small.jpg": (40, 30)}  # never upscaled


def test_folders_named_order_family_genus_species(tmp_path: Path, image_bytes: Callable[..., bytes],
                                                  demo_taxonomy: Taxonomy) -> None:
    src = tmp_path / "src"
    folders = {
        "Diptera Syrphidae Eristalis tenax": ("Diptera", "Syrphidae", "Eristalis tenax"),
        "Hymenoptera Apidae": ("Hymenoptera", "Apidae", None),  # family known, species not
        "Lepidoptera": ("Lepidoptera", None, None),  # order only
    }
    colour = 0
    for name in folders:
        (src / name).mkdir(parents=True)
        for i in range(2):
            colour += 30
            (src / name / f"{i}.jpg").write_bytes(image_bytes(colour=(colour, 90, 160)))
    prepare_dataset(str(src), str(tmp_path / "ds"), taxonomy=demo_taxonomy, options=PrepareOptions(**FAST))
    rows = read_rows(tmp_path / "ds")
    assert len(rows) == 6
    for row in rows:
        expected = folders[Path(row["origin"]).parent.name]
        assert (row["order"], row["family"], row["species"]) == expected
    counts = DatasetInfo.load(str(tmp_path / "ds")).counts
    assert sum(counts["unspecified"]["species"].values()) == 4
    assert sum(counts["unspecified"]["family"].values()) == 2


def test_labels_from_folder_rules() -> None:
    assert labels_from_folder(["Coleoptera Coccinellidae Coccinella septempunctata"], 3) == \
        ("Coleoptera", "Coccinellidae", "Coccinella septempunctata")
    assert labels_from_folder(["Diptera", "Syrphidae"], 3) == ("Diptera", "Syrphidae", None)
    assert labels_from_folder(["Diptera", "unknown", "x"], 3)[1] is None
    with pytest.raises(ValueError, match="4 folder levels"):
        labels_from_folder(["a", "b", "c", "d"], 3)


def test_taxonomy_is_inferred_when_not_given(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    prepare_dataset(str(image_folder), str(tmp_path / "ds"), options=PrepareOptions(**FAST))
    assert DatasetInfo.load(str(tmp_path / "ds")).taxonomy == demo_taxonomy


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_input(kind: str, tmp_path: Path, image_bytes: Callable[..., bytes], demo_taxonomy: Taxonomy) -> None:
    images = tmp_path / "table" / "img"
    images.mkdir(parents=True)
    rows = []
    chains = [("Diptera", "Syrphidae", "Eristalis tenax"), ("Hymenoptera", "Apidae", "Apis mellifera"),
              ("Hymenoptera", "Vespidae", "")]
    for i in range(9):
        (images / f"{i}.jpg").write_bytes(image_bytes(colour=(20 * i, 100, 50)))
        order, family, species = chains[i % 3]
        rows.append({"path": f"img/{i}.jpg", "order": order, "family": family, "species": species,
                     "split": "test" if i == 0 else "", "source": "field-station"})
    rows.append({"path": "img/absent.jpg", "order": "Diptera", "family": "", "species": "", "split": "",
                 "source": ""})
    table_path = tmp_path / "table" / f"labels.{kind}"
    if kind == "csv":
        with table_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), table_path)
    result = prepare_dataset(str(table_path), str(tmp_path / "ds"), taxonomy=demo_taxonomy,
                             options=PrepareOptions(**FAST))
    assert result.written == 9
    assert [(s.reason, Path(s.path).name) for s in result.skipped] == [("missing", "absent.jpg")]
    written = {Path(r["origin"]).name: r for r in read_rows(tmp_path / "ds")}
    assert written["0.jpg"]["split"] == "test"  # a split given in the table is kept
    assert written["2.jpg"]["species"] is None and written["2.jpg"]["family"] == "Vespidae"
    assert written["1.jpg"]["species"] == "Apis mellifera" and written["1.jpg"]["source"] == "field-station"


def test_table_missing_columns_is_an_error(tmp_path: Path) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("path,order\nimg/0.jpg,Diptera\n")
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['family', 'species'\]"):
        prepare_dataset(str(table), str(tmp_path / "ds"), options=PrepareOptions(**FAST))
    assert not (tmp_path / "ds").exists()


# ---------------------------------------------------------------------------------------------------- bad input
def test_labels_outside_the_taxonomy_are_listed_and_nothing_is_written(image_folder: Path, tmp_path: Path,
                                                                         image_bytes: Callable[..., bytes],
                                                                         demo_taxonomy: Taxonomy) -> None:
    for name in ("Diptera/Muscidae/Musca domestica", "Odonata/Aeshnidae/Aeshna cyanea"):
        (image_folder / name).mkdir(parents=True)
        (image_folder / name / "0.jpg").write_bytes(image_bytes(colour=(1, 2, len(name))))
    dst = tmp_path / "ds"
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy, options=PrepareOptions(**FAST))
    message = str(caught.value)
    assert "nothing was written" in message
    for label in ("family 'Muscidae'", "species 'Musca domestica'", "order 'Odonata'", "species 'Aeshna cyanea'"):
        assert label in message
    assert "Musca domestica/0.jpg" in message  # an example file for each
    assert not dst.exists()


def test_taxon_under_two_parents_is_an_error(image_folder: Path, tmp_path: Path, image_bytes: Callable[..., bytes],
                                             demo_taxonomy: Taxonomy) -> None:
    wrong = image_folder / "Diptera" / "Apidae" / "Apis mellifera"
    wrong.mkdir(parents=True)
    (wrong / "0.jpg").write_bytes(image_bytes(colour=(5, 5, 5)))
    # inferred taxonomy: Apidae seen under Hymenoptera and Diptera
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(str(image_folder), str(tmp_path / "inferred"), options=PrepareOptions(**FAST))
    assert "family 'Apidae' is under 2 order taxa" in str(caught.value)
    assert "'Diptera' (1 file" in str(caught.value) and "'Hymenoptera' (12 files" in str(caught.value)
    # given taxonomy: the label chain contradicts it
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(str(image_folder), str(tmp_path / "given"), taxonomy=demo_taxonomy,
                        options=PrepareOptions(**FAST))
    assert "contradict the taxonomy" in str(caught.value)
    assert "belongs to order 'Hymenoptera', not 'Diptera'" in str(caught.value)
    assert not (tmp_path / "inferred").exists() and not (tmp_path / "given").exists()


def test_bad_files_are_skipped_listed_and_counted(image_folder: Path, tmp_path: Path,
                                                  demo_taxonomy: Taxonomy) -> None:
    folder = image_folder / "Diptera" / "Syrphidae" / "Eristalis tenax"
    good = (folder / "0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("field notes, not an image")
    (folder / "random.png").write_bytes(os.urandom(300))
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are ignored, not reported
    (image_folder / "stray.jpg").write_bytes(good[:100] + b"x")  # at the root: no label folder
    result = prepare_dataset(str(image_folder), str(tmp_path / "ds"), taxonomy=demo_taxonomy,
                             options=PrepareOptions(workers=2, progress=False))
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert reasons == {"truncated.jpg": "corrupt", "zero.jpg": "empty", "notes.txt": "corrupt",
                       "random.png": "corrupt", "stray.jpg": "unlabelled"}
    assert result.written == 36
    info = DatasetInfo.load(str(tmp_path / "ds"))
    assert info.report["skipped"]["count"] == 5
    assert info.report["skipped"]["by_reason"] == {"corrupt": 3, "empty": 1, "unlabelled": 1}
    listed = {Path(f["path"]).name for f in info.report["skipped"]["files"]}
    assert listed == set(reasons)
    summary = result.format_summary()
    assert "truncated.jpg" in summary and "skipped" in summary and "corrupt" in summary


def test_duplicates_are_dropped_and_counted(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    source = image_folder / "Diptera" / "Syrphidae" / "Eristalis tenax" / "1.jpg"
    shutil.copy(source, source.with_name("z-copy.jpg"))
    shutil.copy(source, image_folder / "Lepidoptera" / "Nymphalidae" / "Aglais urticae" / "9.jpg")
    result = prepare_dataset(str(image_folder), str(tmp_path / "ds"), taxonomy=demo_taxonomy,
                             options=PrepareOptions(**FAST))
    assert result.written == 36 and len(result.duplicates) == 2
    by_name = {Path(d["path"]).name: d for d in result.duplicates}
    assert by_name["z-copy.jpg"]["same_labels"] is True
    assert by_name["9.jpg"]["same_labels"] is False
    assert all(d["duplicate_of"] == str(source) for d in result.duplicates)
    info = DatasetInfo.load(str(tmp_path / "ds"))
    assert info.report["duplicates"]["count"] == 2
    assert len({r["sha256"] for r in read_rows(tmp_path / "ds")}) == 36


def test_existing_dataset_needs_overwrite(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    dst = tmp_path / "ds"
    prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy, options=PrepareOptions(**FAST))
    before = DatasetInfo.load(str(dst))
    with pytest.raises(DatasetError, match="already holds a dataset"):
        prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy, options=PrepareOptions(**FAST))
    assert DatasetInfo.load(str(dst)).shards == before.shards  # untouched
    prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy,
                    options=PrepareOptions(overwrite=True, seed=1, **FAST))
    after = DatasetInfo.load(str(dst))
    assert after.shards != before.shards and after.num_rows() == 36
    assert len(storage.list_files(str(dst / "shards"))) == len(after.shards)  # the replaced shards are gone
    after.verify()


def test_load_refuses_a_prefix_without_dataset_json(tmp_path: Path) -> None:
    (tmp_path / "half" / "shards").mkdir(parents=True)
    (tmp_path / "half" / "shards" / "part-train-00000-x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        DatasetInfo.load(str(tmp_path / "half"))


def test_verify_finds_damaged_datasets(image_folder: Path, tmp_path: Path, demo_taxonomy: Taxonomy) -> None:
    dst = tmp_path / "ds"
    prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy,
                    options=PrepareOptions(shard_size=10, **FAST))
    document = json.loads((dst / DATASET_JSON).read_text())
    document["counts"]["classes"]["species"]["Apis mellifera"]["train"] += 1
    (dst / DATASET_JSON).write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=r"counts\['classes'\]"):
        DatasetInfo.load(str(dst)).verify()
    info = DatasetInfo.load(str(dst))
    (dst / info.shards[0].path).unlink()
    (dst / info.shards[1].path).write_bytes(b"not parquet")
    with pytest.raises(DatasetError) as caught:
        info.verify()
    assert f"{info.shards[0].path}: missing" in str(caught.value)
    assert f"{info.shards[1].path}: not a valid Parquet file" in str(caught.value)


def test_injected_failure_leaves_no_dataset_and_a_rerun_succeeds(image_folder: Path, tmp_path: Path,
                                                                 demo_taxonomy: Taxonomy,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "ds"
    original = prepare_module.write_shard
    calls = []

    def failing(uri: str, table, row_group_size: int) -> int:
        calls.append(uri)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return original(uri, table, row_group_size)

    monkeypatch.setattr(prepare_module, "write_shard", failing)
    with pytest.raises(OSError, match="injected"):
        prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy,
                        options=PrepareOptions(shard_size=5, **FAST))
    assert len(storage.list_files(str(dst / "shards"))) == 1  # one shard made it: a half-written dataset
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        DatasetInfo.load(str(dst))
    monkeypatch.setattr(prepare_module, "write_shard", original)
    prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy, options=PrepareOptions(shard_size=5, **FAST))
    info = DatasetInfo.load(str(dst))
    assert info.verify()["rows"] == 36
    assert len(storage.list_files(str(dst / "shards"))) == len(info.shards)  # the leftover shard was removed


KILLED_PREPARE = textwrap.dedent("""
    import pathlib, sys, time
    import taxonet.data.prepare as prepare

    original = prepare.write_shard

    def write_then_hang(uri, table, row_group_size):
        size = original(uri, table, row_group_size)
        pathlib.Path(sys.argv[3]).write_text(uri)  # tell the test a shard is on disk
        time.sleep(300)
        return size

    prepare.write_shard = write_then_hang
    from taxonet.cli import main
    sys.exit(main(["prepare", sys.argv[1], sys.argv[2], "--taxonomy", "demo", "--shard-size", "5", "--workers", "0",
                   "--no-progress"]))
""")


def test_prepare_killed_midway_leaves_no_readable_dataset(image_folder: Path, tmp_path: Path,
                                                          demo_taxonomy: Taxonomy) -> None:
    dst, marker, script = tmp_path / "ds", tmp_path / "first-shard-written", tmp_path / "killed_prepare.py"
    script.write_text(KILLED_PREPARE)
    process = subprocess.Popen([sys.executable, str(script), str(image_folder), str(dst), str(marker)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the prepare never wrote its first shard"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert Path(marker.read_text()).exists()  # killed after the first shard...
    with pytest.raises(DatasetError, match="dataset.json is missing"):
        DatasetInfo.load(str(dst))  # ...and nothing readable is left
    result = prepare_dataset(str(image_folder), str(dst), taxonomy=demo_taxonomy,
                             options=PrepareOptions(shard_size=5, **FAST))
    assert result.info.verify()["rows"] == 36
    assert not Path(marker.read_text()).exists()  # the orphan shard of the killed run is gone


def test_train_size_stores_every_crop_at_the_input_size(tmp_path: Path, image_bytes: Callable[..., bytes],
                                                        demo_taxonomy: Taxonomy) -> None:
    folder = tmp_path / "src" / "Diptera" / "Syrphidae" / "Eristalis tenax"
    folder.mkdir(parents=True)
    (folder / "wide.png").write_bytes(image_bytes(size=(300, 150), fmt="PNG"))
    (folder / "small.jpg").write_bytes(image_bytes(colour=(10, 200, 10), size=(40, 30)))
    (folder / "exact.jpg").write_bytes(image_bytes(colour=(10, 10, 200), size=(48, 48)))
    prepare_dataset(str(tmp_path / "src"), str(tmp_path / "ds"), taxonomy=demo_taxonomy,
                    options=PrepareOptions(train_size=48, max_side=64, val_fraction=0.0, test_fraction=0.0, **FAST))
    info = DatasetInfo.load(str(tmp_path / "ds"))
    assert info.metadata["prepare"]["train_size"] == 48
    rows = pq.read_table(info.shard_uris()[0]).to_pylist()
    assert len(rows) == 3
    for row in rows:  # squashed to N x N, as the eval transform does at the input size; small ones upscaled
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "JPEG" and image.size == (48, 48) == (row["width"], row["height"])
    with pytest.raises(DatasetError, match="--train-size must be at least 8 pixels"):
        PrepareOptions(train_size=4)
