r"""Merge a LoRA adapter into its base Qwen2-VL and write one Hugging Face-format checkpoint.

    python tools/export.py -c configs/lriad_mvtec.yaml -o model.adapter=output/lriad_mvtec/checkpoints/latest \
        --output exported/lriad-qwen2-vl-7b
    python tools/export.py --model models/Qwen2-VL-7B-Instruct --adapter ckpt/step_000100 --output out \
        --dtype float32 --max_shard_size 2GB

The adapter is merged in float32; the weights are written in --dtype (bfloat16 by default, as Qwen ships them) as
safetensors shards with an index, beside config.json and the base's tokenizer, preprocessor, generation and chat
template files. transformers loads the folder as it is (Qwen2VLForConditionalGeneration / AutoProcessor
.from_pretrained), and so does ppiad (-o model.path=OUT, no adapter). The adapter folder itself is already in
Hugging Face PEFT's layout (PeftModel.from_pretrained(base, ADAPTER_DIR)).
Exit code 0 on success, 2 on bad input with a one-line reason.
"""
from __future__ import annotations

import warnings

# Paddle warns about a missing C++ compiler cache on import; it concerns extension builds, not this tool.
warnings.filterwarnings("ignore", message="No ccache found")

import argparse
import sys

from ppiad.config import require
from ppiad.utils.cli import UsageError, add_config_args, add_model_args, config_from_args, user_errors


def build_parser() -> argparse.ArgumentParser:
    from ppiad.models.export import DEFAULT_MAX_SHARD, DTYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, required=False)
    add_model_args(p)
    p.add_argument("--output", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the written weights "
                                                                        "(default bfloat16; merging is float32)")
    p.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD,
                   help=f"largest weight file, e.g. 2GB or 500MB (default {DEFAULT_MAX_SHARD})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors():
        from ppiad.models.export import ExportError, export_hf
        from ppiad.models.weights import CheckpointError

        cfg = config_from_args(args)
        model_path = require(cfg, "model.path", "the base Qwen2-VL checkpoint folder (or --model DIR)")
        try:
            export_hf(model_path, cfg.model.adapter or None, args.output, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      allow_pickle=cfg.model.allow_pickle, log=lambda m: print(m, flush=True))
        except (ExportError, CheckpointError) as exc:
            raise UsageError(str(exc)) from exc
        except ValueError as exc:  # an adapter that does not fit the model
            raise UsageError(f"model.adapter '{cfg.model.adapter}': {exc}") from exc
    return 0


if __name__ == "__main__":
    sys.exit(main())
