"""The data verbs through the real command line parser: ``prepare``, ``data info`` and ``data synth``."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from taxonet.cli import main
from taxonet.data.dataset import DatasetInfo
from taxonet.taxonomy import Taxonomy

pytestmark = pytest.mark.data


def test_prepare_and_info(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "ds"
    code = main(["prepare", str(image_folder), str(dst), "--taxonomy", "demo", "--max-side", "24", "--shard-size",
                 "10", "--val-fraction", "0.25", "--test-fraction", "0.25", "--seed", "3", "--workers", "0",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "written             36" in out and "Eristalis tenax" in out
    info = DatasetInfo.load(str(dst))
    assert info.metadata["prepare"]["max_side"] == 24 and info.metadata["prepare"]["seed"] == 3
    assert max(s.rows for s in info.shards) <= 10

    assert main(["data", "info", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "verified: " in out and "36 rows" in out
    assert "Apis mellifera" in out and "species" in out

    (dst / info.shards[0].path).unlink()  # damage it: info reports the failed verification
    assert main(["data", "info", str(dst)]) == 1
    assert "verification FAILED" in capsys.readouterr().err


def test_cli_errors_are_one_clear_line(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "info", str(tmp_path / "nothing")]) == 2
    assert "dataset.json is missing" in capsys.readouterr().err
    (image_folder / "Diptera" / "Muscidae" / "Musca domestica").mkdir(parents=True)
    (image_folder / "Diptera" / "Muscidae" / "Musca domestica" / "x.jpg").write_bytes(b"x")
    assert main(["prepare", str(image_folder), str(tmp_path / "ds"), "--taxonomy", "demo", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("taxonet prepare: error: invalid labels") and "species 'Musca domestica'" in err
    assert main(["prepare", str(image_folder), str(tmp_path / "ds"), "--val-fraction", "0.6", "--test-fraction",
                 "0.5"]) == 2
    assert "must leave room for a training split" in capsys.readouterr().err


def test_synth_writes_known_and_unseen_datasets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "synthetic"
    code = main(["data", "synth", str(dst), "--per-species", "5", "--image-size", "32", "--unseen-per-family", "1",
                 "--val-fraction", "0.2", "--test-fraction", "0.2", "--seed", "4"])
    assert code == 0
    assert "unseen species (5)" in capsys.readouterr().out
    known = DatasetInfo.load(str(dst))
    demo = Taxonomy.demo()
    assert known.taxonomy == demo
    assert known.counts["splits"] == {"test": 9, "train": 27, "val": 9}
    assert known.verify()["rows"] == 45

    unseen = DatasetInfo.load(str(dst / "unseen"))
    assert unseen.splits == ("unseen",) and unseen.num_rows() == 25
    new_species = set(unseen.taxonomy.names[2]) - set(demo.names[2])
    assert len(new_species) == 5 and not new_species & set(demo.names[2])
    assert set(unseen.counts["classes"]["species"]) == new_species  # only unseen species in it
    for name in new_species:  # each new species sits under a known family and order
        family = unseen.taxonomy.chain_names("species", unseen.taxonomy.index("species", name))[1]
        assert ("family", family) in demo
    chains = unseen.metadata["unseen_species"]
    assert {c[2] for c in chains} == new_species
    for chain in chains:
        assert unseen.taxonomy.chain_names("species", unseen.taxonomy.index("species", chain[2])) == list(chain)

    # a second run refuses to overwrite without --overwrite
    assert main(["data", "synth", str(dst), "--per-species", "5", "--image-size", "32"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err


def test_synth_adds_bycatch_labelled_to_family_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "synthetic"
    code = main(["data", "synth", str(dst), "--per-species", "6", "--image-size", "32", "--unseen-per-family", "0",
                 "--outliers-per-family", "2", "--seed", "1"])
    assert code == 0
    info = DatasetInfo.load(str(dst))
    demo = Taxonomy.demo()
    assert info.taxonomy == demo  # bycatch names never enter the taxonomy: their labels stop at the family
    assert info.verify()["rows"] == 9 * 6 + 5 * 2 * 3  # 2 bycatch species per family, 6 // 2 images each
    assert sum(info.counts["unspecified"]["species"].values()) == 30
    assert not info.counts["unspecified"].get("family")
    chains = info.metadata["outlier_species"]
    assert len(chains) == 10 and all(c[2].startswith(f"{c[1]} bycatch ") for c in chains)
    assert main(["data", "synth", str(tmp_path / "bad"), "--outliers-per-family", "-1"]) == 2
    assert "--outliers-per-family must be a non-negative integer" in capsys.readouterr().err


def test_prepare_train_size_flag(image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dst = tmp_path / "ds"
    assert main(["prepare", str(image_folder), str(dst), "--taxonomy", "demo", "--train-size", "20", "--workers", "0",
                 "--no-progress"]) == 0
    info = DatasetInfo.load(str(dst))
    assert info.metadata["prepare"]["train_size"] == 20
    sizes = {(w, h) for uri in info.shard_uris() for w, h in zip(*pq.read_table(uri, columns=["width", "height"])
                                                                   .to_pydict().values())}
    assert sizes == {(20, 20)}
    assert main(["prepare", str(image_folder), str(tmp_path / "bad"), "--taxonomy", "demo", "--train-size", "3",
                 "--no-progress"]) == 2
    assert "--train-size must be at least 8 pixels" in capsys.readouterr().err
