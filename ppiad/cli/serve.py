r"""The inspection web app and its JSON API on one server, over one loaded model.

    python tools/serve.py -c configs/lriad_mvtec.yaml -o model.adapter=output/lriad_mvtec/checkpoints/latest
    python tools/serve.py --model models/Qwen2-VL-7B-Instruct --adapter ckpt/step_000100 \
        --metrics output/lriad_mvtec/eval_folder_all --port 7860
    python tools/serve.py          (after `make demo`: the demo's trained model)

Open http://127.0.0.1:7860 for the page (upload images or name a folder on the server, object name, live
decision threshold, results, a gallery by P(defect), CSV download). The API on the same port:
    curl -F image=@part.png -F object=pcb http://127.0.0.1:7860/api/inspect
    curl http://127.0.0.1:7860/api/health
The threshold defaults to the calibrated threshold of --metrics (an evaluation's metrics.json or its folder),
else eval.threshold when set, else 0.5. The server binds to 127.0.0.1 unless --host says otherwise.
Exit code 2 on bad input (one-line reason), a busy port or an address it cannot bind, before the model loads.
"""
from __future__ import annotations

import warnings

# Paddle warns about a missing C++ compiler cache on import; it concerns extension builds, not this tool.
warnings.filterwarnings("ignore", message="No ccache found")

import argparse
import os
import sys
import time

from ppiad.utils.cli import UsageError, add_config_args, add_model_args, config_from_args, user_errors


def build_parser() -> argparse.ArgumentParser:
    from ppiad.app.inspection import DEFAULT_MAX_UPLOAD_MB

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--metrics", metavar="PATH",
                   help="an evaluation's metrics.json (or its folder) whose calibrated threshold is the default")
    p.add_argument("--folder_root", default=".", metavar="DIR",
                   help="server folders the page may inspect must lie inside DIR (default: the working directory)")
    p.add_argument("--max_upload_mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest image file accepted, MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max_images", type=int, default=500, help="most images one request may inspect (default 500)")
    p.add_argument("--batch_size", type=int, default=None, help="images per model batch (default: eval.batch_size)")
    return p


def check_bindable(host: str, port: int) -> None:
    """Raise UsageError (one line) unless a TCP socket can listen on host:port now: bind one, then close it.

    uvicorn binds again afterwards (a race with another process is possible but rare); SO_REUSEADDR as uvicorn
    sets it, so a port in TIME_WAIT is not refused while one another process listens on is."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host '{host}' is not an address this machine can bind ({exc})") from None
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1)
    except OSError as exc:
        import errno

        hint = {errno.EADDRINUSE: "another program listens on that port; give another --port",
                errno.EADDRNOTAVAIL: "not an address of this machine; give another --host",
                errno.EACCES: "ports below 1024 need privileges; give another --port"}.get(exc.errno, "")
        reason = f"{exc.strerror or exc}" + (f" ({hint})" if hint else "")
        raise UsageError(f"cannot serve on {host}:{port}: {reason}") from None


def _default_predictor(cfg):
    from ppiad.eval.predictor import ModelPredictor

    return ModelPredictor.from_config(cfg)


def main(argv=None, predictor_factory=None, serve=None) -> int:
    """`serve(app, host, port)` runs the server (default uvicorn.run); tests pass their own."""
    args = build_parser().parse_args(argv)
    with user_errors():
        from ppiad.app.inspection import InputError, Inspector, default_threshold
        from ppiad.app.server import AppInfo, build_app
        from ppiad.config import require
        from ppiad.prompt import default_object
        from ppiad.utils.identity import resolve_adapter

        cfg = config_from_args(args, default_model=True)
        require(cfg, "model.path", "the Qwen2-VL checkpoint folder to serve (or --model DIR)")
        if not 0 < args.port < 65536:
            raise UsageError(f"--port must be in 1..65535, got {args.port}")
        check_bindable(args.host, args.port)  # a busy port or a bad --host: say so before the model loads
        if not os.path.isdir(args.folder_root):
            raise UsageError(f"--folder_root '{args.folder_root}' is not a folder")
        if args.max_images <= 0:
            raise UsageError(f"--max_images must be positive, got {args.max_images}")
        try:
            threshold, source = default_threshold(args.metrics, cfg.eval.threshold)
            info = AppInfo(model=cfg.model.path, adapter=resolve_adapter(cfg.model.adapter) or None,
                           threshold=threshold, threshold_source=source, object_names=cfg.data.object_names or {},
                           default_object=default_object(cfg.data.eval.categories, cfg.data.object_names),
                           folder_root=args.folder_root, max_images=args.max_images)
            t0 = time.perf_counter()
            predictor = (predictor_factory or _default_predictor)(cfg)  # the one model load
            inspector = Inspector(predictor, batch_size=args.batch_size or cfg.eval.batch_size,
                                  max_upload_mb=args.max_upload_mb)
        except InputError as exc:
            raise UsageError(str(exc)) from exc
        print(f"model loaded in {time.perf_counter() - t0:.1f} s: {info.model}"
              + (f" + adapter {info.adapter}" if info.adapter else "")
              + f"; threshold {threshold:.4f} ({source})", flush=True)
        app = build_app(inspector, info)
    print(f"serving http://{args.host}:{args.port}/ (page) and /api/inspect, /api/health; Ctrl-C stops", flush=True)
    (serve or _uvicorn)(app, args.host, args.port)
    return 0


def _uvicorn(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
