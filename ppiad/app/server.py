"""The inspection web app: a Gradio page and a JSON API on one FastAPI server, over one loaded model.

    GET  /api/health   -> {"status": "ok", "model", "adapter", "threshold", "threshold_source", "images_inspected"}
    POST /api/inspect  multipart: image (file), object (optional text), threshold (optional, in [0, 1])
                       -> {"verdict", "p_defect", "reasoning", "answer_valid", "threshold", "object", "answer"}
                       bad input -> HTTP 400 {"error": "<one line>"}
    /                  the page: upload images (or name a folder on the server), object name, a live decision
                       threshold, the results table, a gallery sorted by P(defect), a CSV download.

Requests queue on the model (a lock in `Inspector`, and Gradio's queue with one worker for the page).
`build_app` only assembles; `ppiad serve` (ppiad/cli/serve.py) loads the model and runs uvicorn.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field

from PIL import Image

# At module level: FastAPI resolves the endpoint's (string) annotations in this module's namespace.
from fastapi import UploadFile

# No usage reporting to Gradio's servers from an inspection station (a user's setting is kept).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from ppiad.app.inspection import (InputError, Inspection, Inspector, check_threshold, read_image_file, read_upload,
                                  results_csv)
from ppiad.utils.io import atomic_path

GALLERY_MAX = 60  # drawn verdict images shown at once (the table and the CSV hold every image)
THUMB_SIDE = 448  # the side ppiad.vis.draw scales images to


@dataclass
class AppInfo:
    """What the page and /api/health say about the loaded model and the defaults."""
    model: str
    adapter: str | None
    threshold: float
    threshold_source: str
    default_object: str
    object_names: dict = field(default_factory=dict)
    folder_root: str = "."
    max_images: int = 500


def _object(typed: str | None, fallback: str, object_names: dict) -> str:
    from ppiad.prompt import object_phrase

    typed = (typed or "").strip()
    return object_phrase(typed, object_names) if typed else fallback


def list_server_folder(folder: str, root: str, max_images: int) -> tuple[list[str], int]:
    """(image paths, skipped non-image entries) of a folder on the server, which must lie inside `root`; a
    relative `folder` is taken relative to `root` (ppiad serve --folder_root), not the server's working directory."""
    from ppiad.data.images import is_image_file

    if not os.path.isabs(os.path.expanduser(folder)):
        folder = os.path.join(root, folder)
    real, real_root = os.path.realpath(folder), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise InputError(f"folder '{folder}' is outside the folder the server may read ({real_root}; "
                         f"see ppiad serve --folder_root)")
    if not os.path.isdir(real):
        raise InputError(f"folder '{folder}' does not exist on the server" if not os.path.exists(real)
                         else f"'{folder}' is not a folder")
    entries = sorted(os.listdir(real))
    images = [os.path.join(real, e) for e in entries if is_image_file(e) and os.path.isfile(os.path.join(real, e))]
    if not images:
        raise InputError(f"no image files in folder '{folder}' ({len(entries)} other entries)")
    if len(images) > max_images:
        raise InputError(f"folder '{folder}' holds {len(images)} images, more than the {max_images} a request may "
                         f"inspect (ppiad serve --max_images)")
    return images, len(entries) - len(images)


