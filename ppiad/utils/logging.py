"""Run logging: VisualDL scalars, a progress bar with ETA, a plain-text log and a metrics.jsonl per run.

Only rank 0 writes the shared outputs (VisualDL, metrics.jsonl, train.log, the progress bar); other ranks
write their text lines to `train.rank<k>.log`, so a multi-process run leaves one readable curve set.
    <run_dir>/vdl/            VisualDL log (`visualdl --logdir <run_dir>/vdl --language en`)
    <run_dir>/metrics.jsonl   one JSON line of scalars per logged step
    <run_dir>/train.log       timestamped text lines
"""
from __future__ import annotations

import math
import os
import sys
import time

from ppiad.utils.io import append_jsonl


class RunLogger:
    def __init__(self, run_dir: str, *, rank: int = 0, total_steps: int | None = None, initial_step: int = 0,
                 use_visualdl: bool = True, progress: bool = True):
        self.run_dir = run_dir
        self.rank = rank
        self.is_main = rank == 0
        os.makedirs(run_dir, exist_ok=True)
        log_name = "train.log" if self.is_main else f"train.rank{rank}.log"
        self._log = open(os.path.join(run_dir, log_name), "a", encoding="utf-8")
        self._writer = None
        if self.is_main and use_visualdl:
            from visualdl import LogWriter
            self._writer = LogWriter(logdir=os.path.join(run_dir, "vdl"))
        self._bar = None
        if self.is_main and progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, disable=None)  # disable=None: no bar when stderr is not a tty

    def info(self, message: str) -> None:
        """A timestamped line in the log file, and on the console (rank 0) without breaking the bar."""
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [rank {self.rank}] {message}"
        self._log.write(line + "\n")
        self._log.flush()
        if self.is_main:
            if self._bar is not None and not self._bar.disable:
                self._bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        """Write finite scalar values under `<prefix>/<name>` to VisualDL and metrics.jsonl (rank 0 only)."""
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if self._writer is not None:
            for name, value in clean.items():
                self._writer.add_scalar(tag=f"{prefix}/{name}", step=int(step), value=value)
        keys = clean if prefix == "train" else {f"{prefix}/{k}": v for k, v in clean.items()}
        append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), {"step": int(step), **keys})

    def text(self, step: int, tag: str, text: str) -> None:
        """A text entry (markdown) in VisualDL's text tab (rank 0 only)."""
        if self.is_main and self._writer is not None:
            self._writer.add_text(tag=tag, text_string=text, step=int(step))

    def image(self, step: int, tag: str, image) -> None:
        """An image (PIL image or uint8 array [H, W, 3]) in VisualDL's image tab (rank 0 only)."""
        if self.is_main and self._writer is not None:
            import numpy as np

            self._writer.add_image(tag=tag, img=np.asarray(image.convert("RGB") if hasattr(image, "convert")
                                                             else image, dtype=np.uint8), step=int(step))

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        """Move the progress bar (its ETA follows the measured step rate)."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
