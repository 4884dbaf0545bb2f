"""Helpers for the serving tests: checkpoint variants, test images (valid, odd and hostile), Serve utilities and the
check that an answer is well formed and agrees with the taxonomy."""

from __future__ import annotations

import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image
from ray import serve

from taxonet.anomaly import AnomalyThresholds, ClassThreshold
from taxonet.checkpoint import add_thresholds, copy_checkpoint, read_manifest, write_manifest
from taxonet.serve.app import app_builder
from taxonet.taxonomy import Taxonomy
from tests.net_support import free_port

#: replica resources for tests: fractions of the session's 2 CPUs, leaving room for everything else
SMALL = {"num_cpus": 0.1, "max_ongoing_requests": 16, "autoscaling": None, "num_replicas": 1}


def variant(source: Path, target: Path, *, version: str, input_size: int | None = None,
            strict_thresholds: bool = False) -> Path:
    """A copy of ``source`` with a new version, optionally another input size or thresholds nothing passes.

    The tiny CNN pools globally, so its weights work at any input size: a different ``transform.json`` is enough
    to exercise a rollout that changes preprocessing.
    """
    copy_checkpoint(source, target)
    name = read_manifest(target)["name"]
    if input_size is not None:
        spec = json.loads((target / "transform.json").read_text())
        spec["input_size"] = input_size
        (target / "transform.json").write_text(json.dumps(spec))
    write_manifest(target, name=name, version=version)
    if strict_thresholds:
        taxonomy = Taxonomy.from_dict(json.loads((target / "taxonomy.json").read_text()))
        # μ = 10⁶, σ = 1: no logit of a real model reaches τ = μ − 2σ, so every rank of every answer is unsure
        rows = [ClassThreshold(rank, i, name_, 1e6, 1.0, 1e6 - 2.0, 10)
                for rank in taxonomy.ranks for i, name_ in enumerate(taxonomy.names[taxonomy.level(rank)])]
        add_thresholds(target, AnomalyThresholds(rows, k=2.0))
    return target


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG header announcing width × height pixels with almost no data: a decompression bomb (≈ 60 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def odd_images(base: Image.Image) -> dict[str, tuple[bytes, str]]:
    """Valid images in the modes cameras and users send; the API must accept them: name → (bytes, content type)."""
    gray16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    return {
        "png_16bit": (encode(gray16, "PNG"), "image/png"),
        "cmyk_jpeg": (encode(base.convert("CMYK"), "JPEG"), "image/jpeg"),
        "grayscale_jpeg": (encode(base.convert("L"), "JPEG"), "image/jpeg"),
        "rgba_png": (encode(rgba, "PNG"), "image/png"),
        "webp": (encode(base, "WEBP"), "image/webp"),
        "palette_png": (encode(base.convert("P"), "PNG"), "image/png"),
    }


def animated_gif(base: Image.Image) -> bytes:
    frames = [base, base.rotate(90), base.rotate(180)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


@contextmanager
def serve_on_free_port() -> Iterator[str]:
    """Serve's HTTP proxy on 127.0.0.1 and a free port (Ray must be initialised); yields the base URL and shuts
    Serve down afterwards."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def deploy(args: dict[str, Any], name: str, route_prefix: str) -> None:
    """``serve.run`` the taxonet app with ``args`` as application ``name`` (blocks until it is running)."""
    serve.run(app_builder(args), name=name, route_prefix=route_prefix)


def replica_names(app: str, deployment: str) -> set[str]:
    """Names of the live replica actors of one deployment (Serve names them SERVE_REPLICA::app#deployment#id)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def check_answer(answer: dict[str, Any], taxonomy: Any, top_k: int) -> None:
    """An answer is well formed and agrees with the taxonomy (see docs/api.md)."""
    assert set(answer["ranks"]) == set(taxonomy.ranks)
    chain = []
    for level, rank in enumerate(taxonomy.ranks):
        entry = answer["ranks"][rank]
        assert (rank, entry["label"]) in taxonomy
        top = entry["top_k"]
        assert len(top) == min(top_k, taxonomy.num_classes(rank))
        assert top[0]["label"] == entry["label"]
        probabilities = [t["probability"] for t in top]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0 + 1e-5
        assert all((rank, t["label"]) in taxonomy for t in top)
        assert isinstance(entry["score"], float) and isinstance(entry["reliable"], bool)
        assert entry["confidence"] is None or 0.0 <= entry["confidence"] <= 1.0
        chain.append(taxonomy.index(level, entry["label"]))
    assert answer["consistent"] == taxonomy.is_consistent(chain)
    reliable = [answer["ranks"][rank]["reliable"] for rank in taxonomy.ranks]

    def chain_ok(level: int) -> bool:  # the winners down to `level` form a path of the tree
        return all(taxonomy.parents[lv][chain[lv]] == chain[lv - 1] for lv in range(1, level + 1))

    # METHOD.md: level L is reliable when L and its parent rank are sure and the chain down to L is consistent;
    # the lowest reliable rank is the deepest such level. The authors' strict rule (anomaly.chain_rule, default):
    # a predicted chain that is not a path of the taxonomy is unsure at every rank.
    expected = max((lv for lv in range(taxonomy.depth)
                    if reliable[lv] and (lv == 0 or reliable[lv - 1]) and chain_ok(lv)), default=None)
    if not chain_ok(taxonomy.depth - 1):
        expected = None
    assert answer["lowest_reliable_rank"] == (None if expected is None else taxonomy.ranks[expected])
    expected_label = None if expected is None else answer["ranks"][taxonomy.ranks[expected]]["label"]
    assert answer["lowest_reliable_label"] == expected_label
