"""Export a Qwen2-VL / Qwen2.5-VL + LoRA adapter as one Hugging Face-format checkpoint that transformers loads as it is.

The adapter is merged in float32 whatever the target dtype (W + (alpha / r) * B A computed in bf16 would round
the small update away), then the weights are written in `dtype` as safetensors shards with
`model.safetensors.index.json` (one `model.safetensors` when everything fits in one shard), `config.json`
(the base's, with `torch_dtype` set), and the base's tokenizer, preprocessor, generation and chat template
files, so `AutoProcessor.from_pretrained(OUT)` and `Qwen2VLForConditionalGeneration` /
`Qwen2_5_VLForConditionalGeneration.from_pretrained(OUT)`
(transformers 4.51.3) work on the folder, as does ppiad itself (`-o model.path=OUT`).

The folder appears complete or not at all: everything is written into a temporary sibling folder that is
renamed at the end. `ppiad_export.json` records what was merged (base, adapter, dtype).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Callable

import numpy as np

from ppiad.models import weights as W
from ppiad.utils.io import atomic_write_json, atomic_write_text

DTYPES = ("bfloat16", "float32")
DEFAULT_MAX_SHARD = "5GB"  # transformers' own default for save_pretrained
# The non-weight files of a Hugging Face Qwen2-VL folder that travel with the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
OTHER_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
               "chat_template.jinja", "generation_config.json", "LICENSE")
EXPORT_INFO = "ppiad_export.json"


class ExportError(ValueError):
    """The base folder, the adapter, the output folder or a setting does not allow the export."""


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2KB' / '123' -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ExportError(f"max shard size '{text}' is not a size such as 5GB, 500MB or 1000000")
    scale = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[(m.group(2) or "").upper()]
    size = int(float(m.group(1)) * scale)
    if size <= 0:
        raise ExportError(f"max shard size must be positive, got '{text}'")
    return size


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names in model order, cut into consecutive groups of at most max_shard_bytes (a bigger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _check_base(model_path: str) -> None:
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ExportError(f"model.path '{model_path}' is not a Hugging Face-format checkpoint folder (no config.json)")
    if not os.path.isfile(os.path.join(model_path, "tokenizer.json")) and not all(
            os.path.isfile(os.path.join(model_path, f)) for f in ("vocab.json", "merges.txt")):
        raise ExportError(f"model.path '{model_path}' has no tokenizer (tokenizer.json, or vocab.json + merges.txt): "
                          f"the exported folder could not be used")
    if not os.path.isfile(os.path.join(model_path, "preprocessor_config.json")):
        raise ExportError(f"model.path '{model_path}' has no preprocessor_config.json: the exported folder could not "
                          f"process images")


def export_hf(model_path: str, adapter: str | None, out_dir: str, dtype: str = "bfloat16",
              max_shard_size: str | int = DEFAULT_MAX_SHARD, overwrite: bool = False, allow_pickle: bool = False,
              log: Callable[[str], None] = print) -> dict:
    """Merge `adapter` (a ppiad / PEFT LoRA folder, or None for the base alone) into the Qwen2-VL checkpoint at
    `model_path` in float32 and write a Hugging Face-format folder to `out_dir` with weights in `dtype`
    ("bfloat16" or "float32"). Returns the summary also written to `<out_dir>/ppiad_export.json`.

    Raises ExportError for a bad setting, an existing non-empty `out_dir` without `overwrite`, or a base folder
    missing its tokenizer or preprocessor files; CheckpointError / ValueError from loading name the file at fault.
    Peak memory is the float32 model plus one shard.
    """
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    max_shard_bytes = parse_size(max_shard_size)
    _check_base(model_path)
    if adapter and not os.path.exists(adapter):
        raise ExportError(f"model.adapter '{adapter}' does not exist")
    out_dir = os.path.normpath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise ExportError(f"output '{out_dir}' exists and is not empty: choose a new folder or pass --overwrite")

    import paddle

    from ppiad.models.auto import AutoModel

    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(model_path, dtype="float32", allow_pickle=allow_pickle)
    if adapter:
        from ppiad.models.lora import load_adapter, merge_adapter
        from ppiad.utils.identity import base_model_mismatch

        mismatch = base_model_mismatch(adapter, model_path)
        if mismatch:
            log(f"warning: {mismatch}")
        load_adapter(model, adapter)
        merge_adapter(model)  # in float32: the model was loaded in float32 above
    log(f"loaded {model_path}" + (f" + adapter {adapter} (merged in float32)" if adapter else "") +
        f" in {time.perf_counter() - t0:.1f} s")

    params = model.state_dict()
    itemsize = 2 if dtype == "bfloat16" else 4
    floating = {n for n, p in params.items() if p.dtype in (paddle.float32, paddle.bfloat16, paddle.float16)}
    sizes = {n: int(np.prod(p.shape)) * (itemsize if n in floating else p.element_size()) for n, p in params.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    files = ([W.SAFE_WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        bf16 = frozenset(floating) if dtype == "bfloat16" else frozenset()
        weight_map = {}
        for fname, names in zip(files, shards):
            tensors = {}
            for name in names:  # only this shard is held as numpy arrays
                p = params[name]
                tensors[name] = p.numpy() if p.dtype != paddle.bfloat16 else p.astype("float32").numpy()
            W.save_safetensors(os.path.join(tmp, fname), tensors, bf16_names=bf16 & set(names))
            weight_map.update({n: fname for n in names})
            del tensors
        if len(files) > 1:
            atomic_write_json(os.path.join(tmp, W.SAFE_INDEX),
                              {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config["torch_dtype"] = dtype
        atomic_write_json(os.path.join(tmp, "config.json"), config)
        copied = [name for name in TOKENIZER_FILES + OTHER_FILES if os.path.isfile(os.path.join(model_path, name))]
        for name in copied:
            shutil.copyfile(os.path.join(model_path, name), os.path.join(tmp, name))
        if not any(n.startswith("chat_template") for n in copied):
            # The base keeps its template elsewhere (or has none): write the one ppiad prompts with.
            from ppiad.models.processor import load_chat_template

            template, _ = load_chat_template(model_path)
            atomic_write_text(os.path.join(tmp, "chat_template.json"),
                              json.dumps({"chat_template": template}, indent=2, ensure_ascii=False) + "\n")
        from ppiad import __version__
        from ppiad.utils.identity import adapter_fingerprint, resolve_adapter

        summary = {"base_model": os.path.abspath(model_path), "adapter": resolve_adapter(adapter) if adapter else None,
                   "adapter_sha256": adapter_fingerprint(adapter) if adapter else None,
                   "merged_in": "float32", "dtype": dtype, "weight_files": files,
                   "total_bytes": sum(sizes.values()), "ppiad_version": __version__}
        atomic_write_json(os.path.join(tmp, EXPORT_INFO), summary)
        _share(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}: {len(files)} weight file(s), {sum(sizes.values()) / 1e6:.1f} MB in {dtype}, "
        f"{time.perf_counter() - t0:.1f} s")
    return summary


def _share(directory: str) -> None:
    """Ordinary permissions for a folder meant to be shared (atomic writes create private temporary files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _replace_dir(src: str, dst: str) -> None:
    """Move the finished folder into place; an old `dst` (overwrite) goes only once the new one is there."""
    if not os.path.exists(dst):
        os.replace(src, dst)
        return
    old = f"{dst}.old-{os.getpid()}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)