class Page:
    """The Gradio page's callbacks (plain methods, so they are testable without a browser)."""

    def __init__(self, inspector: Inspector, info: AppInfo, work_dir: str):
        self.inspector = inspector
        self.info = info
        self.work_dir = work_dir

    def run(self, files, folder, typed_object, threshold):
        """Inspect uploads or a server folder -> (state, summary, table, gallery, csv path).

        The state holds each result with a thumbnail, so `render` can re-decide at another threshold."""
        threshold = check_threshold(threshold)
        files = [f for f in (files or []) if f]
        folder = (folder or "").strip()
        skipped = 0
        try:
            if files and folder:
                raise InputError("give images or a folder, not both")
            if folder:
                paths, skipped = list_server_folder(folder, self.info.folder_root, self.info.max_images)
                fallback = _object(os.path.basename(os.path.normpath(folder)), "", self.info.object_names)
            elif files:
                if len(files) > self.info.max_images:
                    raise InputError(f"{len(files)} images, more than the {self.info.max_images} a request may inspect")
                paths, fallback = [_path_of(f) for f in files], self.info.default_object
            else:
                raise InputError("nothing to inspect: upload images or name a folder on the server")
        except InputError as exc:
            return None, f"**{exc}**", _table([], threshold), [], None
        obj = _object(typed_object, fallback, self.info.object_names)
        state = {"run": uuid.uuid4().hex[:12], "items": self._inspect(paths, obj), "skipped": skipped}
        return (state, *self.render(state, threshold))

    def _inspect(self, paths: list[str], obj: str) -> list[tuple[Inspection, Image.Image | None]]:
        """(result, thumbnail) per path, in order; one model batch of images in memory at a time."""
        items = []
        step = self.inspector.batch_size
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            loaded, errors = {}, {}
            for p in chunk:
                try:
                    loaded[p] = read_image_file(p, self.inspector.max_bytes)
                except InputError as exc:
                    errors[p] = Inspection(name=os.path.basename(p), object=obj, error=str(exc))
            ok = [p for p in chunk if p in loaded]
            results = dict(zip(ok, self.inspector.inspect([loaded[p] for p in ok],
                                                          [os.path.basename(p) for p in ok], obj)))
            for p in chunk:
                thumb = None
                if p in loaded:
                    thumb = loaded.pop(p)
                    thumb.thumbnail((THUMB_SIDE, THUMB_SIDE))
                items.append((results.get(p) or errors[p], thumb))
        return items

    def render(self, state, threshold):
        """(summary, table, gallery, csv path) of inspected results at `threshold`: the live re-decision."""
        from ppiad.vis.draw import render_verdict

        threshold = check_threshold(threshold)
        if not state or not state.get("items"):
            return "", _table([], threshold), [], None
        items = state["items"]
        ranked = sorted(items, key=lambda rt: (rt[0].error is not None, -(rt[0].p_defect or 0.0)))
        gallery = [(render_verdict(t, r.verdict(threshold), r.p_defect, r.reasoning, title=f"{r.name} ({r.object})"),
                    f"{r.name}: {r.verdict(threshold)}" + ("" if r.p_defect is None else f", P(defect) {r.p_defect:.3f}"))
                   for r, t in ranked if t is not None][:GALLERY_MAX]
        # One CSV per inspection run, rewritten at each threshold (Gradio serves a copy of its current content).
        csv_path = os.path.join(self.work_dir, f"ppiad_inspection_{state['run']}.csv")
        with atomic_path(csv_path) as tmp:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(results_csv([r for r, _ in ranked], threshold))
        results = [r for r, _ in items]
        return (_summary(results, threshold, state.get("skipped", 0)), _table([r for r, _ in ranked], threshold),
                gallery, csv_path)


def _path_of(f) -> str:
    return f if isinstance(f, str) else getattr(f, "name", None) or getattr(f, "path", str(f))


def _summary(results: list[Inspection], threshold: float, skipped: int) -> str:
    verdicts = [r.verdict(threshold) for r in results]
    errors = [r for r in results if r.error]
    if len(results) == 1 and not errors:
        r = results[0]
        score = "n/a" if r.p_defect is None else f"{r.p_defect:.3f}"
        rel = "" if r.p_defect is None else (" >= " if r.p_defect >= threshold else " < ")
        lines = [f"### Verdict: {verdicts[0].upper()}",
                 f"P(defect) = {score}{rel}{threshold:.2f} (threshold)" if rel else f"P(defect) = {score}",
                 f"object: {r.object}; the model's own answer: {r.answer or 'none'}"
                 + ("" if r.answer_valid else " (the output breaks the answer format)"),
                 "", f"**Reasoning:** {r.reasoning or '(none)'}"]
        return "\n\n".join(lines)
    counts = {v: verdicts.count(v) for v in ("defect", "normal", "unknown")}
    text = (f"### {len(results)} images: {counts['defect']} defect, {counts['normal']} normal"
            + (f", {counts['unknown']} without an answer" if counts["unknown"] else "")
            + (f", {len(errors)} not inspected" if errors else "") + f" (threshold {threshold:.2f})")
    if skipped:
        text += f"\n\n{skipped} non-image entries of the folder skipped"
    if errors:
        text += "\n\n" + "\n".join(f"- {r.error}" for r in errors)
    return text


TABLE_HEADERS = ["file", "verdict", "P(defect)", "answer", "valid format", "reasoning"]


def _table(results: list[Inspection], threshold: float) -> list[list]:
    return [[r.name, r.verdict(threshold), "" if r.p_defect is None else round(r.p_defect, 4), r.answer or "",
             r.answer_valid, r.error or r.reasoning] for r in results]


