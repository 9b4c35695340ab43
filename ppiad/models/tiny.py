"""A tiny Qwen2-VL- or Qwen2.5-VL-architecture checkpoint for CPUs, CI and the demo: same files and formats as a
real one.

`build_tiny_checkpoint(out_dir, family="qwen2_vl" | "qwen2_5_vl")` writes a complete Hugging Face-format directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, preprocessor_config.json, chat_template.json,
generation_config.json). The tokenizer is a small byte-level BPE with Qwen2's pre-tokenizer, trained on the
task's own text, so prompts are a few hundred tokens instead of needing Qwen's 151k-entry vocabulary; the
special tokens are Qwen2-VL's, placed after the learned vocabulary. The weights are random (seeded).
"""
from __future__ import annotations

import itertools
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

from ppiad.utils.io import atomic_write_text

# Qwen2's pre-tokenizer split (from its tokenizer.json): letters, single digits, punctuation runs, spaces.
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

FAMILIES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}

OBJECT_NAMES = (
    # MVTec-AD and VisA categories as prompt object names, plus generic products for folder datasets.
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper", "candle", "capsules", "cashew", "chewing gum", "fryum",
    "macaroni", "printed circuit board", "pcb", "pipe fryum", "washer", "gear", "bolt", "nut", "bearing",
    "fabric", "glass", "plastic part", "metal plate", "circuit", "connector", "spring", "ring", "disc",
    "stripe", "square", "circle", "triangle", "object", "product",
)
_PARTS = ("surface", "edge", "center", "corner", "border", "top", "bottom", "left side", "right side", "body",
          "texture", "pattern", "print", "coating", "thread")
_DEFECTS = ("scratch", "crack", "dent", "hole", "stain", "spot", "contamination", "tear", "cut", "bend",
            "missing part", "misplaced part", "discoloration", "broken area", "fold", "chip", "deformation",
            "bubble", "burn", "residue", "line", "mark")
_GOOD = ("uniform", "smooth", "clean", "intact", "regular", "consistent", "complete", "symmetric")


def task_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: prompts, reasoning and answers in the expected format."""
    from ppiad.prompt import OPTIONS, build_prompt

    texts = [build_prompt(name) for name in OBJECT_NAMES]
    texts += [f"Options: (A) {OPTIONS['A']} (B) {OPTIONS['B']}.", "You are a helpful assistant."]
    for i, (obj, part) in enumerate(itertools.product(OBJECT_NAMES, _PARTS)):
        defect = _DEFECTS[i % len(_DEFECTS)]
        good = _GOOD[i % len(_GOOD)]
        bad_think = (f"The image shows a {obj}. There is a {defect} on the {part} of the {obj}. "
                     f"The {part} is not {good}, so the {obj} has a defect.")
        good_think = (f"The image shows a {obj}. The {part} looks {good} and there is no {defect}. "
                      f"No defect is visible, so the {obj} is normal.")
        texts.append(f"<think>{bad_think}</think> <answer>A</answer>")
        texts.append(f"<think>{good_think}</think> <answer>B</answer>")
        texts.append(f"<think>\n{good_think}\n</think>\n<answer>B</answer>")
        texts.append(f"<think>\n{bad_think}\n</think>\n<answer>A</answer>")
    texts += ["<think></think> <answer>A</answer>", "<think></think> <answer>B</answer>",
              "<answer>A or B</answer>", "0123456789 (A) (B) A B"]
    return texts


def train_task_tokenizer(vocab_size: int = 1024, texts: list[str] | None = None) -> Tokenizer:
    """A byte-level BPE in Qwen2's layout (NFC, Qwen2 split, byte level), trained on `texts` (default: the task's).

    Every byte is in the base alphabet, so any text (other object names, unicode) still encodes.
    """
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else task_corpus(), trainer=trainer)
    # Special tokens go after the learned vocabulary, as in Qwen's own tokenizer.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    _check_answer_tokens(tok)
    return tok


def _check_answer_tokens(tok: Tokenizer) -> None:
    """The verdict must be one token after the same prefix, so P(A) vs P(B) is read at a single position."""
    a = tok.encode("<think></think> <answer>A</answer>").ids
    b = tok.encode("<think></think> <answer>B</answer>").ids
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if len(a) != len(b) or len(diff) != 1:
        raise RuntimeError(f"tiny tokenizer: the answers A and B do not differ in exactly one token ({a} vs {b})")


def _tokenizer_config(tok: Tokenizer, max_length: int) -> dict:
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": max_length,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "padding_side": "left",
    }


def tiny_model_config(tok: Tokenizer, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate_size: int = 128, vision_depth: int = 2, vision_embed_dim: int = 32,
                      vision_heads: int = 2, vision_mlp_ratio: int = 4, patch_size: int = 14,
                      spatial_merge_size: int = 2, temporal_patch_size: int = 2, max_position_embeddings: int = 4096,
                      rope_theta: float = 1000000.0, tie_word_embeddings: bool = True, family: str = "qwen2_vl",
                      vision_intermediate_size: int | None = None, window_size: int = 56,
                      fullatt_block_indexes: list | None = None) -> dict:
    """HF config.json content of the given family (model_type) and sizes (ids taken from the tokenizer).

    Qwen2.5-VL only: `vision_intermediate_size` (SwiGLU width, default 2 x vision_embed_dim), `window_size` in
    pixels (default 56 = 2 x 2 merged tokens, so even small test images span several windows) and
    `fullatt_block_indexes` (default: the last vision block). Raises ValueError for an unknown family.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {', '.join(FAMILIES)}")
    if hidden_size % heads or heads % kv_heads or vision_embed_dim % vision_heads:
        raise ValueError(f"tiny model sizes do not divide: hidden_size={hidden_size}, heads={heads}, "
                         f"kv_heads={kv_heads}, vision_embed_dim={vision_embed_dim}, vision_heads={vision_heads}")
    head_dim = hidden_size // heads
    if head_dim % 2:
        raise ValueError(f"head_dim = hidden_size / heads = {head_dim} must be even for rotary embeddings")
    # Multimodal rotary: head_dim/2 frequencies split temporal : height : width like Qwen2-VL's 16:24:24.
    half = head_dim // 2
    t_sec = max(1, half // 4)
    h_sec = (half - t_sec) // 2
    mrope_section = [t_sec, h_sec, half - t_sec - h_sec]
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if family == "qwen2_5_vl":
        vision = {
            "depth": vision_depth, "hidden_size": vision_embed_dim, "out_hidden_size": hidden_size,
            "intermediate_size": vision_intermediate_size or 2 * vision_embed_dim, "hidden_act": "silu",
            "num_heads": vision_heads, "in_chans": 3, "patch_size": patch_size,
            "spatial_merge_size": spatial_merge_size, "temporal_patch_size": temporal_patch_size,
            "window_size": window_size, "tokens_per_second": 2,
            "fullatt_block_indexes": list(fullatt_block_indexes if fullatt_block_indexes is not None
                                          else [vision_depth - 1]),
        }
    else:
        vision = {
            "depth": vision_depth, "embed_dim": vision_embed_dim, "hidden_size": hidden_size,
            "hidden_act": "quick_gelu", "mlp_ratio": vision_mlp_ratio, "num_heads": vision_heads,
            "in_chans": 3, "patch_size": patch_size, "spatial_merge_size": spatial_merge_size,
            "temporal_patch_size": temporal_patch_size,
        }
    return {
        "architectures": [FAMILIES[family]], "model_type": family,
        "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": mrope_section},
        "max_position_embeddings": max_position_embeddings, "max_window_layers": layers,
        "sliding_window": max_position_embeddings, "use_sliding_window": False, "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "float32",
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
    }


