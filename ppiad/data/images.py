"""The one image loader used everywhere: any common mode in, 8-bit RGB out, one typed error for bad files."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageLoadError(Exception):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot load image '{path}': {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb8(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the full range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency over white: a transparent background is not a defect.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Load `path` as an 8-bit RGB PIL image, or raise ImageLoadError naming the file."""
    if not os.path.exists(path):
        raise ImageLoadError(path, "file does not exist")
    if os.path.isdir(path):
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(path, "file is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()  # force decoding now so truncated files fail here, not later
            return _to_rgb8(img)
    except ImageLoadError:
        raise
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None
