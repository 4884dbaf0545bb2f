"""The plain-PyTorch predictor (no Ray): preprocessing from the checkpoint, answers, bad images."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from taxonet.checkpoint import save_checkpoint
from taxonet.config import load_config
from taxonet.data.transforms import (ImageDecodeError, TransformSpec, build_eval_transform, decode_image,
                                     normalize_uint8, open_image)
from taxonet.models import build_model
from taxonet.serve.predictor import (EMBEDDING_MAX_DIMS, SERVED_FORMATS, Predictor, Preprocessor, embedding_projection,
                                     freeze_for_cpu, sniff_format)
from taxonet.taxonomy import Taxonomy
from .helpers import animated_gif, check_answer, encode, odd_images, png_bomb, variant

pytestmark = pytest.mark.unit


def predict(predictor: Predictor, images: list[bytes], **options: int) -> list[dict[str, Any]]:
    """The predictor's answers as the API's JSON shows them."""
    return [answer.to_dict() for answer in predictor.predict_bytes(images, **options)]


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(str(checkpoint), device="auto", top_k=3)


def test_answers_are_consistent_with_the_taxonomy(predictor: Predictor, insect_images: list) -> None:
    images = [encode(image) for _, image in insect_images]
    answers = predict(predictor, images, batch_size=4)
    assert len(answers) == len(images)
    for answer in answers:
        check_answer(answer, predictor.taxonomy, top_k=3)
    # the answers are the model's own: each rank's label is the argmax of that head on the preprocessed image,
    # its score the winning logit, its top-k the softmax ranking
    batch = torch.stack([predictor.preprocess(data) for data in images])
    with torch.no_grad():
        logits = predictor.model(batch)
    for level, rank in enumerate(predictor.taxonomy.ranks):
        probabilities = torch.softmax(logits[rank], dim=1)
        for row, answer in enumerate(answers):
            entry = answer["ranks"][rank]
            assert entry["label"] == predictor.taxonomy.names[level][int(logits[rank][row].argmax())]
            assert entry["score"] == pytest.approx(float(logits[rank][row].max()), abs=1e-5)
            assert entry["top_k"][0]["probability"] == pytest.approx(float(probabilities[row].max()), abs=1e-5)


def test_batching_does_not_change_answers(predictor: Predictor, insect_images: list) -> None:
    images = [encode(image) for _, image in insect_images]
    one_by_one = [predict(predictor, [image])[0] for image in images]
    batched = predict(predictor, images, batch_size=5)
    for a, b in zip(one_by_one, batched):
        for rank in predictor.taxonomy.ranks:
            assert a["ranks"][rank]["label"] == b["ranks"][rank]["label"]
            assert a["ranks"][rank]["score"] == pytest.approx(b["ranks"][rank]["score"], rel=1e-4, abs=1e-4)
        assert a["lowest_reliable_rank"] == b["lowest_reliable_rank"]


def test_preprocessing_comes_from_the_checkpoint(predictor: Predictor, checkpoint: Path, tmp_path: Path,
                                                 jpeg: bytes) -> None:
    assert predictor.transform.input_size == 32
    expected = build_eval_transform(predictor.transform)(decode_image(jpeg))
    assert torch.allclose(predictor.preprocess(jpeg), expected, atol=1e-6)
    other = Predictor.from_checkpoint(str(variant(checkpoint, tmp_path / "b", version="v-b", input_size=40)))
    assert other.preprocess(jpeg).shape == (3, 40, 40)
    assert other.version == "v-b"
    check_answer(predict(other, [jpeg])[0], other.taxonomy, top_k=3)


def test_strict_thresholds_make_every_rank_unsure(checkpoint: Path, tmp_path: Path, jpeg: bytes) -> None:
    strict = Predictor.from_checkpoint(str(variant(checkpoint, tmp_path / "s", version="s", strict_thresholds=True)))
    answer = predict(strict, [jpeg])[0]
    assert not any(entry["reliable"] for entry in answer["ranks"].values())
    assert answer["lowest_reliable_rank"] is None and answer["lowest_reliable_label"] is None
    assert all(entry["confidence"] == pytest.approx(0.0, abs=1e-9) for entry in answer["ranks"].values())


def test_single_task_checkpoint_answers_higher_ranks_from_the_taxonomy(tmp_path: Path, jpeg: bytes) -> None:
    taxonomy = Taxonomy.demo()
    config = load_config("demo", {"model.backbone": "tiny_cnn", "model.single_task": True, "data.input_size": 32})
    directory = save_checkpoint(tmp_path / "species-only", build_model(config.model, taxonomy), taxonomy, config,
                                TransformSpec.from_config(config.data))
    predictor = Predictor.from_checkpoint(str(directory), device="cpu")
    answer = predict(predictor, [jpeg])[0]
    species = answer["ranks"]["species"]
    assert len(species["top_k"]) == 3 and species["score"] is not None
    chain = taxonomy.chain_names("species", taxonomy.index("species", species["label"]))
    for rank, name in zip(("order", "family"), chain[:2], strict=True):
        entry = answer["ranks"][rank]
        assert entry["label"] == name and entry["top_k"] == [] and entry["score"] is None
    assert answer["consistent"] is True
    assert predictor.describe()["thresholds"] is False  # no thresholds: every rank counts as reliable
    assert answer["lowest_reliable_rank"] == "species" and species["confidence"] is None


def test_top_k_is_capped_by_the_number_of_classes(checkpoint: Path, jpeg: bytes) -> None:
    wide = Predictor.from_checkpoint(str(checkpoint), top_k=50)
    answer = predict(wide, [jpeg])[0]
    for rank in wide.taxonomy.ranks:
        top = answer["ranks"][rank]["top_k"]
        assert len(top) == wide.taxonomy.num_classes(rank)
        assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="top_k"):
        Predictor.from_checkpoint(str(checkpoint), top_k=0)


def test_odd_but_valid_images_are_accepted(predictor: Predictor, insect_images: list) -> None:
    for data, _ in odd_images(insect_images[2][1]).values():
        answer = predict(predictor, [data])[0]
        check_answer(answer, predictor.taxonomy, top_k=3)


@pytest.mark.parametrize("case, code", [
    ("empty", "corrupt"), ("text", "corrupt"), ("truncated", "corrupt"), ("bomb", "too_large"),
])
def test_bad_images_raise_a_coded_error(predictor: Predictor, jpeg: bytes, case: str, code: str) -> None:
    data = {"empty": b"", "text": b"hello, not an image", "truncated": jpeg[: len(jpeg) // 2],
            "bomb": png_bomb()}[case]
    with pytest.raises(ImageDecodeError) as info:
        predict(predictor, [jpeg, data])
    assert info.value.code == code
    assert info.value.message.startswith("image 1:")  # the position of the bad image in the request


def test_served_formats_refuse_gif_even_when_mislabelled(checkpoint: Path, insect_images: list) -> None:
    gif = animated_gif(insect_images[0][1])
    assert sniff_format(gif) == "GIF"
    preprocessor = Preprocessor(Predictor.from_checkpoint(str(checkpoint)).transform, allowed_formats=SERVED_FORMATS)
    with pytest.raises(ImageDecodeError) as info:
        preprocessor(gif)
    assert info.value.code == "unsupported"
    # without the restriction the decoder takes the first frame
    assert Preprocessor(preprocessor.spec)(gif).shape == (3, 32, 32)


def test_pixel_limit_is_checked_before_decoding(checkpoint: Path) -> None:
    spec = Predictor.from_checkpoint(str(checkpoint)).transform
    image = encode(Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError) as info:
        Preprocessor(spec, max_pixels=100_000)(image)
    assert info.value.code == "too_large" and "400x300" in info.value.message
    assert Preprocessor(spec, max_pixels=120_000)(image).shape == (3, 32, 32)


def test_describe_names_the_model(predictor: Predictor, checkpoint: Path) -> None:
    info = predictor.describe()
    assert info["checkpoint"] == str(checkpoint)
    assert info["name"] == "quick" and info["version"]
    assert info["transform"]["input_size"] == 32 and info["thresholds"] is True
    assert info["ranks"] == ["order", "family", "species"]


def test_uint8_pixels_give_the_float_paths_answers(predictor: Predictor, insect_images: list) -> None:
    """The ingress ships resized uint8 pixels (a quarter of the bytes) and the classifier normalises the batch: the
    tensors, logits and answers are those of the float eval transform, exactly."""
    data = [encode(image) for _, image in insect_images][:6]
    pixels = torch.stack([predictor.preprocessor.decode_uint8(d) for d in data])
    floats = torch.stack([predictor.preprocess(d) for d in data])
    assert pixels.dtype == torch.uint8 and pixels.shape == floats.shape
    assert torch.equal(normalize_uint8(pixels, predictor.transform), floats)
    for rank, values in predictor.logits(pixels).items():
        assert np.array_equal(values, predictor.logits(floats)[rank])
    assert predictor.predict_tensors(pixels) == predictor.predict_tensors(floats)


class _ShapeBranch(torch.nn.Module):
    """A model tracing cannot capture: its output depends on the batch size through Python control flow."""

    ranks = ("order",)

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.conv(images).mean(dim=(2, 3))
        return {"order": logits if images.shape[0] == 2 else -logits}


def test_cpu_graph_gives_the_eager_models_answers(checkpoint: Path, insect_images: list) -> None:
    graph = Predictor.from_checkpoint(str(checkpoint), device="cpu", top_k=3)
    eager = Predictor.from_checkpoint(str(checkpoint), device="cpu", top_k=3, graph=False)
    assert graph.graph and isinstance(graph.model, torch.jit.ScriptModule) and graph.describe()["graph"] is True
    assert not eager.graph and not isinstance(eager.model, torch.jit.ScriptModule)
    images = [encode(image) for _, image in insect_images]
    for batch_size in (1, 3, len(images)):  # the graph must not be tied to the batch size it was traced with
        ours, theirs = predict(graph, images, batch_size=batch_size), predict(eager, images,
                                                                                            batch_size=batch_size)
        for a, b in zip(ours, theirs, strict=True):
            assert a["lowest_reliable_rank"] == b["lowest_reliable_rank"]
            for rank in graph.taxonomy.ranks:
                assert a["ranks"][rank]["label"] == b["ranks"][rank]["label"]
                assert a["ranks"][rank]["reliable"] == b["ranks"][rank]["reliable"]
                assert a["ranks"][rank]["score"] == pytest.approx(b["ranks"][rank]["score"], abs=1e-4)


def test_a_model_the_graph_would_change_stays_eager(caplog: pytest.LogCaptureFixture) -> None:
    model = _ShapeBranch().eval()
    with caplog.at_level("WARNING", logger="taxonet.serve.predictor"):
        assert freeze_for_cpu(model, 16) is None
    assert "keeping the eager model" in caplog.text and "differ" in caplog.text
    assert not model.training  # the caller's mode is left as it was
    model.train()
    freeze_for_cpu(model, 16)
    assert model.training


# ---------------------------------------------------------------------------------------------------- embeddings
def _unit_features(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The pooled backbone features R0 of a HierarchicalClassifier, L2-normalised (float32)."""
    with torch.no_grad():
        return torch.nn.functional.normalize(model.backbone(batch), dim=1)


