"""The HTTP API against a real local Serve on 127.0.0.1 with a checkpoint from a tiny training run.

One application (token configured, small limits, classifier autoscaling 1→2) serves the whole module: good requests,
every kind of bad input (each checked for status, JSON error and the replica still serving), auth, the read-only
endpoints and OpenAPI, and finally a bounded load test that must scale the classifier up without a 5xx or a replica
restart.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from taxonet.serve.predictor import Predictor
from taxonet.taxonomy import Taxonomy

from .helpers import SMALL, animated_gif, check_answer, deploy, encode, odd_images, png_bomb, replica_names, wait_for

pytestmark = pytest.mark.integration

APP = "taxonet-api"
PREFIX = "/api"
TOKEN = "test-token-3f9a"
#: a second token accepted at the same time (a rotation in progress)
NEXT_TOKEN = "next-token-81c2"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = {"max_image_bytes": 200_000, "max_files": 4, "max_request_bytes": 1_000_000, "max_image_pixels": 4_000_000,
          "max_request_pixels": 10_000_000, "decode_pixel_budget": 4_000_000, "max_concurrent_requests": 12}
CLASSIFIER = {**SMALL, "max_ongoing_requests": 8,
              "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                              "upscale_delay_s": 0.5, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
                              "look_back_period_s": 2}}


@pytest.fixture(scope="module")
def api(serve_http: str, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The deployed app: base URL, an HTTP client and the replicas it started with.

    The tokens come as a mounted Secret would bring them: a file named by TAXONET_API_TOKEN_FILE, written with a
    trailing newline and two tokens (a rotation in progress)."""
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(f"{TOKEN} ,{NEXT_TOKEN}\n")
    ingress = {**SMALL, "env_vars": {"TAXONET_API_TOKEN_FILE": str(token_file)}}
    deploy({"checkpoint": str(checkpoint), "top_k": 3, "max_batch_size": 4,
            "batch_wait_timeout_s": 0.02, **LIMITS, "ingress": ingress, "classifier": CLASSIFIER},
           name=APP, route_prefix=PREFIX)
    replicas = {d: replica_names(APP, d) for d in ("TaxonetIngress", "TaxonetClassifier")}
    assert all(len(names) == 1 for names in replicas.values()), replicas
    with httpx.Client(base_url=serve_http + PREFIX, timeout=60) as client:
        yield {"client": client, "replicas": replicas, "url": serve_http + PREFIX}
    serve.delete(APP)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(str(checkpoint), device="cpu", top_k=3)


def classify(client: httpx.Client, body: bytes, content_type: str | None = "image/jpeg",
             headers: dict[str, str] | None = None) -> httpx.Response:
    sent = dict(AUTH if headers is None else headers)
    if content_type is not None:
        sent["content-type"] = content_type
    return client.post("/v1/classify", content=body, headers=sent)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def assert_still_serving(api: dict[str, Any], jpeg: bytes) -> None:
    """The same replicas as at the start answer a good request."""
    response = classify(api["client"], jpeg)
    assert response.status_code == 200, response.text
    for deployment, names in api["replicas"].items():
        assert names <= replica_names(APP, deployment), f"{deployment} replica replaced"


