"""16-bit files holding 10/12-bit data: the PNG sBIT chunk and data.<partition>.bit_depth (issue 12, item 8).
The PNGs are written by hand (Pillow cannot write sBIT), row filter 0, so the bytes are exactly what a
camera's driver would store."""
import struct
import zlib

import numpy as np
import pytest

from ppiad.config import ConfigError, load_config
from ppiad.data.images import ImageLoadError, load_image, png_header


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png16(path, arr: np.ndarray, sbit=None) -> str:
    """A 16-bit PNG: grey for [H, W], RGB for [H, W, 3]; `sbit` = the sBIT chunk's bytes."""
    colour = 0 if arr.ndim == 2 else 2
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(arr.shape[0]))
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 16,
                                                                   colour, 0, 0, 0))
    if sbit is not None:
        data += _chunk(b"sBIT", bytes(sbit))
    data += _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def ramp12() -> np.ndarray:
    """Full-range 12-bit data, values 0..4095, in the low bits of 16-bit samples."""
    return np.linspace(0, 4095, 8 * 16).round().astype(np.uint16).reshape(8, 16)


def test_full_range_12bit_without_sbit_loads_dark_by_default(tmp_path):
    # the example: brightest pixel 16/255 when 12-bit data is scaled as 16-bit
    img = np.asarray(load_image(write_png16(tmp_path / "a.png", ramp12())))
    assert img.max() == 16


def test_sbit_12_scales_the_12bit_range(tmp_path):
    path = write_png16(tmp_path / "a.png", ramp12(), sbit=[12])
    assert png_header(path) == (16, 0, (12,))
    img = np.asarray(load_image(path))
    assert img.shape == (8, 16, 3) and img.max() == 255 and img.min() == 0
    want = np.clip(ramp12() / 4095 * 255 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(img[..., 0], want)


def test_sbit_10_and_bit_depth_setting(tmp_path):
    ten = (ramp12() // 4).astype(np.uint16)   # 0..1023
    assert np.asarray(load_image(write_png16(tmp_path / "s.png", ten, sbit=[10]))).max() == 255
    plain = write_png16(tmp_path / "n.png", ten)
    assert np.asarray(load_image(plain, "10")).max() == 255
    assert np.asarray(load_image(plain, 10)).max() == 255   # YAML may give a number
    assert np.asarray(load_image(write_png16(tmp_path / "t.png", ramp12()), "12")).max() == 255


def test_sbit_wins_over_the_setting(tmp_path):
    path = write_png16(tmp_path / "a.png", ramp12(), sbit=[12])
    assert np.asarray(load_image(path, "16")).max() == 255


def test_sbit_with_data_scaled_up_to_16_bits_is_read_at_full_range(tmp_path):
    # the PNG spec's own storage: 12-bit values shifted into the high bits, sBIT saying 12
    shifted = (ramp12().astype(np.uint32) << 4).astype(np.uint16)
    img = np.asarray(load_image(write_png16(tmp_path / "a.png", shifted, sbit=[12])))
    assert img.max() == 255 and img.min() == 0


def test_setting_too_small_for_the_data_is_an_error_naming_the_file(tmp_path):
    path = write_png16(tmp_path / "wide.png", ramp12() * 16)
    with pytest.raises(ImageLoadError, match=r"wide\.png.*does not fit 12 bits \(data\.bit_depth=12\)"):
        load_image(path, "12")
    with pytest.raises(ValueError, match="bit_depth must be one of"):
        load_image(path, "11")


def test_16bit_colour_with_low_bit_data_is_refused_not_darkened(tmp_path):
    rgb = np.stack([ramp12()] * 3, axis=-1)
    with pytest.raises(ImageLoadError, match="16-bit colour PNG holding 12-bit data"):
        load_image(write_png16(tmp_path / "c.png", rgb, sbit=[12, 12, 12]))
    full = np.stack([ramp12() * 16] * 3, axis=-1)   # full-range 16-bit colour: loads as before
    assert np.asarray(load_image(write_png16(tmp_path / "f.png", full))).max() == 255


def test_config_key(tmp_path):
    cfg = load_config(None, ["data.eval.bit_depth=12"])
    assert cfg.data.eval.bit_depth == "12" and cfg.data.train.bit_depth == "auto"
    with pytest.raises(ConfigError, match="bit_depth"):
        load_config(None, ["data.eval.bit_depth=11"])