def test_embeddings_are_the_normalised_features_of_the_same_forward_pass(checkpoint: Path,
                                                                          insect_images: list) -> None:
    """The embedding is R0 (what the heads see), unit norm, float16; the same for an image alone or in a batch, the
    same on every call, from the one forward pass that gives the answers; absent unless asked for."""
    eager = Predictor.from_checkpoint(str(checkpoint), device="cpu", graph=False)
    graph = Predictor.from_checkpoint(str(checkpoint), device="cpu")
    assert graph.graph and eager.has_features and eager.embedding_dims == 64  # tiny_cnn: 64 ≤ the bound, as-is
    batch = torch.stack([eager.preprocessor.decode_uint8(encode(image)) for _, image in insect_images])
    calls: list[int] = []
    backbone = eager.model.model.backbone
    hook = backbone.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    try:
        result = eager.predict_batch(batch, embed=True)
    finally:
        hook.remove()
    assert calls == [len(batch)]  # one pass for answers and embeddings
    embeddings = result.embeddings
    assert embeddings is not None and embeddings.dtype == np.float16 and embeddings.shape == (len(batch), 64)
    expected = _unit_features(eager.model.model, normalize_uint8(batch, eager.transform)).numpy()
    assert np.allclose(embeddings.astype(np.float32), expected, atol=2e-3)
    assert np.allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert result.answers == eager.predict_tensors(batch)  # the answers are those without embeddings
    assert eager.predict_batch(batch).embeddings is None  # only when asked
    alone = np.concatenate([eager.predict_batch(image, embed=True).embeddings for image in batch])
    assert np.allclose(alone.astype(np.float32), embeddings.astype(np.float32), atol=2e-3)
    assert np.array_equal(eager.predict_batch(batch, embed=True).embeddings, embeddings)  # deterministic
    # the CPU graph (what Serve runs by default) carries the features through too
    traced = graph.predict_batch(batch, embed=True).embeddings
    assert traced is not None and np.allclose(traced.astype(np.float32), embeddings.astype(np.float32), atol=2e-3)


