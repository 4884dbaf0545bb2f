"""Image decoding and transforms: the one definition of preprocessing, shared by training, evaluation and serving.

The eval transform is described by a :class:`TransformSpec` that is saved inside every checkpoint; serving rebuilds
the transform from it and never restates input size or normalisation (no train/serve skew).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

# ImageNet statistics (torchvision's weights use them; the original code divided by 255 twice: not copied).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: default ceiling on decoded pixels (about 40 MP): a decompression bomb is refused before it is decoded
DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


class ImageDecodeError(ValueError):
    """An image that cannot be used. ``code`` is "corrupt", "unsupported" or "too_large"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TransformSpec:
    """What a model expects: square input size and normalisation. Saved in the checkpoint as ``transform.json``."""

    input_size: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: eval resize: the image is resized to ``input_size`` × ``input_size`` (the paper's code resizes, no crop)
    resize: str = "squash"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformSpec":
        unknown = set(data) - {"input_size", "mean", "std", "resize"}
        if unknown:
            raise ValueError(f"unknown transform keys {sorted(unknown)}")
        return cls(
            input_size=int(data.get("input_size", 128)),
            mean=tuple(float(v) for v in data.get("mean", IMAGENET_MEAN)),
            std=tuple(float(v) for v in data.get("std", IMAGENET_STD)),
            resize=str(data.get("resize", "squash")),
        )

    @classmethod
    def from_config(cls, data_config: Any) -> "TransformSpec":
        return cls(input_size=data_config.input_size, mean=tuple(data_config.mean), std=tuple(data_config.std))


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None,
                 formats: Sequence[str] | None = None) -> Image.Image:
    """Bytes → RGB PIL image, refusing corrupt, unsupported and oversized images with :class:`ImageDecodeError`.

    Handles what cameras and users send: greyscale, palette, RGBA (composited on white), CMYK JPEG, 16-bit PNG,
    animated GIF/WebP (first frame). The pixel count is checked from the header before decoding, so a decompression
    bomb costs nothing. ``draft_size`` lets JPEG decode at a reduced scale (much faster for large photos);
    ``formats`` restricts the decoders PIL may use (default: all of :data:`SUPPORTED_FORMATS`).
    """
    return load_rgb(open_image(data, max_pixels=max_pixels, formats=formats), draft_size=draft_size)


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               formats: Sequence[str] | None = None) -> Image.Image:
    """The image with only its header read (nothing decoded): a known format among ``formats``, at most
    ``max_pixels`` pixels; else :class:`ImageDecodeError`. :func:`load_rgb` decodes it."""
    if not data:
        raise ImageDecodeError("corrupt", "empty image body")
    # PIL's decoders by name; MPO (phones' multi-picture JPEG) is opened by the JPEG decoder
    allowed = tuple(sorted(set(formats or SUPPORTED_FORMATS) - {"MPO"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # formats= restricts PIL to these decoders: bytes that claim another format are never parsed
            image = Image.open(io.BytesIO(data), formats=allowed)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError("too_large", f"image too large: {exc}") from exc
        except Exception as exc:  # UnidentifiedImageError, OSError, SyntaxError from plugins
            raise ImageDecodeError("corrupt", "not a decodable image (unknown or corrupt format)") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError("unsupported", f"unsupported image format {image.format}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("corrupt", f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageDecodeError("too_large", f"image has {width}x{height} pixels, more than the limit of {max_pixels}")
    return image


def load_rgb(image: Image.Image, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image from :func:`open_image` to RGB. A truncated file is an error (PIL's default; taxonet never
    sets ``ImageFile.LOAD_TRUNCATED_IMAGES``, a process-wide switch)."""
    try:
        if draft_size and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError("corrupt", f"corrupt or truncated image data ({type(exc).__name__})") from exc


#: rows of a 16/32-bit image rescaled at once: bounds the float64 temporaries to a few MB whatever the image size
_RESCALE_PIXELS = 1 << 20


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with at most one full-size copy besides the input: 16-bit greyscale is rescaled in slices, alpha is
    pasted onto a white RGB canvas (no RGBA temporaries)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits by the actual range instead of clipping to white
        array = np.asarray(image)
        low, high = float(array.min()), float(array.max())
        grey = np.zeros(array.shape, dtype=np.uint8)
        if high > low:
            rows = max(1, _RESCALE_PIXELS // max(1, array.shape[1]))
            for top in range(0, array.shape[0], rows):
                grey[top:top + rows] = ((array[top:top + rows] - low) / (high - low) * 255.0).astype(np.uint8)
        del array
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba)
        return canvas
    return image.convert("RGB")


def _normalize(spec: TransformSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)

    def normalize(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor - mean) / std

    return normalize


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL → float32 [3, H, W] in [0, 1] (no torchvision dependency on the hot path)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def build_eval_resize(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform up to the pixels: RGB, resized to ``input_size`` × ``input_size`` (bilinear), as uint8
    [3, S, S] — a quarter of the float tensor's bytes, for shipping images between processes (serving)."""
    size = (spec.input_size, spec.input_size)

    def resize(image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = _to_rgb(image)
        if image.size != size:
            image = image.resize(size, Image.BILINEAR, reducing_gap=3.0)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    return resize


def normalize_uint8(batch: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """uint8 [..., 3, S, S] from :func:`build_eval_resize` → the eval transform's float32 tensor, on the batch's
    device (the same operations as :func:`pil_to_tensor` + normalisation, so the values are identical)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    return (batch.float().div_(255.0) - mean) / std


def build_eval_transform(spec: TransformSpec) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to ``input_size`` × ``input_size`` (bilinear) and normalise. Used by evaluation and serving."""
    resize, normalize = build_eval_resize(spec), _normalize(spec)

    def transform(image: Image.Image) -> torch.Tensor:
        return normalize(resize(image).float().div_(255.0))  # = normalize_uint8, without rebuilding mean/std

    return transform


def build_train_transform(spec: TransformSpec, augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The paper's augmentations (METHOD.md "Training"), then the eval resize + normalisation.

    Rotation ±40°, scale 0.85–1.15, horizontal and vertical flips, perspective distortion 0.2, colour jitter 0.5
    (brightness, contrast, saturation).
    """
    if not augment:
        return build_eval_transform(spec)
    from torchvision.transforms import v2

    augmentation = v2.Compose([
        v2.Resize((spec.input_size, spec.input_size), antialias=True),
        v2.RandomAffine(degrees=40, scale=(0.85, 1.15)),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomPerspective(distortion_scale=0.2, p=0.5),
        v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5),
    ])
    normalize = _normalize(spec)

    def transform(image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = _to_rgb(image)
        return normalize(pil_to_tensor(augmentation(image)))

    return transform
