"""Fixtures for the data tests: tiny image folders rendered by the synthetic source (32 px, a few dozen files)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from taxonet.taxonomy import Taxonomy


def jpeg_bytes(colour: tuple[int, int, int] = (200, 40, 40), size: tuple[int, int] = (32, 24),
               fmt: str = "JPEG") -> bytes:
    """A small solid-colour image with a diagonal line (so two colours never give the same bytes)."""
    image = Image.new("RGB", size, colour)
    for i in range(min(size)):
        image.putpixel((i, i), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def image_bytes() -> Callable[..., bytes]:
    """The :func:`jpeg_bytes` factory."""
    return jpeg_bytes


@pytest.fixture(scope="session")
def demo_taxonomy() -> Taxonomy:
    return Taxonomy.demo()


@pytest.fixture()
def make_folder(tmp_path: Path, demo_taxonomy: Taxonomy) -> Callable[..., Path]:
    """``make_folder(per_species=2, name="src")`` → ``tmp/name/ORDER/FAMILY/SPECIES/<i>.jpg`` (synthetic, 32 px)."""
    from taxonet.data.synthetic import SyntheticInsects, write_image_folder

    def make(per_species: int = 2, name: str = "src", taxonomy: Taxonomy | None = None, seed: int = 0) -> Path:
        root = tmp_path / name
        generator = SyntheticInsects(taxonomy or demo_taxonomy, image_size=32, seed=seed)
        write_image_folder(root, generator.samples(per_species), fmt="jpg")
        return root

    return make


@pytest.fixture()
def image_folder(make_folder: Callable[..., Path]) -> Path:
    """The demo taxonomy, 4 images per species: 36 JPEGs."""
    return make_folder(per_species=4)
