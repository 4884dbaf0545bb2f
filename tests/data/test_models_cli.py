"""``taxonet models``: the registry verbs end to end through the CLI, one-line errors, and ``stage-weights``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from taxonet import registry, storage
from taxonet.cli import main
from tests.checkpoint_support import other_taxonomy, tiny_checkpoint

pytestmark = [pytest.mark.data, pytest.mark.timeout(300)]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def models(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "models")
    return f"s3://{request.getfixturevalue('s3_bucket')}/models"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_publish_list_show_promote_rollback(models: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = tiny_checkpoint(tmp_path / "a", version="run-a", seed=1)
    second = tiny_checkpoint(tmp_path / "b", version="run-b", seed=2)
    model = storage.join(models, "demo")
    code, out, _ = run(capsys, "models", "publish", str(first), model, "--alias", "production")
    assert code == 0 and f"{model}@1" in out and "production → version 1" in out
    code, out, _ = run(capsys, "models", "publish", str(second), model)
    assert code == 0 and f"{model}@2" in out

    code, out, _ = run(capsys, "models", "list", models)
    assert code == 0 and out.split("\t")[0] == "demo" and "production → 1" in out
    code, out, _ = run(capsys, "models", "list", models, "demo")
    rows = [line.split("\t") for line in out.strip().splitlines()[1:]]
    assert [(r[0], r[2]) for r in rows] == [("1", "production"), ("2", "-")]

    code, out, _ = run(capsys, "models", "promote", model, "2", "--alias", "production")
    assert code == 0 and "production → version 2 (was 1)" in out
    code, out, _ = run(capsys, "models", "show", f"{model}@production")
    shown = json.loads(out)
    assert shown["version"] == "2" and shown["verified"] and shown["source"]["version"] == "run-b"
    code, out, _ = run(capsys, "models", "verify", f"{model}@production")
    assert code == 0 and "verified" in out
    code, out, _ = run(capsys, "models", "rollback", model, "--alias", "production")
    assert code == 0 and "version 1 (rolled back from 2)" in out
    assert registry.resolve(f"{model}@production").version == "1"


def test_errors_are_one_clear_line(models: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = storage.join(models, "demo")
    main(["models", "publish", str(tiny_checkpoint(tmp_path / "a")), model, "--alias", "production"])
    main(["models", "publish", str(tiny_checkpoint(tmp_path / "t", taxonomy=other_taxonomy())), model])
    capsys.readouterr()
    cases = [
        (["models", "show", f"{model}@staging"], "alias 'staging' of model 'demo' does not exist yet"),
        (["models", "promote", model, "2", "--alias", "production"], "taxonomy differs"),
        (["models", "promote", model, "7", "--alias", "production"], "does not verify"),
        (["models", "rollback", model, "--alias", "production"], "no previous version"),
        (["models", "list", "gs://bucket/models"], "unsupported storage URI"),
        (["models", "publish", str(tmp_path / "absent"), model], "not a complete taxonet checkpoint"),
        (["models", "promote", model, "1", "--alias", "9lives"], "invalid alias"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, out, _ = run(capsys, "models", "promote", model, "2", "--alias", "production", "--allow-taxonomy-change")
    assert code == 0 and "version 2" in out


# ---------------------------------------------------------------------------------------------------- stage-weights
def _torchvision_file(path: Path, builder: str = "mobilenet_v3_small") -> Path:
    """A file shaped like torchvision's ImageNet weights for ``builder`` (random values: the shapes are what count)."""
    import torch
    import torchvision

    torch.save(getattr(torchvision.models, builder)(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("target", ["file", "s3"])
def test_stage_weights_from_a_file(target: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   request: pytest.FixtureRequest) -> None:
    from taxonet.config import ModelConfig
    from taxonet.models import build_backbone
    from taxonet.train.loop import pretrained_weights

    source = _torchvision_file(tmp_path / "mobilenet.pth")
    if target == "s3":
        uri = f"s3://{request.getfixturevalue('s3_bucket')}/weights/mobilenet_v3_small.pth"
        capsys.readouterr()  # the moto server, when this test starts it, prints its banner to the captured stdout
    else:
        uri = str(tmp_path / "staged" / "mobilenet_v3_small.pth")
    code, out, _ = run(capsys, "models", "stage-weights", "mobilenet_v3_small", uri, "--from", str(source))
    assert code == 0 and json.loads(out)["use"] == f"--set model.weights={uri}"
    assert storage.read_bytes(uri) == source.read_bytes()
    # what training does with model.weights=URI
    module, dim = build_backbone("mobilenet_v3_small",
                                 pretrained_weights(ModelConfig(backbone="mobilenet_v3_small", weights=uri)))
    assert dim == 576


def test_stage_weights_downloads_through_torchvision(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet here: torchvision's download cache is filled beforehand, as a download would leave it."""
    import torchvision

    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    _torchvision_file(cache / weights.url.rsplit("/", 1)[-1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code, out, _ = run(capsys, "models", "stage-weights", "mobilenet_v3_small", str(tmp_path / "staged") + "/")
    assert code == 0
    staged = json.loads(out)["uri"]
    assert staged == str(tmp_path / "staged" / weights.url.rsplit("/", 1)[-1]) and Path(staged).stat().st_size > 1e6


def test_stage_weights_errors(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torch.hub

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    target = tmp_path / "staged" / "w.pth"
    code, _, err = run(capsys, "models", "stage-weights", "mobilenet_v3_small", str(target))
    assert code == 2 and "could not download" in err and "--from FILE" in err
    wrong = _torchvision_file(tmp_path / "resnet18.pth", "resnet18")
    code, _, err = run(capsys, "models", "stage-weights", "mobilenet_v3_small", str(target), "--from", str(wrong))
    assert code == 2 and "do not fit backbone 'mobilenet_v3_small'" in err
    code, _, err = run(capsys, "models", "stage-weights", "resnet5000", str(target))
    assert code == 2 and "unknown backbone" in err
    code, _, err = run(capsys, "models", "stage-weights", "mobilenet_v3_small", "gs://bucket/w.pth", "--from",
                       str(wrong))
    assert code == 2 and "unsupported storage URI" in err
    assert not target.exists()  # nothing written by any failed attempt
