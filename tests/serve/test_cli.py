"""The ``taxonet classify`` and ``taxonet serve`` verbs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from taxonet.cli import main
from taxonet.serve.predictor import Predictor

from .helpers import encode, wait_for

TOKEN = "cli-token-77"


@pytest.fixture()
def image_files(tmp_path: Path, insect_images: list) -> list[Path]:
    paths = []
    for index, (_, image) in enumerate(insect_images[:2]):
        path = tmp_path / f"insect{index}.{'jpg' if index == 0 else 'png'}"
        path.write_bytes(encode(image, "JPEG" if index == 0 else "PNG"))
        paths.append(path)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return [*paths, bad]


@pytest.mark.unit
def test_classify_with_a_checkpoint_answers_each_file(checkpoint: Path, image_files: list[Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["classify", str(checkpoint), *map(str, image_files), "--device", "cpu"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one file was bad
    assert [line["image"] for line in lines] == [str(p) for p in image_files]
    predictor = Predictor.from_checkpoint(str(checkpoint), device="cpu")
    for line, path in zip(lines[:2], image_files[:2]):
        expected = predictor.predict_bytes([path.read_bytes()])[0].to_dict()
        assert line["ranks"]["species"]["label"] == expected["ranks"]["species"]["label"]
        assert line["lowest_reliable_rank"] == expected["lowest_reliable_rank"]
        assert line["model"]["version"] == predictor.version
    assert lines[2]["error"]["code"] == "corrupt"


@pytest.mark.unit
def test_classify_names_missing_files(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", str(checkpoint), str(tmp_path / "nope.jpg")]) == 2
    assert "nope.jpg" in capsys.readouterr().err


@pytest.mark.unit
def test_serve_refuses_a_missing_checkpoint_before_starting_ray(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    assert main(["serve", "--checkpoint", str(tmp_path / "half")]) == 2
    assert "not a complete taxonet checkpoint" in capsys.readouterr().err
    assert main(["serve", "--model", "gs://bucket/models/demo@production"]) == 2
    assert "gs://" in capsys.readouterr().err


@pytest.mark.integration
def test_serve_verb_serves_until_interrupted(serve_http: str, checkpoint: Path, image_files: list[Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``taxonet serve`` joins the session's Ray (``--address``), serves, and removes its app on Ctrl-C."""
    import ray
    from ray import serve

    prefix = "/cli"
    command = [sys.executable, "-m", "taxonet.cli", "serve", "--checkpoint", str(checkpoint),
               "--address", ray.get_runtime_context().gcs_address, "--name", "taxonet-cli", "--route-prefix", prefix,
               "--token", TOKEN, "--max-replicas", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Ctrl-C to stop" in line for line in output) or process.poll() is not None,
                 timeout=120, what="taxonet serve to report it is serving")
        assert process.poll() is None, "".join(output)
        announced = next(line for line in output if "Ctrl-C to stop" in line)
        assert f"{serve_http}{prefix}/v1/classify" in announced  # the proxy the cluster really runs
        assert httpx.get(f"{serve_http}{prefix}/healthz", timeout=30).status_code == 200
        capsys.readouterr()
        code = main(["classify", f"{serve_http}{prefix}", *map(str, image_files), "--token", TOKEN])
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert code == 1 and len(lines) == 3
        assert all("ranks" in line for line in lines[:2]) and lines[2]["error"]["code"] == "corrupt_image"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, "".join(output)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "taxonet-cli" not in serve.status().applications
