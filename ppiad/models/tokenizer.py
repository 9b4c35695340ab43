"""Qwen2 byte-level BPE tokenizer loaded from a checkpoint's `tokenizer.json`.

Why the HF `tokenizers` library and not paddleformers' Qwen2Tokenizer: `tokenizers` reads the checkpoint's
`tokenizer.json` directly and offline, and it is the very engine transformers' Qwen2TokenizerFast runs, so
token ids are identical to the reference by construction (the parity test checks this). paddleformers'
Qwen2Tokenizer wants the vocab/merges under keyword names that silently ignore `vocab_file=` (see
shared/notes/paddle-stack.md), which makes it easy to load a wrong vocabulary without an error.
"""
from __future__ import annotations

import os

from tokenizers import AddedToken, Tokenizer

from ppiad.utils.io import read_json

# Qwen2-VL's defaults; a checkpoint's tokenizer_config.json may name others.
DEFAULT_PAD = "<|endoftext|>"
DEFAULT_EOS = ("<|im_end|>", "<|endoftext|>")


def _token_content(value) -> str | None:
    """tokenizer_config.json stores tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class QwenTokenizer:
    """Thin wrapper: encode/decode plus the special ids the model and generation need."""

    def __init__(self, tokenizer: Tokenizer, config: dict | None = None, source: str = "<memory>"):
        self._tok = tokenizer
        self.source = source
        config = config or {}
        # Added tokens listed only in tokenizer_config.json (older exports) must exist in the tokenizer too.
        for tid, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            content = spec.get("content")
            if content and self._tok.token_to_id(content) is None:
                token = AddedToken(content, normalized=spec.get("normalized", False),
                                   lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                   single_word=spec.get("single_word", False))
                if spec.get("special", False):
                    self._tok.add_special_tokens([token])
                else:
                    self._tok.add_tokens([token])
        self.pad_token = _token_content(config.get("pad_token")) or DEFAULT_PAD
        self.eos_token = _token_content(config.get("eos_token")) or DEFAULT_EOS[0]
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.eos_token_id = self.token_to_id(self.eos_token)

    @classmethod
    def from_pretrained(cls, path: str) -> "QwenTokenizer":
        """Load `<path>/tokenizer.json` (+ tokenizer_config.json if present)."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in '{path}' (a Hugging Face-format checkpoint directory "
                                    f"is expected)")
        try:
            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"cannot read tokenizer file '{tok_file}': {exc}") from None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        config = read_json(cfg_file) if os.path.isfile(cfg_file) else {}
        return cls(tokenizer, config, source=path)

    # -- ids <-> text -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. <|im_start|>) map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """ids: a list, numpy array or paddle tensor of token ids (1-D)."""
        if hasattr(ids, "numpy"):  # paddle tensor
            ids = ids.numpy()
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        if hasattr(rows, "numpy"):
            rows = rows.numpy()
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry; KeyError naming the token (and the tokenizer) if it is absent."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the tokenizer loaded from '{self.source}'")
        return tid

    def id_to_token(self, tid: int) -> str | None:
        return self._tok.id_to_token(int(tid))

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (base vocabulary + added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end a completion: the configured eos first, then Qwen's other end markers present."""
        ids = [self.eos_token_id]
        for tok in DEFAULT_EOS:
            if self.has_token(tok) and self.token_to_id(tok) not in ids:
                ids.append(self.token_to_id(tok))
        return ids

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for saving or inspection)."""
        return self._tok
