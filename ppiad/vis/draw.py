"""Draw an inspected image with its verdict, P(defect) and the model's reasoning in a panel beside it."""
from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from ppiad.utils.io import atomic_path

COLOURS = {"defect": (200, 30, 30), "normal": (20, 140, 60), "unknown": (110, 110, 110)}
PANEL_WIDTH = 420
IMAGE_SIDE = 448  # the image is scaled so its longer side is this many pixels
MARGIN = 14


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable built-in font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to `width` pixels; overlong words are cut by characters."""
    lines: list[str] = []
    for paragraph in (text or "").splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            trial = f"{line} {word}".strip()
            if draw.textlength(trial, font=font) <= width:
                line = trial
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def render_verdict(image: Image.Image, verdict: str, score: float | None, reasoning: str | None,
                   title: str = "", panel_width: int = PANEL_WIDTH, image_side: int = IMAGE_SIDE) -> Image.Image:
    """Return a new RGB image: `image` (scaled) on the left, verdict / score / reasoning on the right.

    verdict is "defect", "normal" or "unknown" (no valid answer); score is P(defect) or None.
    """
    img = image.convert("RGB")
    scale = image_side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)

    big, small = _font(22), _font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = panel_width - 2 * MARGIN
    body = _wrap(reasoning.strip() if reasoning else "(no reasoning given)", small, text_w, probe)
    head = _wrap(title, small, text_w, probe) if title else []
    line_h = 18
    needed = MARGIN * 2 + 34 + 24 + line_h * (len(head) + len(body) + 2)
    height = max(img.height, needed)
    canvas = Image.new("RGB", (img.width + panel_width, height), (255, 255, 255))
    canvas.paste(img, (0, (height - img.height) // 2))

    draw = ImageDraw.Draw(canvas)
    colour = COLOURS.get(verdict, COLOURS["unknown"])
    x, y = img.width + MARGIN, MARGIN
    draw.rectangle([img.width, 0, img.width + 5, height], fill=colour)  # colour bar: verdict at a glance
    for line in head:
        draw.text((x, y), line, fill=(60, 60, 60), font=small)
        y += line_h
    draw.text((x, y), verdict.upper(), fill=colour, font=big)
    y += 34
    draw.text((x, y), "P(defect) = " + ("n/a" if score is None else f"{score:.3f}"), fill=(0, 0, 0), font=small)
    y += 24 + line_h // 2
    draw.text((x, y), "Reasoning:", fill=(60, 60, 60), font=small)
    y += line_h
    for line in body:
        draw.text((x, y), line, fill=(0, 0, 0), font=small)
        y += line_h
    return canvas


def save_verdict(path: str, image: Image.Image, verdict: str, score: float | None, reasoning: str | None,
                 title: str = "") -> str:
    """Render and write a PNG atomically; returns `path`."""
    with atomic_path(path) as tmp:
        render_verdict(image, verdict, score, reasoning, title).save(tmp, format="PNG")
    return path
