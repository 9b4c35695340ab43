"""The one image loader used everywhere: any common mode in, 8-bit RGB out, one typed error for bad files.

16-bit files holding 10-, 12- or 14-bit data (as industrial cameras write them: the values in the low bits,
0..4095 for 12-bit) are scaled by their real range, 2**bits - 1, not by 65535 (which would make a full-range
12-bit image's brightest pixel 16/255). The number of bits comes from, in order:
1. the PNG `sBIT` chunk (significant bits per channel, PNG spec 11.3.3.4), when the data fit in those bits;
   a file whose values exceed them stores the data scaled up to 16 bits as the PNG spec intends, and is
   read at full range;
2. `bit_depth` (config `data.<partition>.bit_depth`) for files without sBIT: "auto" = the container's depth
   (16), or 10 / 12 / 14 / 16. A value above 2**bit_depth - 1 is an error naming the file, not a clip.
16-bit colour PNGs: Pillow keeps only the high byte of each sample, which for low-bit 10/12-bit data leaves
at most 16 levels; such a file is refused with an error saying so (full-range 16-bit colour loads as before).
"""
from __future__ import annotations

import os
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
BIT_DEPTHS = ("auto", "8", "10", "12", "14", "16")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageLoadError(Exception):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot load image '{path}': {reason}")
        self.path = path
        self.reason = reason


def is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def png_header(path: str) -> tuple[int, int, tuple[int, ...] | None] | None:
    """(bit depth, colour type, sBIT bytes or None) from a PNG's chunks before the image data; None for a
    file that is not a PNG. Reads only the chunk headers (and the small IHDR / sBIT bodies)."""
    with open(path, "rb") as f:
        if f.read(8) != _PNG_SIGNATURE:
            return None
        depth = colour = None
        sbit = None
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                break
            if kind == b"IHDR":
                body = f.read(length)
                if len(body) < 13:
                    return None
                depth, colour = body[8], body[9]
            elif kind == b"sBIT" and length <= 4:
                sbit = tuple(f.read(length))
            else:
                f.seek(length, os.SEEK_CUR)
            f.seek(4, os.SEEK_CUR)   # CRC
        return None if depth is None else (depth, colour, sbit)


def _significant_bits(path: str, bit_depth: str) -> tuple[int | None, str]:
    """(bits of the data in a 16-bit container or None = full range, where that came from)."""
    header = png_header(path) if path.lower().endswith(".png") else None
    if header and header[2]:
        depth, colour, sbit = header
        colour_bits = sbit[:1] if colour in (0, 4) else sbit[:3]   # grey(+alpha): 1 value; RGB(A)/palette: 3
        return max(colour_bits), "the file's sBIT chunk"
    if bit_depth == "auto":
        return None, ""
    return int(bit_depth), f"data.bit_depth={bit_depth}"


def _to_rgb8(img: Image.Image, path: str = "", bit_depth: str = "auto") -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale the data's real range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        bits, source = _significant_bits(path, bit_depth) if path else (None, "")
        if bits is not None and bits < 16 and top == 65535.0:
            peak = float(arr.max()) if arr.size else 0.0
            if peak <= 2 ** bits - 1:
                top = 2.0 ** bits - 1
            elif source.startswith("data.bit_depth"):
                raise ImageLoadError(path, f"pixel value {peak:.0f} does not fit {bits} bits ({source}); set "
                                           f"the partition's bit_depth to the camera's depth or auto")
            # else: sBIT with data scaled up to 16 bits (the PNG spec's way): full range
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if path.lower().endswith(".png") and img.mode in ("RGB", "RGBA"):
        _check_16bit_colour(img, path, bit_depth)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency over white: a transparent background is not a defect.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_16bit_colour(img: Image.Image, path: str, bit_depth: str) -> None:
    header = png_header(path)
    if not header or header[0] != 16:
        return
    bits, source = _significant_bits(path, bit_depth)
    if bits is None or bits >= 16:
        return
    high = np.asarray(img)[..., :3]   # Pillow's 8-bit view: the high byte of each 16-bit sample
    if high.size and int(high.max()) <= 2 ** (bits - 8) - 1:
        raise ImageLoadError(path, f"16-bit colour PNG holding {bits}-bit data ({source}): the image library "
                                   f"keeps only the high byte ({2 ** (bits - 8)} levels); save it as 16-bit "
                                   f"grayscale or 8-bit colour")


def load_image(path: str, bit_depth: str = "auto") -> Image.Image:
    """Load `path` as an 8-bit RGB PIL image, or raise ImageLoadError naming the file.

    `bit_depth` ("auto", "8", "10", "12", "14", "16"): the data's bits in 16-bit files without a PNG sBIT
    chunk (see the module docstring)."""
    if str(bit_depth) not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be one of {', '.join(BIT_DEPTHS)}, got {bit_depth!r}")
    bit_depth = str(bit_depth)
    if not os.path.exists(path):
        raise ImageLoadError(path, "file does not exist")
    if os.path.isdir(path):
        raise ImageLoadError(path, "is a directory, not an image file")
    try:
        if os.path.getsize(path) == 0:
            raise ImageLoadError(path, "file is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()  # force decoding now so truncated files fail here, not later
            upright = ImageOps.exif_transpose(img)   # EXIF orientation (phone photos): rotate to upright
            return _to_rgb8(upright, path, bit_depth)
    except ImageLoadError:
        raise
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None
