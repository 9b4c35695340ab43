"""Batched generation with a KV cache, G samples per prompt, per-token log-probs and the P(A) answer score.

How one call runs (B prompts, G samples each, N = B*G rows, prompt-major: rows i*G .. i*G+G-1 = prompt i):
1. the vision tower runs once for the B prompts' images (`model.get_image_embeds`);
2. the prompt prefill runs once on the B left-padded prompts (explicit multimodal rotary positions from
   `model.get_rope_index`); its KV cache, last logits, attention mask and rope deltas are then repeated
   G times on the batch axis (repeat_interleave), so the G samples of a prompt share one prefill;
3. decode steps feed one token per row; the position of the token at padded index k is k + rope_delta
   (as in the reference implementation), so a teacher-forced forward over prompt + completion sees the
   very same positions (`completion_logprobs` relies on this);
4. <|image_pad|> and <|video_pad|> are never chosen (their logits are masked before the choice; log-probs
   stay those of the full distribution, as `completion_logprobs` computes them);
5. a row stops after emitting one of `eos_token_ids`; later tokens of that row are `pad_token_id` with
   mask 0 and log-prob 0. The loop ends when every row has stopped or after `max_new_tokens`.
6. under sharding stage 3 every forward runs collectives, so all processes must make the same calls: the
   loop then ends only when every process is done (one all-reduce of a "done" flag per step; a finished
   process keeps feeding pad tokens and drops those steps), and the forced-score forward below runs on every
   process when one needs it (paddleformers' `synced_gpus` pattern; `ppiad.utils.distributed`).

Answer score (P(A) at the token that decides the verdict), `AnswerTokens.find_decision`:
- Letter tokens are the vocabulary entries whose text is the letter A or B with only whitespace or ">" before
  it and whitespace or "</" after it, kept when the same text with the other letter is a token too. Qwen2 has four
  pairs: "A"/"B", " A"/" B", ">A"/">B", "\\tA"/"\\tB" (its byte-level BPE writes `<answer>A` as "<", "answer",
  ">A" and `<answer> A` as "<", "answer", ">", " A").
- The decision token is the token holding the first non-space character after the last "<answer>", when that
  character is A or B and the token is a letter token; the score is P(T_A) / (P(T_A) + P(T_B)) at that step
  with the token's own pair (" A" vs " B" when the model wrote " A"). Every completion the strict parser
  (ppiad.prompt) accepts is decided there; tests/test_answer_score.py checks every accepted spelling.
- Without a letter there (non-strict completions: "<answer>a", "<answer>(A)"), the score is read where the
  canonical letter would stand: the step after "<answer>" ("A" vs "B"), or the step after "<answer" when
  its token starts with ">" (">A" vs ">B").
- A completion without "<answer" (truncated reasoning, wrong format) gets a *forced* score: one extra
  forward over prompt + completion (stop token removed) + the tokens of "<answer" (merged tokenizers) or
  "<answer>" (others), reading the same ratio at the end. Every image thus has a score for AUROC/AP;
  `force_answer_score=False` gives NaN instead. Probabilities use temperature-1 logits.
"""
from __future__ import annotations

import bisect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from ppiad.models.kv_cache import StaticKVCache
from ppiad.prompt import parse_completion
from ppiad.utils.seed import seeded

ANSWER_OPEN = "<answer"
# Names how answer scores are computed; part of an evaluation's identity (ppiad.eval.identity), so predictions
# scored by an older rule are never mixed with new ones. Change it whenever the score's definition changes.
ANSWER_SCORE_METHOD = "P(letter token) vs its A/B twin, at the token holding the verdict letter (v2)"


# ---------------------------------------------------------------------------------------------------------
# Answer tokens
# ---------------------------------------------------------------------------------------------------------
# Text a token that carries the verdict letter may hold in a completion the strict parser accepts: the letter
# with only whitespace or the end of "<answer>" before it and whitespace or the start of "</answer>" after it
# (">A", " A", "\tA", "A", " B" ...). See `AnswerTokens`.
_LETTER_TOKEN = re.compile(r"[\s>]*[AB][\s</]*")
_WHITESPACE_BYTES = b"|".join(re.escape(chr(c).encode("utf-8")) for c in range(0x3001) if re.fullmatch(r"\s", chr(c)))
_LETTER_AFTER_OPEN = re.compile(rb">(?:" + _WHITESPACE_BYTES + rb")*([AB])")   # Python's \s, as UTF-8 bytes
_ANSWER_OPEN_BYTES = ANSWER_OPEN.encode("utf-8")
UNSCORABLE = (-1, -1)   # find_decision: a strict verdict whose letter token has no twin (score NaN, not forced)