def test_wide_features_are_projected_to_the_bound_keeping_cosines_approximately(insect_images: list) -> None:
    taxonomy = Taxonomy.demo()
    config = load_config("demo", {"model.backbone": "small_cnn", "data.input_size": 32})
    torch.manual_seed(0)
    model = build_model(config.model, taxonomy)
    first = Predictor(model, taxonomy, TransformSpec(input_size=32), None, graph=False)
    again = Predictor(model, taxonomy, TransformSpec(input_size=32), None, graph=False)
    assert model.feature_dim == 256 > EMBEDDING_MAX_DIMS and first.embedding_dims == EMBEDDING_MAX_DIMS
    images = [image for _, image in insect_images]
    images += [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]  # look-alikes of each
    batch = torch.stack([first.preprocessor.decode_uint8(encode(image)) for image in images])
    embeddings = first.predict_batch(batch, embed=True).embeddings
    assert embeddings is not None and embeddings.shape == (len(images), EMBEDDING_MAX_DIMS)
    assert np.array_equal(again.predict_batch(batch, embed=True).embeddings, embeddings)  # a fixed, seeded matrix
    features = _unit_features(model, normalize_uint8(batch, first.transform))
    projection = embedding_projection(256)
    assert projection is not None and embedding_projection(64) is None
    expected = torch.nn.functional.normalize(features @ projection, dim=1).numpy()
    assert np.allclose(embeddings.astype(np.float32), expected, atol=2e-3)
    # cosines before and after: 1 − cos is kept within a relative error of about √(2/128) ≈ 0.125
    before = (features @ features.T).numpy()
    after = embeddings.astype(np.float32) @ embeddings.astype(np.float32).T
    off = ~np.eye(len(images), dtype=bool)
    relative = np.abs((1 - after[off]) - (1 - before[off])) / np.maximum(1 - before[off], 1e-3)
    assert np.median(relative) < 0.25, np.median(relative)
    assert np.corrcoef(before[off], after[off])[0, 1] > 0.9


