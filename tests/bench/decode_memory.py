"""Peak memory of decoding one image in the ingress, per pixel, for each kind of image the API accepts.

The ingress decodes one image at a time per request and at most ``decode_pixel_budget`` pixels at once per replica
(taxonet.serve.http.PixelBudget), so its decode memory is (bytes per pixel) × decode_pixel_budget. This script
measures the bytes per pixel: each case is encoded to a file, then a fresh Python process reads it, records its
RSS, decodes and preprocesses the image as the ingress does (``Preprocessor.open`` + ``decode``) and reports the rise
of its peak RSS (VmHWM, reset just before) over that baseline, divided by the pixel count. docs/api.md quotes the
largest.

    PYTHONPATH=platform python tests/bench/decode_memory.py [--megapixels 16]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))

from taxonet.data.transforms import TransformSpec  # noqa: E402
from taxonet.serve.predictor import SERVED_FORMATS, Preprocessor  # noqa: E402

CASES = ("rgb_jpeg", "cmyk_jpeg", "grey_jpeg", "rgb_png", "rgba_png", "la_png", "palette_alpha_png", "grey16_png",
         "rgba_webp")


def make(case: str, side: int) -> bytes:
    """A smooth image of side × side pixels (small on the wire, like the hostile inputs of issue 18)."""
    ramp = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    rgb = Image.fromarray(np.stack([ramp, ramp.T, 255 - ramp], axis=2))
    image, fmt = {
        "rgb_jpeg": (rgb, "JPEG"), "cmyk_jpeg": (rgb.convert("CMYK"), "JPEG"),
        "grey_jpeg": (rgb.convert("L"), "JPEG"), "rgb_png": (rgb, "PNG"),
        "rgba_png": (Image.merge("RGBA", (*rgb.split(), Image.fromarray(ramp))), "PNG"),
        "la_png": (Image.merge("LA", (Image.fromarray(ramp), Image.fromarray(ramp.T))), "PNG"),
        "palette_alpha_png": (rgb.convert("P"), "PNG"),
        "grey16_png": (Image.fromarray(np.tile(np.linspace(0, 65535, side).astype(np.uint16), (side, 1))), "PNG"),
        "rgba_webp": (Image.merge("RGBA", (*rgb.split(), Image.fromarray(ramp))), "WEBP"),
    }[case]
    options = {"transparency": 0} if case == "palette_alpha_png" else {}
    if fmt == "WEBP":
        options["lossless"] = True
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def reset_peak() -> None:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux: ``clear_refs`` 5), so that imports do not count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(case: str, path: Path, side: int) -> dict[str, float]:
    """In this process: the peak RSS rise of one decode over the baseline with the encoded image held."""
    data = path.read_bytes()
    preprocessor = Preprocessor(TransformSpec(input_size=224), max_pixels=side * side,
                                allowed_formats=SERVED_FORMATS)
    preprocessor.decode(preprocessor.open(make(case, 64)))  # warm the code paths on a small image
    reset_peak()
    baseline = peak_rss()
    preprocessor.decode(preprocessor.open(data))
    rise = max(0, peak_rss() - baseline)
    return {"case": case, "megapixels": side * side / 1e6, "encoded_kb": len(data) / 1024,
            "peak_rise_mb": rise / 2**20, "bytes_per_pixel": rise / (side * side)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=16.0)
    parser.add_argument("--case", choices=CASES, help="measure one case in this process (used by the script)")
    parser.add_argument("--file", type=Path, help="the encoded image of --case")
    args = parser.parse_args(argv)
    side = int((args.megapixels * 1e6) ** 0.5)
    if args.case:
        print(json.dumps(measure(args.case, args.file, side)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for case in CASES:
            path = Path(directory) / case
            path.write_bytes(make(case, side))
            result = subprocess.run([sys.executable, __file__, "--case", case, "--file", str(path), "--megapixels",
                                     str(args.megapixels)], capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"| image ({side}×{side}) | encoded KB | peak RSS rise MB | bytes per pixel |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['encoded_kb']:,.0f} | {row['peak_rise_mb']:,.0f} | "
              f"{row['bytes_per_pixel']:.1f} |")
    print(f"\nlargest: {max(row['bytes_per_pixel'] for row in rows):.1f} bytes per pixel")


if __name__ == "__main__":
    main()
