"""Smart resize keeps every image within max_pixels with sides of at least 28 px, over a grid of sizes; extreme
aspect ratios are refused by smart_resize and padded by the processor (issue 12, item 8)."""
import numpy as np
import pytest
from PIL import Image

from ppiad.models.processor import ImageProcessor, max_aspect_ratio, pad_to_aspect, smart_resize

SIDES = [1, 3, 13, 14, 15, 27, 28, 29, 42, 50, 55, 56, 57, 100, 223, 224, 333, 500, 640, 1000, 1567, 2048,
         4000, 10000]
BUDGETS = [(3136, 12544), (3136, 50176), (56 * 56, 28 * 28 * 1280), (12544, 12544), (10000, 12544),
           (3136, 401408)]


def test_issue_example_stays_within_budget():
    # 50 x 10000 (ratio 200) at max_pixels 12,544 used to give 28 x 1568 = 43,904 px; no 28-px grid size within
    # 12,544 keeps a 200:1 aspect (at most 16:1), so it is refused ...
    with pytest.raises(ValueError, match=r"aspect ratio 200.0 is above 16.*max_pixels 12544"):
        smart_resize(50, 10000, 28, 3136, 12544)
    # ... and the processor pads it to 16:1 (10000 x 625) instead: 28 x 420 = 11,760 px (the floor of 16.0 - eps
    # grid steps: the downscale rounds down)
    ip = ImageProcessor(min_pixels=3136, max_pixels=12544)
    _, (t, gh, gw) = ip.preprocess(Image.new("RGB", (10000, 50), (0, 0, 0)))
    assert (gh * 14, gw * 14) == (28, 420)


@pytest.mark.parametrize("min_pixels,max_pixels", BUDGETS)
def test_grid_of_sizes(min_pixels, max_pixels):
    limit = max_aspect_ratio(28, max_pixels)
    checked = 0
    for h in SIDES:
        for w in SIDES:
            if max(h, w) / min(h, w) > limit:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(h, w, 28, min_pixels, max_pixels)
                continue
            rh, rw = smart_resize(h, w, 28, min_pixels, max_pixels)
            where = f"{h}x{w} at [{min_pixels}, {max_pixels}] -> {rh}x{rw}"
            assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28, where
            assert rh * rw <= max_pixels, where
            # aspect kept to the grid: one scale s puts each side within one 28-px step of its result,
            # i.e. the intervals [(r - 28) / side, (r + 28) / side] of the two sides overlap
            lo = max((rh - 28) / h, (rw - 28) / w)
            hi = min((rh + 28) / h, (rw + 28) / w)
            assert lo <= hi, where
            checked += 1
    assert checked > 300


def test_min_pixels_is_met_when_max_pixels_allows():
    for h in SIDES:
        for w in SIDES:
            if max(h, w) / min(h, w) <= max_aspect_ratio(28, 50176):
                rh, rw = smart_resize(h, w, 28, 3136, 50176)
                assert rh * rw >= 3136


def test_rounding_up_to_min_pixels_never_passes_max_pixels():
    # min_pixels close to max_pixels: the reference's ceil on both sides gives 112 x 140 = 15,680 > 12,544
    rh, rw = smart_resize(90, 110, 28, 10000, 12544)
    assert rh * rw <= 12544 and rh % 28 == 0 and rw % 28 == 0


def test_processor_pads_extreme_aspects_and_respects_budget():
    ip = ImageProcessor(min_pixels=3136, max_pixels=50176)
    for size in [(20000, 40), (40, 20000), (5000, 10), (3000, 100)]:
        img = Image.fromarray(np.full((size[1], size[0], 3), 128, dtype=np.uint8))
        _, (_, gh, gw) = ip.preprocess(img)
        assert gh * gw * 14 * 14 <= 50176 and min(gh, gw) * 14 >= 28


def test_pad_to_aspect():
    strip = Image.new("RGB", (5000, 10), (0, 0, 0))
    padded = pad_to_aspect(strip, 16)
    assert padded.size == (5000, 313) and max(padded.size) / min(padded.size) <= 16
    arr = np.asarray(padded)
    assert (arr[:10] == 255).all() and (arr[151:161] == 0).all()   # centred, white around
    same = Image.new("RGB", (50, 40))
    assert pad_to_aspect(same, 16) is same
