"""Inspect one image or a folder: verdict (defect/normal), P(defect) and the model's reasoning.

    python tools/infer.py -c configs/demo.yaml --image part.png --object "metal washer"
    python tools/infer.py -c configs/demo.yaml --image_dir data/washer/test/scratch --object washer --json
    python tools/infer.py -c configs/demo.yaml --image_dir incoming/ --save_vis vis/
    python ppiad/cli/infer.py -c configs/demo.yaml --image part.png --object washer --reference good1.png --reference good2.png

--reference IMG (repeatable) puts those normal images before each inspected image (a k-shot prompt, k = the
number given); a config with prompt.reference_images = k > 0 needs exactly k of them.
    python tools/infer.py --model models/Qwen2-VL-7B-Instruct --adapter output/run/checkpoints/latest --image x.png
    python tools/infer.py --image part.png     (after `make demo`: the demo's trained model)

In a folder, files without an image extension are skipped (and counted); an image that cannot be read is
reported on its own line and the folder goes on. Exit code 0 on success, 2 on bad input (one-line reason).
"""
from __future__ import annotations

import warnings

# Paddle warns about a missing C++ compiler cache on import; it concerns extension builds, not this tool.
warnings.filterwarnings("ignore", message="No ccache found")

import argparse
import json
import os
import sys

from ppiad.data.images import is_image_file
from ppiad.eval.runner import try_load
from ppiad.prompt import default_object, object_phrase
from ppiad.utils.cli import UsageError, add_config_args, add_model_args, config_from_args, user_errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="one image file")
    src.add_argument("--image_dir", help="a folder of images (not recursive)")
    p.add_argument("--object", help="object name for the prompt, e.g. 'pill' (default for --image_dir: the "
                                    "folder name; for --image: the config's one eval category, else 'product')")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    p.add_argument("--save_vis", metavar="DIR", help="write each image with its verdict and reasoning as PNG")
    p.add_argument("--batch_size", type=int, default=None, help="images per batch (default: eval.batch_size)")
    p.add_argument("--reference", action="append", default=[], metavar="IMG",
                   help="a normal image of the same product shown before each inspected image (repeatable: k-shot)")
    return p


def _load_references(args, cfg) -> list:
    """The --reference images, loaded (a bad file fails here, before the model is loaded)."""
    k = cfg.prompt.reference_images
    if k and len(args.reference) != k:
        raise UsageError(f"prompt.reference_images={k}: give {k} normal image(s) with --reference IMG "
                         f"(got {len(args.reference)})")
    images = []
    for path in args.reference:
        if not os.path.isfile(path):
            raise UsageError(f"--reference '{path}' is not a file" if os.path.exists(path)
                             else f"--reference '{path}' does not exist")
        img, err = try_load(path, cfg.data.eval.bit_depth)
        if err:
            raise UsageError(f"--reference: {err}")
        images.append(img)
    return images


def _object_name(cfg, name: str) -> str:
    return object_phrase(name, cfg.data.object_names)


def _list_folder(folder: str) -> tuple[list[str], list[str]]:
    if not os.path.isdir(folder):
        raise UsageError(f"--image_dir '{folder}' is not a directory" if os.path.exists(folder)
                         else f"--image_dir '{folder}' does not exist")
    entries = sorted(os.listdir(folder))
    images = [os.path.join(folder, e) for e in entries
              if is_image_file(e) and os.path.isfile(os.path.join(folder, e))]
    kept = set(images)
    skipped = [os.path.join(folder, e) for e in entries if os.path.join(folder, e) not in kept]
    if not images:
        raise UsageError(f"no image files in '{folder}' ({len(skipped)} other entries skipped; "
                         f"image extensions: .png .jpg .jpeg .bmp .tif .tiff .webp)")
    return images, skipped