# ---------------------------------------------------------------------------------------------------- good requests
def test_single_image_matches_the_in_process_predictor(api: dict[str, Any], reference: Predictor,
                                                       insect_images: list) -> None:
    for _, image in insect_images[:3]:
        data = encode(image)
        response = classify(api["client"], data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == {"name": reference.name, "version": reference.version}
        (answer,) = body["predictions"]
        assert answer["filename"] is None
        check_answer(answer, reference.taxonomy, top_k=3)
        expected = reference.predict_bytes([data])[0].to_dict()
        for rank in reference.taxonomy.ranks:
            got, want = answer["ranks"][rank], expected["ranks"][rank]
            assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
            assert got["reliable"] == want["reliable"]
        assert answer["lowest_reliable_rank"] == expected["lowest_reliable_rank"]


def test_multipart_keeps_order_and_filenames(api: dict[str, Any], reference: Predictor, insect_images: list) -> None:
    files = [("files", (f"insect{i}.jpg", encode(image), "image/jpeg")) for i, (_, image) in
             enumerate(insect_images[:3])]
    files.append(("files", ("insect3.png", encode(insect_images[3][1], "PNG"), "image/png")))
    response = api["client"].post("/v1/classify", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["insect0.jpg", "insect1.jpg", "insect2.jpg", "insect3.png"]
    for prediction, (_, (_, data, _)) in zip(predictions, files):
        check_answer(prediction, reference.taxonomy, top_k=3)
        expected = reference.predict_bytes([data])[0].to_dict()
        assert prediction["ranks"]["species"]["label"] == expected["ranks"]["species"]["label"]


def test_multipart_without_part_content_type_is_judged_by_its_bytes(api: dict[str, Any], jpeg: bytes) -> None:
    response = api["client"].post("/v1/classify", files=[("files", ("x.bin", jpeg, "application/octet-stream"))],
                                  headers=AUTH)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("kind", ["png_16bit", "cmyk_jpeg", "grayscale_jpeg", "rgba_png", "webp", "palette_png"])
def test_odd_but_valid_images_are_classified(api: dict[str, Any], reference: Predictor, insect_images: list,
                                             jpeg: bytes, kind: str) -> None:
    data, content_type = odd_images(insect_images[4][1])[kind]
    response = classify(api["client"], data, content_type)
    assert response.status_code == 200, response.text
    check_answer(response.json()["predictions"][0], reference.taxonomy, top_k=3)
    assert_still_serving(api, jpeg)


# ---------------------------------------------------------------------------------------------------- bad input
def _bad_requests(jpeg: bytes, gif: bytes) -> dict[str, tuple[dict[str, Any], int, str]]:
    """name → (httpx request kwargs, expected status, expected error code)."""
    big = random.Random(0).randbytes(LIMITS["max_image_bytes"] + 1)
    one = ("files", ("a.jpg", jpeg, "image/jpeg"))
    return {
        "empty body": ({"content": b"", "headers": {**AUTH, "content-type": "image/jpeg"}}, 400, "empty_body"),
        "text as text/plain": ({"content": b"just some text", "headers": {**AUTH, "content-type": "text/plain"}},
                               415, "unsupported_media_type"),
        "text labelled as jpeg": ({"content": b"just some text", "headers": {**AUTH, "content-type": "image/jpeg"}},
                                  400, "corrupt_image"),
        "truncated jpeg": ({"content": jpeg[: len(jpeg) // 2], "headers": {**AUTH, "content-type": "image/jpeg"}},
                           400, "corrupt_image"),
        "animated gif": ({"content": gif, "headers": {**AUTH, "content-type": "image/gif"}},
                         415, "unsupported_media_type"),
        "gif labelled as jpeg": ({"content": gif, "headers": {**AUTH, "content-type": "image/jpeg"}},
                                 415, "unsupported_image"),
        "decompression bomb": ({"content": png_bomb(), "headers": {**AUTH, "content-type": "image/png"}},
                               413, "image_too_large"),
        "body over the byte limit": ({"content": big, "headers": {**AUTH, "content-type": "image/jpeg"}},
                                     413, "payload_too_large"),
        "chunked body over the byte limit": ({"content": iter([big[:100_000], big[100_000:]]),
                                              "headers": {**AUTH, "content-type": "image/jpeg"}},
                                             413, "payload_too_large"),
        "wrong content type": ({"content": jpeg, "headers": {**AUTH, "content-type": "application/json"}},
                               415, "unsupported_media_type"),
        "no content type": ({"content": jpeg, "headers": AUTH}, 415, "unsupported_media_type"),
        "multipart without files": ({"data": {"note": "no image here"}, "files": [("other", ("a.jpg", jpeg))],
                                     "headers": AUTH}, 400, "no_files"),
        "multipart files as text field": ({"data": {"files": "not a file"}, "files": [("x", ("a.jpg", jpeg))],
                                           "headers": AUTH}, 400, "bad_multipart"),
        "multipart with too many files": ({"files": [one] * (LIMITS["max_files"] + 1), "headers": AUTH},
                                          400, "too_many_files"),
        "multipart file over the byte limit": ({"files": [one, ("files", ("big.jpg", big, "image/jpeg"))],
                                                "headers": AUTH}, 413, "payload_too_large"),
        "multipart file of a wrong type": ({"files": [("files", ("a.txt", b"text", "text/plain"))], "headers": AUTH},
                                           415, "unsupported_media_type"),
        "multipart with one corrupt file": ({"files": [one, ("files", ("bad.jpg", jpeg[:50], "image/jpeg"))],
                                             "headers": AUTH}, 400, "corrupt_image"),
        "malformed multipart": ({"content": b"--nope\r\n\r\n", "headers": {
            **AUTH, "content-type": "multipart/form-data; boundary=xyz"}}, 400, "bad_multipart"),
        "missing token": ({"content": jpeg, "headers": {"content-type": "image/jpeg"}}, 401, "unauthorized"),
        "wrong token": ({"content": jpeg, "headers": {"content-type": "image/jpeg", "Authorization": "Bearer nope"}},
                        401, "unauthorized"),
        "token without bearer scheme": ({"content": jpeg, "headers": {"content-type": "image/jpeg",
                                                                      "Authorization": TOKEN}}, 401, "unauthorized"),
    }


BAD_CASES = list(_bad_requests(b"\xff\xd8\xff", b"GIF89a"))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_a_json_error_and_the_replica_keeps_serving(api: dict[str, Any], jpeg: bytes,
                                                                  insect_images: list, case: str) -> None:
    request, status, code = _bad_requests(jpeg, animated_gif(insect_images[0][1]))[case]
    error = assert_error(api["client"].post("/v1/classify", **request), status, code)
    if case == "multipart with one corrupt file":
        assert "files[1] (bad.jpg)" in error["message"]  # the client learns which file was bad
    if status == 401:
        response = api["client"].post("/v1/classify", **request)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert_still_serving(api, jpeg)


def test_auth_covers_every_v1_route_but_not_health_or_docs(api: dict[str, Any]) -> None:
    client = api["client"]
    for path in ("/v1/model", "/v1/taxonomy"):
        assert_error(client.get(path), 401, "unauthorized")
        assert client.get(path, headers=AUTH).status_code == 200
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_unknown_routes_and_methods_answer_json(api: dict[str, Any]) -> None:
    assert_error(api["client"].get("/v2/classify"), 404, "not_found")
    assert_error(api["client"].get("/v1/classify", headers=AUTH), 405, "method_not_allowed")


# ---------------------------------------------------------------------------------------------------- own limits
# Sizes just past taxonet's limits and far under Pillow's (≈ 89 MP warns, 179 MP refuses): only taxonet's checks can
# refuse them, so each of these fails when the check is removed.
def _blank(size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    return encode(Image.new("RGB", size), fmt)


@pytest.mark.parametrize("fmt, content_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_an_image_just_over_max_image_pixels_is_refused(api: dict[str, Any], fmt: str, content_type: str) -> None:
    error = assert_error(classify(api["client"], _blank((2001, 2000), fmt), content_type), 413, "image_too_large")
    assert "2001x2000" in error["message"] and str(LIMITS["max_image_pixels"]) in error["message"]
    assert classify(api["client"], _blank((2000, 2000), fmt), content_type).status_code == 200  # at the limit


def test_a_request_at_the_pixel_budget_passes_and_one_row_more_is_refused(api: dict[str, Any]) -> None:
    def files(sizes: list[tuple[int, int]]) -> list[tuple[str, tuple[str, bytes, str]]]:
        return [("files", (f"{index}.jpg", _blank(size), "image/jpeg")) for index, size in enumerate(sizes)]

    at_budget = [(2000, 2000), (2000, 2000), (2000, 1000)]  # 10,000,000 pixels = max_request_pixels
    assert sum(w * h for w, h in at_budget) == LIMITS["max_request_pixels"]
    response = api["client"].post("/v1/classify", files=files(at_budget), headers=AUTH)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3
    over = api["client"].post("/v1/classify", files=files([*at_budget[:2], (2000, 1001)]), headers=AUTH)
    assert str(LIMITS["max_request_pixels"]) in assert_error(over, 413, "request_too_large")["message"]


def test_a_16_bit_png_at_the_pixel_limit_is_classified(api: dict[str, Any], reference: Predictor) -> None:
    gradient = np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (2000, 1))  # 4 MP, about 12 KB as PNG
    response = classify(api["client"], encode(Image.fromarray(gradient), "PNG"), "image/png")
    assert response.status_code == 200, response.text
    check_answer(response.json()["predictions"][0], reference.taxonomy, top_k=3)


def test_bmp_and_tiff_are_refused_whatever_they_claim_to_be(api: dict[str, Any], insect_images: list,
                                                           jpeg: bytes) -> None:
    bmp = bytearray(encode(insect_images[0][1], "BMP"))
    bmp[6:10] = b"\x01\x02\x03\x04"  # non-zero reserved bytes once slipped past the format sniffer
    tiff = encode(insect_images[0][1], "TIFF")
    big_tiff = b"II+\x00" + bytes(64)
    for data, content_type in ((bytes(bmp), "image/png"), (tiff, "image/jpeg"), (big_tiff, "image/webp")):
        assert_error(classify(api["client"], data, content_type), 415, "unsupported_image")
    multipart = api["client"].post("/v1/classify", headers=AUTH, files=[
        ("files", ("a.jpg", jpeg, "image/jpeg")), ("files", ("b.bin", bytes(bmp), "application/octet-stream"))])
    assert "files[1] (b.bin)" in assert_error(multipart, 415, "unsupported_image")["message"]
    assert_still_serving(api, jpeg)


def test_both_rotation_tokens_work_and_the_files_newline_is_not_part_of_them(api: dict[str, Any]) -> None:
    for token in (TOKEN, NEXT_TOKEN):
        response = api["client"].get("/v1/model", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
    for wrong in (f"{TOKEN}\n", f"{TOKEN},{NEXT_TOKEN}", TOKEN[:-1]):
        assert_error(api["client"].get("/v1/model", headers={"Authorization": f"Bearer {wrong.strip()}x"}),
                     401, "unauthorized")


def test_jpegs_can_be_decoded_by_the_model_deployment(serve_http: str, checkpoint: Path, reference: Predictor,
                                                     insect_images: list) -> None:
    """``jpeg_decode: model`` (what "auto" picks on a GPU, where decode_jpeg is nvjpeg): the ingress checks the headers
    and sends JPEG bytes, the classifier decodes them on its device; PNGs are still decoded by the ingress."""
    deploy({"checkpoint": str(checkpoint), "jpeg_decode": "model", **LIMITS, "ingress": SMALL,
            "classifier": {**SMALL, "max_ongoing_requests": 32}}, name="taxonet-jpeg", route_prefix="/jpeg")
    try:
        with httpx.Client(base_url=serve_http + "/jpeg", timeout=60) as client:
            assert client.get("/v1/model").json()["jpeg_on_device"] is True
            files = [("files", ("a.jpg", encode(insect_images[0][1]), "image/jpeg")),
                     ("files", ("b.png", encode(insect_images[1][1], "PNG"), "image/png"))]
            response = client.post("/v1/classify", files=files)
            assert response.status_code == 200, response.text
            for answer in response.json()["predictions"]:
                check_answer(answer, reference.taxonomy, top_k=3)
            # the header checks still come first: a JPEG over the pixel limit never reaches the model
            assert_error(classify(client, _blank((2001, 2000)), headers={}), 413, "image_too_large")
    finally:
        serve.delete("taxonet-jpeg")


# ---------------------------------------------------------------------------------------------------- read-only routes
def test_model_taxonomy_and_health(api: dict[str, Any], reference: Predictor, checkpoint: Path) -> None:
    client = api["client"]
    model = client.get("/v1/model", headers=AUTH).json()
    assert model["name"] == reference.name and model["version"] == reference.version
    assert model["checkpoint"] == str(checkpoint)
    assert model["transform"] == reference.transform.to_dict()
    assert model["max_batch_size"] == 4 and model["batch_wait_timeout_s"] == pytest.approx(0.02)
    assert model["rollout_error"] is None and model["thresholds"] is True
    taxonomy = client.get("/v1/taxonomy", headers=AUTH).json()
    assert Taxonomy.from_dict({"ranks": taxonomy["ranks"], "tree": taxonomy["tree"]}) == reference.taxonomy
    assert taxonomy["classes"]["species"] == list(reference.taxonomy.names[2])
    health = client.get("/healthz").json()
    assert health == {"status": "ok", "model": {"name": reference.name, "version": reference.version}}


def test_documented_curl_examples_work(api: dict[str, Any], tmp_path: Path, insect_images: list) -> None:
    """Every ``curl`` line of docs/api.md, run as written against this server."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", doc, flags=re.DOTALL)
    assert block, "docs/api.md lost its bash example block"
    commands = [line for line in block.group(1).splitlines() if line.startswith("curl ")]
    assert len(commands) >= 5
    (tmp_path / "insect.jpg").write_bytes(encode(insect_images[0][1]))
    (tmp_path / "insect.png").write_bytes(encode(insect_images[1][1], "PNG"))
    env = {**os.environ, "TAXONET_URL": api["url"], "TAXONET_API_TOKEN": TOKEN}
    for command in commands:
        result = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        body, _, status = result.stdout.rpartition("\n")
        assert status == "200", (command, result.stdout, result.stderr)
        answer = json.loads(body)
        if "/v1/classify" in command:
            assert len(answer["predictions"]) == max(1, command.count("files=@"))


def test_openapi_documents_the_contract(api: dict[str, Any]) -> None:
    spec = api["client"].get("/openapi.json").json()
    classify_op = spec["paths"]["/v1/classify"]["post"]
    assert set(classify_op["requestBody"]["content"]) == {"image/jpeg", "image/png", "image/webp",
                                                          "multipart/form-data"}
    assert {"200", "400", "401", "413", "415"} <= set(classify_op["responses"])
    assert {"/v1/taxonomy", "/v1/model", "/healthz"} <= set(spec["paths"])
    docs = api["client"].get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# ---------------------------------------------------------------------------------------------------- load
def test_bounded_load_scales_up_without_errors_or_restarts(api: dict[str, Any], jpeg: bytes,
                                                           insect_images: list) -> None:
    """Eight loopback clients mix good and bad requests for at most 45 s; the classifier must go 1 → 2 replicas."""
    good = [encode(image) for _, image in insect_images]
    bad = [(b"", "image/jpeg", 400), (jpeg[:200], "image/jpeg", 400), (png_bomb(), "image/png", 413),
           (b"text", "text/plain", 415)]
    statuses: Counter[int] = Counter()
    unexpected: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=api["url"], timeout=30) as client:
            while not stop.is_set():
                if rng.random() < 0.25:
                    body, content_type, want = rng.choice(bad)
                else:
                    body, content_type, want = rng.choice(good), "image/jpeg", 200
                try:
                    status = classify(client, body, content_type).status_code
                except httpx.HTTPError as exc:
                    status, want = -1, f"{type(exc).__name__}: {exc}"
                with lock:
                    statuses[status] += 1
                    if status != want:
                        unexpected.append(f"{status} instead of {want}")

    threads = [threading.Thread(target=client_loop, args=(seed,), daemon=True) for seed in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()

    def scaled_up() -> bool:
        deployment = serve.status().applications[APP].deployments["TaxonetClassifier"]
        return deployment.replica_states.get("RUNNING", 0) >= 2

    try:
        scaled = wait_for(scaled_up, timeout=40, what="the classifier to scale to 2 running replicas")
        time.sleep(2)  # keep the load on the new replica for a moment
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=35)
    elapsed = time.monotonic() - start
    assert scaled and elapsed < 60
    assert not unexpected, f"{len(unexpected)} unexpected answers, e.g. {unexpected[:5]}; all: {dict(statuses)}"
    assert not any(status >= 500 for status in statuses), dict(statuses)
    assert statuses[200] >= 20, dict(statuses)
    for deployment, names in api["replicas"].items():  # the replicas it started with all survived
        assert names <= replica_names(APP, deployment), f"{deployment} replica restarted"
    assert len(replica_names(APP, "TaxonetClassifier")) == 2
    status = serve.status().applications[APP]
    assert all(d.status == "HEALTHY" for d in status.deployments.values()), status