# ---------------------------------------------------------------------------------------------------- hostile input
LIMIT = 4_000_000  #: far under Pillow's own limit (≈ 89 MP warns, 179 MP refuses): only taxonet's check can refuse


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_image_just_over_the_pixel_limit_is_refused_without_decoding(fmt: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (2001, 2000)), fmt)  # 4,002,000 pixels: 2,000 over the limit
    preprocessor = Preprocessor(TransformSpec(input_size=32), max_pixels=LIMIT, allowed_formats=SERVED_FORMATS)
    decoded: list[str] = []
    original = ImageFile.ImageFile.load

    def spy(image: ImageFile.ImageFile) -> Any:
        decoded.append(image.format or "?")
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(ImageDecodeError) as info:
        preprocessor.decode_uint8(data)
    assert info.value.code == "too_large" and "2001x2000" in info.value.message
    assert decoded == []  # refused from the header: the decoder never ran
    assert preprocessor.decode_uint8(encode(Image.new("RGB", (2000, 2000)), fmt)).shape == (3, 32, 32)  # at the limit
    assert set(decoded) == {fmt}


def test_a_16_bit_png_at_the_limit_decodes_without_float64_copies() -> None:
    """4 MP of 16-bit greyscale (12 KB on the wire) once took ~16 bytes per pixel in float64 copies; now the
    rescale runs in slices: the Python-visible peak stays under 8 bytes per pixel (uint16 + uint8 + one slice)."""
    gradient = np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (2000, 1))
    data = encode(Image.fromarray(gradient), "PNG")
    preprocessor = Preprocessor(TransformSpec(input_size=32), max_pixels=LIMIT, allowed_formats=SERVED_FORMATS)
    tracemalloc.start()
    try:
        pixels = preprocessor.decode_uint8(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * LIMIT, f"peak {peak / 1e6:.0f} MB for a {LIMIT / 1e6:.0f} MP image"
    assert int(pixels.min()) <= 8 and int(pixels.max()) >= 247  # scaled by the image's range, not clipped


def test_the_decoder_itself_is_restricted_to_the_served_formats(insect_images: list) -> None:
    """BMP and TIFF are refused even where the sniffer is fooled: PIL is only allowed the JPEG/PNG/WebP decoders."""
    bmp = bytearray(encode(insect_images[0][1], "BMP"))
    bmp[6:10] = b"\x01\x02\x03\x04"  # non-zero reserved bytes once slipped past the sniffer
    tiff = encode(insect_images[0][1], "TIFF")
    preprocessor = Preprocessor(TransformSpec(input_size=32), allowed_formats=SERVED_FORMATS)
    for data in (bytes(bmp), tiff, b"II+\x00" + bytes(64)):  # the last: a BigTIFF header
        with pytest.raises(ImageDecodeError) as info:
            preprocessor.decode_uint8(data)
        assert info.value.code == "unsupported"
        with pytest.raises(ImageDecodeError):  # the decoder alone, without the sniffer's verdict
            open_image(data, formats=SERVED_FORMATS)
    assert open_image(tiff).format == "TIFF"  # unrestricted (training data) still reads it


def test_device_jpeg_decode_matches_the_pil_path(predictor: Predictor, insect_images: list) -> None:
    """The JPEG path of GPU serving (decode_jpeg; nvjpeg there) runs on the CPU too: it must agree with PIL closely,
    also for greyscale and CMYK, and fall back to PIL (with its errors) for what it cannot decode."""
    images = [encode(image, quality=95) for _, image in insect_images[:4]]
    images += [encode(insect_images[4][1].convert("L")), encode(insect_images[5][1].convert("CMYK"))]
    on_device = predictor.preprocess_jpeg_on_device(images)
    reference = torch.stack([predictor.preprocess(data) for data in images])
    assert on_device.shape == reference.shape and on_device.dtype == torch.float32
    difference = (on_device - reference).abs().mean(dim=(1, 2, 3))
    assert (difference < 0.05).all(), difference  # different resize kernels, same picture
    png = encode(insect_images[0][1], "PNG")  # not a JPEG: the PIL path, exactly
    assert torch.allclose(predictor.preprocess_jpeg_on_device([images[0], png])[1], predictor.preprocess(png))
    with pytest.raises(ImageDecodeError):
        predictor.preprocess_jpeg_on_device([images[0], images[0][:100]])
