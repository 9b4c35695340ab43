"""load_image: every common PNG mode to 8-bit RGB, and one typed error naming the file for every bad input."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from ppiad.data.images import ImageLoadError, is_image_file, load_image


def save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_grayscale(tmp_path):
    p = save(Image.fromarray(np.full((4, 5), 77, np.uint8), "L"), tmp_path / "g.png")
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (5, 4)
    assert np.asarray(img)[0, 0].tolist() == [77, 77, 77]


def test_rgba_composites_over_white(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)      # opaque red
    arr[0, 1] = (0, 0, 0, 0)          # fully transparent -> white
    arr[1, 0] = (0, 0, 0, 128)        # half black over white -> mid grey
    img = np.asarray(load_image(save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png")))
    assert img[0, 0].tolist() == [255, 0, 0]
    assert img[0, 1].tolist() == [255, 255, 255]
    assert 120 <= img[1, 0, 0] <= 135


def test_palette(tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1])
    img = np.asarray(load_image(save(pal, tmp_path / "p.png")))
    assert img.shape == (1, 3, 3) and img[0, 0].tolist() == [10, 20, 30] and img[0, 2].tolist() == [200, 100, 50]


def test_palette_with_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putdata([0, 1])
    p = save(pal, tmp_path / "pt.png", transparency=0)  # index 0 is transparent
    assert "transparency" in Image.open(p).info
    img = np.asarray(load_image(p))
    assert img[0, 0].tolist() == [255, 255, 255] and img[0, 1].tolist() == [0, 255, 0]


def test_16bit_png_scales_full_range(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], np.uint16)
    p = save(Image.fromarray(arr), tmp_path / "d16.png")
    assert Image.open(p).mode.startswith("I")
    img = np.asarray(load_image(p))
    assert img[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled by 255/65535, not clipped at 255
    dark = np.asarray(load_image(save(Image.fromarray(np.full((2, 2), 200, np.uint16)), tmp_path / "dark.png")))
    assert dark.max() <= 1  # a dark 16-bit image stays dark


def test_jpeg_and_extensions(tmp_path):
    p = save(Image.new("RGB", (8, 8), (10, 200, 30)), tmp_path / "x.JPG", format="JPEG", quality=95)
    assert np.abs(np.asarray(load_image(p)).astype(int) - [10, 200, 30]).max() < 8
    assert is_image_file("a/B.JPEG") and is_image_file("c.png") and not is_image_file("d.txt")


def expect_error(path, reason):
    with pytest.raises(ImageLoadError) as info:
        load_image(str(path))
    assert str(path) in str(info.value) and reason in info.value.reason
    return info.value


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.png", "does not exist")


def test_zero_byte(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    expect_error(tmp_path / "z.png", "empty")


def encoded(fmt, **kw):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_truncated_png(tmp_path):
    data = encoded("PNG")
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "t.png", "truncated")


def test_truncated_jpeg(tmp_path):
    data = encoded("JPEG", quality=90)
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    expect_error(tmp_path / "t.jpg", "truncated")


def test_text_file_renamed_png(tmp_path):
    (tmp_path / "fake.png").write_text("this is not an image\n")
    expect_error(tmp_path / "fake.png", "not a recognised image format")


def test_directory(tmp_path):
    (tmp_path / "dir.png").mkdir()
    expect_error(tmp_path / "dir.png", "directory")


def test_unreadable_permission(tmp_path):
    p = tmp_path / "locked.png"
    p.write_bytes(encoded("PNG"))
    os.chmod(p, 0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads, so this case cannot be produced")
        expect_error(p, "permission denied")
    finally:
        os.chmod(p, 0o644)


def test_permission_error_is_typed(tmp_path, monkeypatch):
    """The same path without needing a non-root user: the OS refusing the open becomes ImageLoadError."""
    p = tmp_path / "locked2.png"
    p.write_bytes(encoded("PNG"))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Image, "open", refuse)
    expect_error(p, "permission denied")