def build_tiny_checkpoint(out_dir: str, seed: int = 0, vocab_size: int = 1024, min_pixels: int = 56 * 56,
                          max_pixels: int = 401408, weights: bool = True, **sizes) -> str:
    """Write a complete tiny HF-format directory to `out_dir` and return it.

    `sizes` go to `tiny_model_config` (family="qwen2_vl" or "qwen2_5_vl", hidden_size=64, layers=2, heads=4,
    kv_heads=2, vision_depth=2, vision_embed_dim=32, ...). `weights=False` skips model.safetensors (tokenizer/processor-only uses).
    Same arguments -> same files (the tokenizer does not depend on the seed; the weights do).
    """
    from ppiad.models.processor import DEFAULT_TEMPLATE_FILE, ImageProcessor

    os.makedirs(out_dir, exist_ok=True)
    tok = train_task_tokenizer(vocab_size)
    config = tiny_model_config(tok, **sizes)
    vc = config["vision_config"]
    image_processor = ImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vc["patch_size"],
                                     temporal_patch_size=vc["temporal_patch_size"],
                                     merge_size=vc["spatial_merge_size"])
    with open(DEFAULT_TEMPLATE_FILE, encoding="utf-8") as f:
        template = f.read()

    def write_json(name: str, obj: dict) -> None:
        atomic_write_text(os.path.join(out_dir, name), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), tok.to_str(pretty=True))
    write_json("tokenizer_config.json", _tokenizer_config(tok, config["max_position_embeddings"]))
    preprocessor = image_processor.to_config()
    if config["model_type"] == "qwen2_5_vl":  # same image processor; the processor class is named per family
        preprocessor["processor_class"] = "Qwen2_5_VLProcessor"
    write_json("preprocessor_config.json", preprocessor)
    write_json("chat_template.json", {"chat_template": template})
    write_json("config.json", config)
    write_json("generation_config.json", {
        "bos_token_id": config["bos_token_id"], "pad_token_id": config["pad_token_id"],
        "eos_token_id": [config["eos_token_id"], config["bos_token_id"]], "do_sample": False})
    if weights:
        _write_random_weights(out_dir, seed)
    return out_dir


def _write_random_weights(out_dir: str, seed: int) -> None:
    import paddle

    from ppiad.models.auto import model_class, model_type_of

    paddle.seed(seed)
    cls = model_class(model_type_of(out_dir))
    model = cls(cls.config_class.from_file(os.path.join(out_dir, "config.json")))
    model.save_pretrained(out_dir)  # writes model.safetensors and rewrites config.json with the same content