def _vocab_texts(tokenizer) -> Iterator[tuple[int, str]]:
    """(id, decoded text) of every vocabulary entry that could hold a verdict letter."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_vocab"):
        # Byte-level BPE stores ASCII letters as themselves: only entries holding "A"/"B" need decoding.
        ids = [i for raw, i in backend.get_vocab(with_added_tokens=False).items()
               if ("A" in raw or "B" in raw) and len(raw) <= 16]
    else:
        ids = range(int(getattr(tokenizer, "vocab_size")))
    for i in sorted(ids):
        yield i, tokenizer.decode([int(i)], skip_special_tokens=False)


@dataclass
class AnswerTokens:
    """Which tokens carry the verdict, and how P(A) vs P(B) is read from them (see the module docstring).

    `pairs[k] = (id of text T_A, id of text T_B)` where T_A holds the letter "A" with only whitespace or ">"
    before it and whitespace or "</" after it, and T_B is the same text with "B" (Qwen2: ("A","B"),
    (" A"," B"), (">A",">B"), ("\\tA","\\tB")). `letter_pairs` maps every such token id to its pair's index.
    """

    pairs: list[tuple[int, int]]
    letter_pairs: dict[int, int]
    texts: dict[int, str]                      # id -> decoded text of the pair tokens
    split_ids: tuple[int, int]                 # "A", "B"
    merged_ids: Optional[tuple[int, int]]      # ">A", ">B" when the vocabulary has them, else None
    open_ids: list[int]                        # tokens of "<answer" (forced score, merged tokenizers)
    close_ids: list[int]                       # tokens of ">" (forced score, split tokenizers)
    pieces: dict = field(default_factory=dict, repr=False)   # id -> UTF-8 bytes of the token, filled lazily
    tokenizer: object = field(default=None, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "AnswerTokens":
        """Scan the vocabulary for letter tokens: build once per tokenizer and pass it to every generate() call.

        Raises ValueError when the tokenizer has no single tokens "A" and "B".
        """
        by_text = {text: i for i, text in _vocab_texts(tokenizer) if _LETTER_TOKEN.fullmatch(text)}
        pairs, letter_pairs, texts = [], {}, {}
        for text, a in sorted(by_text.items()):
            if text.count("A") != 1 or "B" in text:
                continue
            b = by_text.get(text.replace("A", "B"))
            if b is None:
                continue
            letter_pairs[a] = letter_pairs[b] = len(pairs)
            texts[a], texts[b] = text, text.replace("A", "B")
            pairs.append((a, b))
        index = {texts[a]: k for k, (a, _) in enumerate(pairs)}
        if "A" not in index:
            raise ValueError("the tokenizer has no single tokens 'A' and 'B'; cannot score answers")
        split = pairs[index["A"]]
        merged = pairs[index[">A"]] if ">A" in index else None
        return cls(pairs, letter_pairs, texts, split, merged, list(tokenizer.encode(ANSWER_OPEN)),
                   list(tokenizer.encode(">")), tokenizer=tokenizer)

    @property
    def candidate_ids(self) -> list[int]:
        """Vocabulary columns whose logits are kept at every step: the pairs, flattened [A0, B0, A1, B1, ...]."""
        return [i for pair in self.pairs for i in pair]

    def piece(self, token_id: int) -> bytes:
        """The UTF-8 bytes token `token_id` stands for (a byte-level token may hold part of a character)."""
        if token_id not in self.pieces:
            self.pieces[token_id] = _token_bytes(self.tokenizer, int(token_id))
        return self.pieces[token_id]

    def find_decision(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """(step index, pair index into `pairs`) where the verdict is decided, None when the completion has no
        answer position (the forced score applies), or UNSCORABLE (see 1.). Positions are found in the
        completion's bytes, so characters split over several tokens do not shift them.

        1. The answer block is the last "<answer" (a strict completion has exactly one). If the first
           character after its ">" and any whitespace is the letter A or B and the token holding it is a letter
           token, the decision is that token, scored with its own pair (" A" vs " B", ">A" vs ">B", ...).
           Every spelling the strict parser accepts is decided here (tests/test_answer_score.py); a strict
           completion whose letter token has no A/B twin in the vocabulary (none in Qwen2's) gives UNSCORABLE.
        2. Otherwise (no letter there: "<answer>a", "<answer>(A)", or the completion ends at "<answer>"):
           the step right after "<answer>" ("A" vs "B"), or the step right after "<answer" when its token
           starts with ">" (">A" vs ">B"), i.e. what the model put where the canonical letter would be.
        """
        starts, blob = [], b""
        for t in tokens:
            starts.append(len(blob))
            blob += self.piece(int(t))
        boundary = {s: i for i, s in enumerate(starts)}
        pos = blob.rfind(_ANSWER_OPEN_BYTES)
        if pos < 0:
            return None
        end = pos + len(_ANSWER_OPEN_BYTES)
        m = _LETTER_AFTER_OPEN.match(blob, end)
        if m:
            step = bisect.bisect_right(starts, m.start(1)) - 1
            tid = int(tokens[step])
            pair = self.letter_pairs.get(tid)
            if pair is not None and starts[step] + self.piece(tid).find(m.group(1)) == m.start(1):
                return step, pair
            if parse_completion(blob.decode("utf-8", errors="replace")).strict:
                return UNSCORABLE   # the letter sits in a token without an A/B twin: no exact score exists
        split = self.letter_pairs[self.split_ids[0]]
        if blob.startswith(b">", end) and end + 1 in boundary:
            return boundary[end + 1], split
        if self.merged_ids and end in boundary and self.piece(int(tokens[boundary[end]])).startswith(b">"):
            return boundary[end], self.letter_pairs[self.merged_ids[0]]
        return None


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's, used by Qwen2): printable Latin-1 bytes stand for themselves, the
    other 68 byte values for the characters 256, 257, ... in byte order. Returns character -> byte."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for byte in range(256):
        if byte in kept:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_decoder()


def _token_bytes(tokenizer, token_id: int) -> bytes:
    """UTF-8 bytes of one token: its decoded text, or for a byte-level token holding part of a multi-byte
    character (which decodes to U+FFFD) the bytes its vocabulary entry spells."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" in text and hasattr(tokenizer, "id_to_token"):
        raw = tokenizer.id_to_token(token_id)
        if raw and all(c in _BYTE_LEVEL for c in raw):
            return bytes(_BYTE_LEVEL[c] for c in raw)
    return text.encode("utf-8")


def _p_a(logit_a: float, logit_b: float) -> float:
    m = max(logit_a, logit_b)
    ea, eb = math.exp(logit_a - m), math.exp(logit_b - m)
    return ea / (ea + eb)


# ---------------------------------------------------------------------------------------------------------
# CPU runtime
# ---------------------------------------------------------------------------------------------------------
_MALLOC_TUNED = False


def keep_freed_memory() -> bool:
    """Stop glibc from handing freed blocks of 128 KiB to 32 MiB back to the OS (Linux/glibc only; once).

    Each decode step allocates new KV tensors of a few MB; by default glibc serves them with fresh mmap()
    pages and unmaps them on free, so every step page-faults them in again. Measured on a [8, 2, 1300, 64]
    cache concat: 4.3 ms -> 0.2 ms, which makes decode-step time flat in the context length. Cost: the
    process keeps up to 1 GiB of freed heap instead of returning it. Returns True if the setting took.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3   # mallopt parameter numbers from <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
        ok = libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024) == 1 and ok
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = ok
    return ok


# ---------------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    sequences: paddle.Tensor          # int64 [N, T] completion tokens, pad after the stop token
    completion_mask: paddle.Tensor    # float32 [N, T] 1 up to and including the stop token
    logprobs: paddle.Tensor           # float32 [N, T] log p(chosen token), temperature-1, 0 where masked
    answer_scores: paddle.Tensor      # float32 [N] P(A) / (P(A) + P(B)) at the answer position (or NaN)
    prompt_index: list[int]           # row -> prompt index
    image_embeds: Optional[paddle.Tensor]  # per-prompt vision embeddings, reusable by completion_logprobs
    texts: list[str]                  # decoded completions without the stop token ([] without a tokenizer)
    forced_score: list[bool] = field(default_factory=list)  # row's score came from the extra forward


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------
def _cfg(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _images_per_prompt(model, input_ids: paddle.Tensor) -> list[int]:
    """Images in each prompt row = count of <|vision_start|> tokens (one per image)."""
    start = _cfg(model.config, "vision_start_token_id")
    return (input_ids == start).astype("int64").sum(axis=1).numpy().tolist()


def _tokens_per_image(model, image_grid_thw: paddle.Tensor) -> list[int]:
    merge = _cfg(_cfg(model.config, "vision_config"), "spatial_merge_size", 2)
    thw = image_grid_thw.numpy()
    return [int(t * h * w) // (merge * merge) for t, h, w in thw]


def expand_image_inputs(model, input_ids, image_grid_thw, image_embeds, rows: Sequence[int]):
    """image_grid_thw / image_embeds for a batch whose row j is prompt `rows[j]` (rows may repeat)."""
    if image_embeds is None or image_grid_thw is None:
        return image_grid_thw, image_embeds
    per_prompt = _images_per_prompt(model, input_ids)
    n_tokens = _tokens_per_image(model, image_grid_thw)
    if sum(per_prompt) != len(n_tokens) or sum(n_tokens) != image_embeds.shape[0]:
        raise ValueError(f"image inputs do not match the prompts: {sum(per_prompt)} <|vision_start|> tokens, "
                         f"{len(n_tokens)} image grids, {sum(n_tokens)} expected image tokens, "
                         f"{image_embeds.shape[0]} embeddings")
    first_image = np.concatenate([[0], np.cumsum(per_prompt)]).astype(int)
    first_token = np.concatenate([[0], np.cumsum(n_tokens)]).astype(int)
    grid_idx, token_chunks = [], []
    for p in rows:
        for img in range(first_image[p], first_image[p + 1]):
            grid_idx.append(img)
            token_chunks.append(image_embeds[int(first_token[img]):int(first_token[img + 1])])
    if not grid_idx:
        return None, None
    grid = paddle.gather(image_grid_thw, paddle.to_tensor(grid_idx, dtype="int64"), axis=0)
    return grid, paddle.concat(token_chunks, axis=0)


def _core(model):
    """The model itself, or the layer inside a paddle.DataParallel wrapper (for config / get_rope_index)."""
    return model if hasattr(model, "get_rope_index") else getattr(model, "_layers", model)


def _model_layer(model):
    """The model layer itself, also behind a training proxy (ppiad.rl.trainer's _ForwardVia keeps it as
    `_core`) whose calls return the logits only: for passes that need the full output (past_key_values)."""
    core = _core(model)
    inner = getattr(core, "_core", None)
    return core if inner is None else inner


def _repeat_rows(x, g: int):
    return x if x is None or g == 1 else paddle.repeat_interleave(x, g, axis=0)


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Generation never uses dropout; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


_seeded = seeded   # a fixed Paddle seed for one call (ppiad.utils.seed.seeded)


def sampling_scores(logits: paddle.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    min_p: float = 0.0) -> paddle.Tensor:
    """The scores sampling draws from: float32 [N, V] from float32 logits [N, V], removed tokens at -inf
    (`sampling_probs` of the result = the sampling distribution).

    The filters run in the order transformers' `generate` builds its warpers (4.51,
    `GenerationMixin._get_logits_processor`): temperature (logits / T), top-k (keep the k highest), top-p
    (sort ascending, drop tokens whose cumulative probability is <= 1 - top_p), min-p (drop tokens less likely
    than min_p x the most likely one, on the distribution left by top-p); each keeps at least the top token.
    The order matters: with probabilities [0.5, 0.2, 0.2, 0.1], top_p 0.75 and min_p 0.25 this keeps
    [0.56, 0.22, 0.22, 0] (top-p first), min-p first would keep [0.71, 0.29, 0, 0]. Off: temperature 1,
    top_k 0, top_p 1, min_p 0. tests/test_sampling.py checks it against transformers' own warpers.
    """
    neg = -float("inf")
    scores = logits / temperature if temperature != 1.0 else logits
    vocab = scores.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = paddle.topk(scores, top_k, axis=-1)[0][:, -1:]
        scores = paddle.where(scores < kth, paddle.full_like(scores, neg), scores)
    if top_p < 1.0:
        order = paddle.argsort(scores, axis=-1)                                   # ascending
        ascending = paddle.take_along_axis(scores, order, axis=-1)
        cumulative = paddle.cumsum(F.softmax(ascending, axis=-1), axis=-1)
        drop = (cumulative <= 1.0 - top_p).astype("float32")
        drop[:, -1] = 0.0                                                         # keep the top token
        drop = paddle.put_along_axis(paddle.zeros_like(drop), order, drop, axis=-1) > 0.5
        scores = paddle.where(drop, paddle.full_like(scores, neg), scores)
    if min_p > 0.0:
        # p < min_p * p_max  <=>  score < max_score + log(min_p): no softmax needed
        floor = paddle.max(scores, axis=-1, keepdim=True) + float(np.log(min_p))
        scores = paddle.where(scores < floor, paddle.full_like(scores, neg), scores)
    return scores


def _pick(logits: paddle.Tensor, do_sample: bool, temperature: float, top_p: float, top_k: int,
          min_p: float = 0.0) -> paddle.Tensor:
    """Next token per row from float32 logits [N, V]: argmax, or a draw from `sampling_scores`."""
    if not do_sample:
        return paddle.argmax(logits, axis=-1)
    return paddle.multinomial(sampling_probs(sampling_scores(logits, temperature, top_k, top_p, min_p)), 1)[:, 0]


def sampling_probs(scores: paddle.Tensor) -> paddle.Tensor:
    """softmax over the last axis with exact zeros at -inf (Paddle's CPU softmax and exp leave 1e-28 / 1e-39
    there, so a removed token could still be drawn)."""
    e = paddle.exp(scores - paddle.max(scores, axis=-1, keepdim=True))
    e = paddle.where(paddle.isinf(scores), paddle.zeros_like(e), e)
    return e / e.sum(axis=-1, keepdim=True)


def _banned_ids(model) -> paddle.Tensor:
    """[1, V] float32, -inf at <|image_pad|> / <|video_pad|>, 0 elsewhere: added to the logits so these are
    never generated. A completion holding one could not be re-read by the teacher-forced forward (it would
    be taken for an image slot)."""
    vocab = _cfg(model.config, "vocab_size")
    add = np.zeros([1, vocab], dtype=np.float32)
    for name in ("image_token_id", "video_token_id"):
        tid = _cfg(model.config, name)
        if tid is not None and 0 <= tid < vocab:
            add[0, tid] = -np.inf
    return paddle.to_tensor(add)


def _last_logits(out) -> paddle.Tensor:
    return out.logits[:, -1, :].astype("float32")


def _synced(model, synced: Optional[bool]) -> bool:
    if synced is not None:
        return synced
    from ppiad.utils.distributed import collective_forward

    return collective_forward(_model_layer(model)) and paddle.distributed.get_world_size() > 1


def _all_done(flag: bool) -> bool:
    """True when `flag` holds on every process (one all-reduce)."""
    t = paddle.to_tensor([0.0 if flag else 1.0], dtype="float32")
    paddle.distributed.all_reduce(t)
    return float(t) == 0.0


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------
def generate(model, inputs: dict, *, num_samples: int = 1, max_new_tokens: int = 256, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             eos_token_ids: Sequence[int],
             answer_token_ids: Optional[AnswerTokens] = None, seed: Optional[int] = None, tokenizer=None,
             pad_token_id: Optional[int] = None, force_answer_score: bool = True,
             image_embeds: Optional[paddle.Tensor] = None, synced: Optional[bool] = None) -> GenerationResult:
    """Generate `num_samples` completions per prompt (see the module docstring for the details).

    `inputs`: the processor's dict (input_ids, attention_mask left padded, pixel_values, image_grid_thw).
    `tokenizer` (optional) decodes `texts` and, when `answer_token_ids` is None, provides the answer tokens;
    without either, answer scores are NaN. `image_embeds` skips the vision tower when already computed.
    `synced`: keep every process stepping until all are done (module docstring, item 6); None = when the
    model runs collectives in its forward (sharding stage 3). The results equal those of an unsynced call.
    """
    if not eos_token_ids:
        raise ValueError("generate: eos_token_ids is empty; pass the processor's eos_token_ids")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: num_samples and max_new_tokens must be >= 1, got {num_samples}, "
                         f"{max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"generate: temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 <= min_p < 1.0:
        raise ValueError(f"generate: min_p must be within [0, 1), got {min_p}")
    if answer_token_ids is None and tokenizer is not None:
        answer_token_ids = AnswerTokens.from_tokenizer(tokenizer)
    keep_freed_memory()
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        pad_token_id = eos_token_ids[0] if pad_token_id is None else pad_token_id
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = paddle.ones_like(input_ids)
    grid = inputs.get("image_grid_thw")
    g = num_samples
    b, t_prompt = input_ids.shape
    core = _core(model)
    synced = _synced(model, synced)
    with paddle.no_grad(), _eval_mode(model), _seeded(seed):
        if image_embeds is None and inputs.get("pixel_values") is not None:
            image_embeds = core.get_image_embeds(inputs["pixel_values"], grid)   # once for all prompts
        position_ids, rope_deltas = core.get_rope_index(input_ids, grid, attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                    image_grid_thw=grid, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        # Share the prefill among the G samples of each prompt: its keys/values are copied G times into a
        # preallocated cache that the decode steps then write in place.
        cache = StaticKVCache.from_prefill(out.past_key_values, attention_mask, capacity=t_prompt + max_new_tokens,
                                           repeats=g)
        logits = _repeat_rows(_last_logits(out), g)
        deltas = _repeat_rows(rope_deltas.reshape([b, 1]).astype("int64"), g)
        del out

        n = b * g
        eos = paddle.to_tensor(list(eos_token_ids), dtype="int64")
        cand = paddle.to_tensor(answer_token_ids.candidate_ids, dtype="int64") if answer_token_ids else None
        pad = paddle.full([n], pad_token_id, dtype="int64")
        zero = paddle.zeros([n], dtype="float32")
        finished = paddle.zeros([n], dtype="bool")
        tokens, logps, valid, cand_logits = [], [], [], []
        banned = _banned_ids(core)
        done_at = None   # steps this process needs (its rows all stopped); later synced steps are dropped
        for step in range(max_new_tokens):
            if done_at is not None:   # synced: this process is done, others are not; keep their collectives
                # pad tokens into the cache's spare slots (capacity t_prompt + max_new_tokens covers the at most
                # max_new_tokens - 1 decode forwards of any process); their outputs are dropped
                model(input_ids=pad.unsqueeze(-1), position_ids=deltas + (t_prompt + step - 1),
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
                if step == max_new_tokens - 1 or _all_done(True):
                    break
                continue
            nxt = _pick(logits + banned, do_sample, temperature, top_p, top_k, min_p)
            # log p(chosen) = logit - logsumexp (Paddle's CPU log_softmax is ~100x slower than logsumexp)
            logp = (paddle.index_sample(logits, nxt.unsqueeze(-1))
                    - paddle.logsumexp(logits, axis=-1, keepdim=True))[:, 0]
            nxt = paddle.where(finished, pad, nxt)
            tokens.append(nxt)
            logps.append(paddle.where(finished, zero, logp))
            valid.append(paddle.logical_not(finished))
            if cand is not None:
                cand_logits.append(paddle.index_select(logits, cand, axis=1))
            finished = paddle.logical_or(finished, (nxt.unsqueeze(-1) == eos.unsqueeze(0)).any(axis=-1))
            if step == max_new_tokens - 1:
                break
            if bool(finished.all()):
                done_at = step + 1
                if not synced or _all_done(True):
                    break
                continue
            if synced:
                _all_done(False)
            # Rows that have stopped keep stepping on pad tokens; their outputs are discarded, so the cache
            # needs no per-step mask. Text positions are the same on the three rotary axes: [N, 1] suffices.
            pos = deltas + (t_prompt + step)
            out = model(input_ids=nxt.unsqueeze(-1), position_ids=pos, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            logits = _last_logits(out)
            del out
        del cache
        sequences = paddle.stack(tokens, axis=1)
        completion_mask = paddle.stack(valid, axis=1).astype("float32")
        logprobs = paddle.stack(logps, axis=1)

        seq_np = sequences.numpy()
        lengths = completion_mask.numpy().sum(axis=1).astype(int)
        eos_set = set(int(e) for e in eos_token_ids)
        bodies = [[int(x) for x in seq_np[r, :lengths[r]]] for r in range(n)]
        bodies = [row[:-1] if row and row[-1] in eos_set else row for row in bodies]   # drop the stop token
        scores = np.full([n], np.nan, dtype=np.float32)
        forced = [False] * n
        if answer_token_ids is not None:
            cand_np = paddle.stack(cand_logits, axis=1).numpy()    # [N, T, 2 or 4]
            missing = []
            for r in range(n):
                hit = answer_token_ids.find_decision(bodies[r])
                if hit is None:
                    missing.append(r)
                    continue
                if hit == UNSCORABLE:
                    continue   # NaN
                step, pair = hit
                scores[r] = _p_a(*cand_np[r, step, 2 * pair:2 * pair + 2])
            need = run = bool(missing) and force_answer_score
            if synced and force_answer_score:
                run = not _all_done(not need)   # some process needs the extra forward: all make it
            if run:
                rows = [r // g for r in missing] if need else [0]   # [0]: a throw-away call for the others
                got = _forced_scores(model, core, input_ids, attention_mask, grid, image_embeds, rows,
                                     [bodies[r] for r in missing] if need else [[]], answer_token_ids,
                                     pad_token_id)
                if need:
                    scores[missing] = got
                    for r in missing:
                        forced[r] = True
        texts = [tokenizer.decode(body, skip_special_tokens=False) for body in bodies] if tokenizer else []
    return GenerationResult(sequences=sequences, completion_mask=completion_mask, logprobs=logprobs,
                            answer_scores=paddle.to_tensor(scores), prompt_index=[r // g for r in range(n)],
                            image_embeds=image_embeds, texts=texts, forced_score=forced)


def _forced_scores(model, core, input_ids, attention_mask, grid, image_embeds, rows, bodies, answer: AnswerTokens,
                   pad_token_id) -> np.ndarray:
    """P(A) after appending the answer opener to each truncated completion: one batched forward."""
    ids_np, mask_np = input_ids.numpy(), attention_mask.numpy()
    if answer.merged_ids:
        suffix, pair = answer.open_ids, answer.merged_ids
    else:
        suffix, pair = answer.open_ids + answer.close_ids, answer.split_ids
    seqs = [[int(x) for x in ids_np[p][mask_np[p] == 1]] + body + suffix for p, body in zip(rows, bodies)]
    width = max(len(s) for s in seqs)
    ids = np.full([len(seqs), width], pad_token_id, dtype=np.int64)
    mask = np.zeros([len(seqs), width], dtype=np.int64)
    for i, s in enumerate(seqs):   # left padding, as in the prompts
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    ids_t, mask_t = paddle.to_tensor(ids), paddle.to_tensor(mask)
    grid_r, embeds_r = expand_image_inputs(core, input_ids, grid, image_embeds, rows)
    position_ids, _ = core.get_rope_index(ids_t, grid_r, mask_t)
    out = model(input_ids=ids_t, attention_mask=mask_t, image_embeds=embeds_r, image_grid_thw=grid_r,
                position_ids=position_ids, logits_to_keep=1)
    last = _last_logits(out).numpy()
    return np.array([_p_a(last[i, pair[0]], last[i, pair[1]]) for i in range(len(seqs))], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# Teacher-forced log-probs (GRPO update and reference policy)
# ---------------------------------------------------------------------------------------------------------
def completion_logprobs(model, inputs: dict, sequences: paddle.Tensor, completion_mask: paddle.Tensor,
                        num_samples: int, image_embeds: Optional[paddle.Tensor] = None,
                        temperature: float = 1.0, return_entropy: bool = False):
    """log p(sequences[r, j] | prompt, sequences[r, :j]) for every row, [N, T] float32, 0 where the mask is 0.

    return_entropy: also return the entropy (nats) of each position's distribution softmax(logits / T),
    [N, T] float32 without gradient, 0 where the mask is 0: (logp, entropy).

    temperature T: the log-probs of the distribution softmax(logits / T), the one rollouts sampled from at T
    (TRL's GRPO divides the logits by its sampling temperature the same way for the policy, old and reference
    log-probs); T = 1 gives the model's own distribution. ValueError if T <= 0.

    The prompt is computed once per prompt, not once per completion: a forward over the B prompts
    (`use_cache=True`) gives the KV cache and the logits of the last prompt position (they predict
    completion token 0); the cache is repeated G times on the batch axis and the N = B*G completions run on
    top of it. Gradients (when enabled) flow through the repeat back into the shared prompt pass, so the
    numbers and gradients equal one full forward over prompt + completion per row, at ~1/G of the prompt
    cost. Pass `image_embeds` from the GenerationResult to skip the vision tower. Runs in the model's
    current train/eval mode (LoRA dropout on the prompt is then shared by its G rows): call it under
    `adapters_disabled(model)` for the reference policy.
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    core = _core(model)
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = paddle.ones_like(input_ids)
    attention_mask = attention_mask.astype("int64")
    grid = inputs.get("image_grid_thw")
    b, t_prompt = input_ids.shape
    n, t = sequences.shape
    g = num_samples
    if n != b * g:
        raise ValueError(f"completion_logprobs: {n} sequences for {b} prompts x {g} samples")
    if image_embeds is None and inputs.get("pixel_values") is not None:
        image_embeds = core.get_image_embeds(inputs["pixel_values"], grid)
    # 1. prompt pass on the B prompts, on the model layer itself: it must return the cache, and a
    # DataParallel wrapper must see only the last forward before backward (its reducer is prepared from
    # that output, whose graph reaches every parameter through the cache).
    position_ids, rope_deltas = core.get_rope_index(input_ids, grid, attention_mask)
    out = _model_layer(model)(input_ids=input_ids, attention_mask=attention_mask, image_embeds=image_embeds,
                              image_grid_thw=grid, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    cache = [(_repeat_rows(k, g), _repeat_rows(v, g)) for k, v in out.past_key_values]
    first = _repeat_rows(out.logits, g)                                          # [N, 1, V] predicts token 0
    # 2. completion pass on the N rows. Completion token j sits at padded index t_prompt + j, so its rotary
    # position is t_prompt + j + rope_delta (text after the prompt), as in `generate`'s decode steps.
    # Masked tokens (after the stop token) are neither seen by valid ones nor counted.
    deltas = _repeat_rows(rope_deltas.reshape([b, 1]).astype("int64"), g)
    pos = paddle.arange(t_prompt, t_prompt + t, dtype="int64").unsqueeze(0) + deltas
    pos = pos.unsqueeze(0).expand([3, n, t])
    mask = paddle.concat([_repeat_rows(attention_mask, g), completion_mask.astype("int64")], axis=1)
    # The last completion token predicts nothing we need; feeding it anyway keeps one code path for T = 1.
    out = model(input_ids=sequences.astype(input_ids.dtype), attention_mask=mask, position_ids=pos,
                past_key_values=cache, use_cache=False)
    logits = paddle.concat([first, out.logits[:, :t - 1, :]], axis=1).astype("float32")   # [N, T, V]
    if temperature != 1.0:
        logits = logits / temperature
    chosen = paddle.take_along_axis(logits, sequences.astype("int64").unsqueeze(-1), axis=-1)[..., 0]
    lse = paddle.logsumexp(logits, axis=-1)
    logp = (chosen - lse) * completion_mask.astype("float32")
    if not return_entropy:
        return logp
    return logp, token_entropy(logits, lse) * completion_mask.astype("float32")


def token_entropy(logits: paddle.Tensor, lse: Optional[paddle.Tensor] = None) -> paddle.Tensor:
    """Entropy in nats of softmax(logits) at each position, [N, T] float32 without gradient, for logits
    [N, T, V]: H = logsumexp(z) - sum_v softmax(z)_v z_v. One row at a time, so the extra memory is one
    [T, V] slice, not another [N, T, V] tensor. `lse`: logsumexp(logits, -1) when already computed."""
    with paddle.no_grad():
        z = logits.detach().astype("float32")
        lse = paddle.logsumexp(z, axis=-1) if lse is None else lse.detach()
        mean_z = paddle.stack([(paddle.nn.functional.softmax(z[r], axis=-1) * z[r]).sum(axis=-1)
                               for r in range(z.shape[0])])
        return lse - mean_z