def build_page(page: Page):
    import gradio as gr

    info = page.info
    where = info.model + (f" + adapter {info.adapter}" if info.adapter else "")
    with gr.Blocks(title="ppiad inspection", analytics_enabled=False) as blocks:
        gr.Markdown(f"## ppiad inspection\nModel: `{where}`. Threshold default: {info.threshold:.2f} "
                    f"({info.threshold_source}). JSON API: `POST /api/inspect`, `GET /api/health`.")
        state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                files = gr.File(label="Images", file_count="multiple", type="filepath", elem_id="images")
                folder = gr.Textbox(label="...or a folder on the server", elem_id="folder",
                                    placeholder=f"a folder inside {os.path.realpath(info.folder_root)} "
                                                "(or relative to it)")
                obj = gr.Textbox(label="Object name", elem_id="object",
                                 placeholder=f"default: {info.default_object} (a folder: its name)")
                threshold = gr.Slider(0.0, 1.0, value=info.threshold, step=0.01, elem_id="threshold",
                                      label="Decision threshold: defect when P(defect) >= threshold")
                button = gr.Button("Inspect", variant="primary", elem_id="inspect")
            with gr.Column(scale=2):
                summary = gr.Markdown(elem_id="summary")
                table = gr.Dataframe(headers=TABLE_HEADERS, value=[], interactive=False, wrap=True,
                                     elem_id="results", label="Results, by P(defect)")
                gallery = gr.Gallery(label="Drawn verdicts, by P(defect) (click to enlarge)", columns=3, object_fit="contain",
                                     elem_id="gallery")
                csv_file = gr.File(label="Results as CSV", elem_id="csv", interactive=False)
        button.click(_guard(page.run, 5), [files, folder, obj, threshold], [state, summary, table, gallery, csv_file])
        threshold.change(_guard(page.render, 4), [state, threshold], [summary, table, gallery, csv_file])
    return blocks


def _guard(fn, n_out: int):
    """A callback that turns any failure into a message in the summary (the 4th output from the end) and
    leaves the other outputs as they are; the server keeps serving."""
    import gradio as gr

    def wrapped(*args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the server stays up
            # InputError and PromptTooLongError (both ValueError) are the user's to fix: their message as it is
            message = _one_line(exc) if isinstance(exc, ValueError) else f"error: {type(exc).__name__}: {exc}"
            out = [gr.skip()] * n_out
            out[-4] = f"**{message}**"
            return tuple(out)
    return wrapped


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _upload_size(upload) -> int | None:
    """The uploaded file's full size in bytes (the request body is already spooled by the server), or None."""
    size = getattr(upload, "size", None)
    if size is not None:
        return int(size)
    try:
        pos = upload.file.tell()
        end = upload.file.seek(0, os.SEEK_END)
        upload.file.seek(pos)
        return int(end)
    except (AttributeError, OSError, ValueError):
        return None


def build_app(inspector: Inspector, info: AppInfo, work_dir: str | None = None):
    """The FastAPI app: /api/health, /api/inspect, and the Gradio page mounted at /."""
    import gradio as gr
    from fastapi import FastAPI, File, Form
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    if work_dir is None:  # the page's CSV files; removed when the server process ends
        work_dir = tempfile.mkdtemp(prefix="ppiad_serve_")
        atexit.register(shutil.rmtree, work_dir, True)
    app = FastAPI(title="ppiad inspection API")

    @app.get("/api/health")
    def health():
        return {"status": "ok", "model": info.model, "adapter": info.adapter, "threshold": info.threshold,
                "threshold_source": info.threshold_source, "images_inspected": inspector.images_inspected}

    @app.post("/api/inspect")
    async def inspect(image: UploadFile | None = File(None), object: str | None = Form(None),
                      threshold: str | None = Form(None)):
        try:
            t = info.threshold if threshold in (None, "") else check_threshold(threshold)
            if image is None:
                raise InputError("no file in the multipart field 'image'")
            data = await image.read(inspector.max_bytes + 1)
            img = read_upload(data, image.filename or "upload", inspector.max_bytes, size=_upload_size(image))
            obj = _object(object, info.default_object, info.object_names)
            (result,) = await run_in_threadpool(inspector.inspect, [img], [image.filename or "upload"], obj)
        except ValueError as exc:  # InputError, PromptTooLongError, the image or text the processor refuses
            return JSONResponse(status_code=400, content={"error": _one_line(exc)})
        return result.to_json(t)

    page = Page(inspector, info, work_dir)
    blocks = build_page(page)
    blocks.queue(default_concurrency_limit=1)
    return gr.mount_gradio_app(app, blocks, path="/", ssr_mode=False, allowed_paths=[work_dir],
                               max_file_size=inspector.max_bytes, footer_links=[])