def _vis_path(out_dir: str, image_path: str, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, k = f"{stem}.png", 1
    while name in used:
        name, k = f"{stem}_{k}.png", k + 1
    used.add(name)
    return os.path.join(out_dir, name)


def _result(path: str, obj: str, pred=None, error: str | None = None, threshold: float | None = None) -> dict:
    if pred is None:
        return {"path": path, "object": obj, "verdict": None, "answer": None, "p_defect": None, "think": None,
                "completion": None, "valid_format": False, "error": error}
    verdict = pred.verdict
    if threshold is not None and pred.score is not None:
        # A threshold calibrated for a false-alarm budget overrides the generated letter.
        verdict = "defect" if pred.score >= threshold else "normal"
    res = {"path": path, "object": obj, "verdict": verdict, "answer": pred.answer, "p_defect": pred.score,
           "think": pred.think, "completion": pred.completion, "valid_format": pred.valid_format, "error": None}
    if threshold is not None:
        res["threshold"] = threshold
    return res


def _format_text(res: dict, single: bool) -> str:
    if res["error"]:
        return f"{res['path']}: error: {res['error']}"
    score = "n/a" if res["p_defect"] is None else f"{res['p_defect']:.3f}"
    verdict = res["verdict"] if res["verdict"] != "unknown" else "unknown (no valid <answer> in the output)"
    if "threshold" in res and res["p_defect"] is not None:
        verdict += f" (P(defect) {'>=' if res['verdict'] == 'defect' else '<'} threshold {res['threshold']:.4f})"
    reasoning = res["think"] if res["think"] is not None else (res["completion"] or "").strip()
    if single:
        return (f"image: {res['path']}\nobject: {res['object']}\nverdict: {verdict}\nP(defect): {score}\n"
                f"reasoning: {reasoning}")
    return f"{res['path']}: {verdict}  P(defect)={score}\n  reasoning: {reasoning}"


def _default_predictor(cfg):
    from ppiad.eval.predictor import ModelPredictor

    return ModelPredictor.from_config(cfg)


def run(args, cfg, predictor_factory) -> int:
    single = args.image is not None
    if single:
        if not os.path.isfile(args.image):
            raise UsageError(f"--image '{args.image}' is not a file" if os.path.exists(args.image)
                             else f"--image '{args.image}' does not exist")
        _, err = try_load(args.image, cfg.data.eval.bit_depth)  # a bad file fails here, before the model is loaded
        if err:
            raise UsageError(err)
        paths, skipped = [args.image], []
        if args.object:
            obj = _object_name(cfg, args.object)
        else:
            obj = default_object(cfg.data.eval.categories, cfg.data.object_names)
            print(f"note: no --object given: the prompt names the object '{obj}'", file=sys.stderr)
    else:
        paths, skipped = _list_folder(args.image_dir)
        obj = _object_name(cfg, args.object or os.path.basename(os.path.normpath(args.image_dir)))
    threshold = cfg.eval.threshold if cfg.eval.threshold >= 0 else None
    if threshold is not None and threshold > 1:
        raise UsageError(f"eval.threshold is a probability in [0, 1] (or -1 = off), got {threshold}")
    batch_size = args.batch_size if args.batch_size is not None else cfg.eval.batch_size
    if batch_size <= 0:
        raise UsageError(f"--batch_size must be >= 1, got {batch_size}")
    if args.save_vis:
        os.makedirs(args.save_vis, exist_ok=True)
    refs = _load_references(args, cfg)
    predictor = predictor_factory(cfg)

    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", desc="inspecting", file=sys.stderr, disable=single,
               dynamic_ncols=True)
    counts = {"defect": 0, "normal": 0, "unknown": 0, "unreadable": 0}
    used_names: set[str] = set()
    out = sys.stdout
    for start in range(0, len(paths), batch_size):
        batch = paths[start:start + batch_size]
        images, errors = {}, {}
        for p in batch:
            img, err = try_load(p, cfg.data.eval.bit_depth)
            if img is None:
                errors[p] = err
            else:
                images[p] = img
        ok = [p for p in batch if p in images]
        kwargs = {"references": [refs] * len(ok)} if refs else {}
        preds = dict(zip(ok, predictor.predict([images[p] for p in ok], [obj] * len(ok), **kwargs))) if ok else {}
        for p in batch:
            res = _result(p, obj, preds.get(p), errors.get(p), threshold)
            if args.reference:
                res["references"] = list(args.reference)
            counts["unreadable" if res["error"] else res["verdict"]] += 1
            line = json.dumps(res, ensure_ascii=False) if args.json else _format_text(res, single)
            bar.write(line, file=out)
            out.flush()
            if args.save_vis and p in preds:
                pred = preds[p]
                from ppiad.vis.draw import save_verdict

                save_verdict(_vis_path(args.save_vis, p, used_names), images[p], res["verdict"], pred.score,
                             pred.think if pred.think is not None else pred.completion,
                             title=f"{os.path.basename(p)} ({obj})")
        bar.update(len(batch))
    bar.close()

    if not single:
        summary = (f"summary: {len(paths)} images: {counts['defect']} defect, {counts['normal']} normal, "
                   f"{counts['unknown']} without a valid answer, {counts['unreadable']} unreadable; "
                   f"{len(skipped)} non-image entries skipped")
        print(summary, file=sys.stderr if args.json else sys.stdout)
        if counts["unreadable"] == len(paths):
            print(f"error: none of the {len(paths)} images in '{args.image_dir}' could be read", file=sys.stderr)
            return 2
    return 0


def main(argv=None, predictor_factory=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        cfg = config_from_args(args, default_model=True)
        return run(args, cfg, predictor_factory or _default_predictor)


if __name__ == "__main__":
    sys.exit(main())
