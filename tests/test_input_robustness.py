"""Input robustness: EXIF orientation, file modes of atomic writes."""
import os
import stat

import numpy as np
from PIL import Image

from ppiad.data.images import load_image
from ppiad.utils.io import atomic_write_json, atomic_write_text


def test_exif_orientation_applied(tmp_path):
    # Stored 100 wide x 40 high; orientation 6 = "rotate 90 CW to display": upright it is 40 wide x 100 high.
    img = Image.fromarray(np.zeros((40, 100, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = str(tmp_path / "phone.jpg")
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (100, 40)
    assert load_image(path).size == (40, 100)


def test_no_exif_keeps_size(tmp_path):
    path = str(tmp_path / "plain.png")
    Image.fromarray(np.zeros((40, 100, 3), np.uint8)).save(path)
    assert load_image(path).size == (100, 40)


def test_atomic_write_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        atomic_write_json(str(tmp_path / "b.json"), {"a": 1})
        os.umask(0o077)
        atomic_write_text(str(tmp_path / "c.txt"), "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "c.txt").st_mode) == 0o600
