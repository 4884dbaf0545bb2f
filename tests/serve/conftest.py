"""Fixtures for the serving tests: a real checkpoint from a tiny training run, test images, and a local Serve on
127.0.0.1 (HTTP proxy on a free port) that is shut down when this package's tests are done, so the Ray Train tests
sharing the session's Ray get their CPUs back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from .helpers import encode, serve_on_free_port


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint (with anomaly thresholds) from a tiny 2-epoch training run on synthetic insects, 32 px."""
    from tests.support import quick_checkpoint

    return quick_checkpoint(tmp_path_factory.mktemp("ckpt-a"), image_size=32, epochs=2, seed=0)


@pytest.fixture(scope="session")
def insect_images() -> list[tuple[tuple[str, ...], Image.Image]]:
    """One synthetic insect per demo species (64 px), as (label chain, RGB image)."""
    from taxonet.data.synthetic import SyntheticInsects
    from taxonet.taxonomy import Taxonomy

    generator = SyntheticInsects(Taxonomy.demo(), image_size=64, seed=0)
    return [(sample.labels, sample.image) for sample in generator.samples(1, start_index=20_000)]


@pytest.fixture(scope="session")
def jpeg(insect_images: list[tuple[tuple[str, ...], Image.Image]]) -> bytes:
    return encode(insect_images[0][1])


@pytest.fixture(scope="package")
def serve_http(ray_local: None) -> Iterator[str]:
    """Serve's HTTP proxy on 127.0.0.1 and a free port; yields the base URL. Serve is shut down afterwards."""
    with serve_on_free_port() as url:
        yield url


