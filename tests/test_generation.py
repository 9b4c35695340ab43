"""KV-cache generation on a tiny random Qwen2-VL: cache == re-forward, shared prefill, stops, sampling,
log-probs, answer scores."""
import math

import numpy as np
import paddle
import pytest
from PIL import Image

from ppiad.models import generation as gen
from ppiad.models.generation import AnswerTokens, completion_logprobs, generate
from ppiad.models.lora import adapters_disabled, apply_lora, lora_parameters

from tests.conftest import QWEN2_TOKENIZER_DIR, require_shared


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def tiny(tmp_path_factory, request):
    """Each generation test runs on both families (the Qwen2.5-VL stand-in has windowed vision attention)."""
    from ppiad.models import AutoModel, AutoProcessor
    from ppiad.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")), seed=0, family=request.param)
    return AutoModel.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _inputs(proc, n=2):
    # different image sizes -> different numbers of image tokens and left padding
    images = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8))
              for i in range(n)]
    return proc.build_inputs(images, ["pill", "metal nut", "screw"][:n])


def _reference_greedy(model, inputs, steps, eos):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    ids, mask, grid = inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"]
    embeds = model.get_image_embeds(inputs["pixel_values"], grid)
    out_tokens = []
    with paddle.no_grad():
        for _ in range(steps):
            pos, _ = model.get_rope_index(ids, grid, mask)
            logits = model(input_ids=ids, attention_mask=mask, image_embeds=embeds, image_grid_thw=grid,
                           position_ids=pos).logits[:, -1]
            nxt = paddle.argmax(logits, axis=-1)
            out_tokens.append(nxt.numpy())
            ids = paddle.concat([ids, nxt.unsqueeze(-1)], axis=1)
            mask = paddle.concat([mask, paddle.ones_like(nxt).unsqueeze(-1)], axis=1)
    return np.stack(out_tokens, axis=1)


def _valid_prefix(row, eos):
    for i, t in enumerate(row):
        if t in eos:
            return i + 1
    return len(row)


def test_greedy_with_cache_equals_full_reforward(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    res = generate(model, inputs, max_new_tokens=12, eos_token_ids=proc.eos_token_ids)
    ref = _reference_greedy(model, inputs, 12, proc.eos_token_ids)
    seq, mask = res.sequences.numpy(), res.completion_mask.numpy()
    for r in range(2):
        n = _valid_prefix(ref[r], proc.eos_token_ids)
        assert mask[r].sum() == n
        np.testing.assert_array_equal(seq[r, :n], ref[r, :n])


def test_top_k_1_equals_greedy(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    greedy = generate(model, inputs, max_new_tokens=10, eos_token_ids=proc.eos_token_ids)
    topk1 = generate(model, inputs, max_new_tokens=10, do_sample=True, temperature=1.3, top_k=1,
                     eos_token_ids=proc.eos_token_ids, seed=3)
    np.testing.assert_array_equal(topk1.sequences.numpy(), greedy.sequences.numpy())


def test_min_p_keeps_tokens_at_least_min_p_times_as_likely_as_the_top_one():
    # probabilities 0.92 / 0.04 / 0.03 / 1e-4 x 100: at min_p 0.04 the floor is 0.0368, so token 1 stays (a
    # confident model's minority answer keeps being explored) and tokens 2.. never appear (the stray tail)
    probs = np.array([0.92, 0.04, 0.03] + [1e-4] * 100, dtype=np.float64)
    logits = paddle.to_tensor(np.log(probs / probs.sum())[None].repeat(4000, 0).astype("float32"))
    paddle.seed(0)
    picked = gen._pick(logits, True, 1.0, 1.0, 0, min_p=0.04).numpy()
    counts = np.bincount(picked, minlength=len(probs))
    assert counts[2:].sum() == 0
    assert 0.03 < counts[1] / len(picked) < 0.055  # renormalised share 0.04 / 0.96
    paddle.seed(0)
    nucleus = gen._pick(logits, True, 1.0, 0.9, 0).numpy()
    assert set(nucleus.tolist()) == {0}  # top_p 0.9 keeps only the top token here: no exploration left
    paddle.seed(0)
    plain = gen._pick(logits, True, 1.0, 1.0, 0).numpy()
    assert (plain >= 2).sum() > 0  # without a cut the tail is sampled


def test_min_p_out_of_range_is_refused(tiny):
    model, proc = tiny
    with pytest.raises(ValueError, match="min_p"):
        generate(model, _inputs(proc), do_sample=True, min_p=1.0, max_new_tokens=2, eos_token_ids=proc.eos_token_ids)


def test_seed_makes_sampling_reproducible_and_restores_rng(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    kw = dict(num_samples=3, max_new_tokens=10, do_sample=True, top_p=0.9, eos_token_ids=proc.eos_token_ids)
    paddle.seed(123)
    before = paddle.rand([4]).numpy()
    paddle.seed(123)
    a = generate(model, inputs, seed=7, **kw).sequences.numpy()
    after = paddle.rand([4]).numpy()
    np.testing.assert_array_equal(before, after)  # the seeded call left the global RNG as it found it
    b = generate(model, inputs, seed=7, **kw).sequences.numpy()
    c = generate(model, inputs, seed=8, **kw).sequences.numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) > 1  # the G samples of a prompt differ


def test_vision_and_prefill_run_once_per_prompt(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    vision_calls, decoder_shapes = [], []
    h1 = model.visual.register_forward_pre_hook(lambda layer, args: vision_calls.append(args[0].shape))
    h2 = model.model.register_forward_pre_hook(lambda layer, args: decoder_shapes.append(list(args[0].shape)))
    try:
        res = generate(model, inputs, num_samples=4, max_new_tokens=6, do_sample=True,
                       eos_token_ids=proc.eos_token_ids, seed=0, force_answer_score=False)
    finally:
        h1.remove()
        h2.remove()
    assert len(vision_calls) == 1 and vision_calls[0][0] == inputs["pixel_values"].shape[0]
    b, t = inputs["input_ids"].shape
    assert decoder_shapes[0][:2] == [2, t]  # one prefill, on the 2 prompts (not 8 rows)
    assert all(s[:2] == [8, 1] for s in decoder_shapes[1:])  # then one token per row and step
    assert len(decoder_shapes) == 1 + res.sequences.shape[1] - 1
    assert res.prompt_index == [0, 0, 0, 0, 1, 1, 1, 1]


def test_stop_tokens_end_rows_independently(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    free = generate(model, inputs, max_new_tokens=12, eos_token_ids=proc.eos_token_ids).sequences.numpy()
    # Declare the tokens row 0 emits at steps 3 and 7 "stop tokens": each row must stop at its first one.
    stops = [int(free[0, 3]), int(free[0, 7])]
    res = generate(model, inputs, max_new_tokens=12, eos_token_ids=stops, pad_token_id=proc.tokenizer.pad_token_id)
    seq, mask, lp = res.sequences.numpy(), res.completion_mask.numpy(), res.logprobs.numpy()
    lengths = []
    for r in range(2):
        n = _valid_prefix(free[r], stops)
        lengths.append(n)
        np.testing.assert_array_equal(seq[r, :n], free[r, :n])
        assert mask[r, :n].all() and not mask[r, n:].any()
        assert (seq[r, n:] == proc.tokenizer.pad_token_id).all() and (lp[r, n:] == 0).all()
        assert (lp[r, :n] < 0).all()
    assert lengths[0] <= 4
    assert seq.shape[1] == max(lengths)  # the loop ends once every row has stopped


def test_completion_logprobs_match_generate_and_carry_gradients(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    res = generate(model, inputs, num_samples=3, max_new_tokens=16, do_sample=True, temperature=1.5,
                   eos_token_ids=proc.eos_token_ids, seed=11)
    lp = completion_logprobs(model, inputs, res.sequences, res.completion_mask, 3, image_embeds=res.image_embeds)
    np.testing.assert_allclose(lp.numpy(), res.logprobs.numpy(), atol=1e-4)
    # without precomputed embeddings the vision tower runs inside: same numbers
    lp2 = completion_logprobs(model, inputs, res.sequences, res.completion_mask, 3)
    np.testing.assert_allclose(lp2.numpy(), lp.numpy(), atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_logprobs_gradients_reach_lora_and_reference_is_base(tmp_path, family):
    from ppiad.models import AutoModel, AutoProcessor
    from ppiad.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path), seed=1, layers=1, vision_depth=1, family=family)
    base = AutoModel.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    inputs = _inputs(proc)
    res = generate(base, inputs, num_samples=2, max_new_tokens=8, do_sample=True,
                   eos_token_ids=proc.eos_token_ids, seed=2)
    base_lp = completion_logprobs(base, inputs, res.sequences, res.completion_mask, 2, res.image_embeds).numpy()
    model = apply_lora(AutoModel.from_pretrained(path), r=4, alpha=16, dropout=0.0)
    rng = np.random.default_rng(0)
    for p in lora_parameters(model)[1::2]:  # random B moves the policy away from the base
        p.set_value(paddle.to_tensor(rng.normal(0, 0.5, p.shape).astype("float32")))
    model.train()
    lp = completion_logprobs(model, inputs, res.sequences, res.completion_mask, 2, res.image_embeds)
    assert np.abs(lp.numpy() - base_lp).max() > 1e-3
    lp.sum().backward()
    grads = [p.grad for p in lora_parameters(model)]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    with paddle.no_grad(), adapters_disabled(model):
        ref = completion_logprobs(model, inputs, res.sequences, res.completion_mask, 2, res.image_embeds)
    np.testing.assert_allclose(ref.numpy(), base_lp, atol=1e-5)


# ---- shared-prompt teacher forcing -------------------------------------------------------------------------
def _full_forward_logprobs(model, inputs, sequences, mask, g, image_embeds=None):
    """The plain way: prompt repeated G times + completion, one forward over all N rows (no cache)."""
    core = gen._core(model)
    ids, pmask, grid = inputs["input_ids"], inputs["attention_mask"].astype("int64"), inputs["image_grid_thw"]
    if image_embeds is None:
        image_embeds = core.get_image_embeds(inputs["pixel_values"], grid)
    n, t = sequences.shape
    grid_r, embeds_r = gen.expand_image_inputs(core, ids, grid, image_embeds, [r // g for r in range(n)])
    full_ids = paddle.concat([paddle.repeat_interleave(ids, g, axis=0), sequences], axis=1)
    full_mask = paddle.concat([paddle.repeat_interleave(pmask, g, axis=0), mask.astype("int64")], axis=1)
    pos, _ = core.get_rope_index(full_ids, grid_r, full_mask)
    logits = model(input_ids=full_ids, attention_mask=full_mask, image_embeds=embeds_r, image_grid_thw=grid_r,
                   position_ids=pos).logits[:, ids.shape[1] - 1:-1].astype("float32")
    chosen = paddle.take_along_axis(logits, sequences.unsqueeze(-1), axis=-1)[..., 0]
    return (chosen - paddle.logsumexp(logits, axis=-1)) * mask


def _completions(model, g, t=9, seed=0):
    """Random text completions for 2 prompts x g rows, of lengths t, 3, 5, 1, ... (mask 1 then 0)."""
    cfg = model.config
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    vocab = [i for i in range(cfg.vocab_size) if i not in special]
    rng = np.random.default_rng(seed)
    seqs = rng.choice(vocab, size=(2 * g, t)).astype("int64")
    lengths = [t, 3, 5, 1, 7, 2][:2 * g]
    mask = (np.arange(t)[None, :] < np.array(lengths)[:, None]).astype("float32")
    return paddle.to_tensor(seqs), paddle.to_tensor(mask)


def test_shared_prompt_logprobs_equal_full_forward_and_prompt_runs_once(tiny):
    model, proc = tiny
    inputs = _inputs(proc)
    mask_np = inputs["attention_mask"].numpy()
    assert mask_np.sum(axis=1)[0] < mask_np.sum(axis=1)[1]  # prompts of different lengths: left padding
    seqs, mask = _completions(model, 3)
    shapes = []
    hook = model.model.register_forward_pre_hook(lambda layer, args: shapes.append(list(args[0].shape[:2])))
    try:
        with paddle.no_grad():
            lp = completion_logprobs(model, inputs, seqs, mask, 3)
    finally:
        hook.remove()
    t_prompt = inputs["input_ids"].shape[1]
    assert shapes == [[2, t_prompt], [6, seqs.shape[1]]]  # the prompt once per prompt, then the completions
    with paddle.no_grad():
        want = _full_forward_logprobs(model, inputs, seqs, mask, 3)
    np.testing.assert_allclose(lp.numpy(), want.numpy(), atol=1e-5)
    assert (lp.numpy()[mask.numpy() == 0] == 0).all() and (lp.numpy()[mask.numpy() == 1] < 0).all()
    # a single completion token: only the prompt pass's last logits count
    with paddle.no_grad():
        one = completion_logprobs(model, inputs, seqs[:, :1], mask[:, :1], 3)
    np.testing.assert_allclose(one.numpy(), want.numpy()[:, :1], atol=1e-5)


@pytest.mark.parametrize("vision_lora", [False, True])
def test_shared_prompt_gradients_equal_full_forward(tmp_path, vision_lora):
    from ppiad.models.processor import Qwen2VLProcessor
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(str(tmp_path), seed=3)
    proc = Qwen2VLProcessor.from_pretrained(path)
    targets = ["q_proj", "v_proj"] + ([r"visual\.blocks\.\d+\.attn\.qkv"] if vision_lora else [])
    model = apply_lora(Qwen2VLForConditionalGeneration.from_pretrained(path), r=4, alpha=16, dropout=0.0,
                       target_modules=targets)
    params = lora_parameters(model)
    ids = {id(p) for p in params}
    name_of = {id(p): n for n, p in model.named_parameters() if id(p) in ids}
    names = [name_of[id(p)] for p in params]
    rng = np.random.default_rng(1)
    for p in params[1::2]:  # lora_B is zero after apply_lora: make the adapters matter
        p.set_value(paddle.to_tensor(rng.normal(0, 0.3, p.shape).astype("float32")))
    model.train()
    inputs = _inputs(proc)
    seqs, mask = _completions(model, 3, seed=2)
    weights = paddle.to_tensor(rng.normal(0, 1, seqs.shape).astype("float32"))  # a loss like GRPO's
    embeds = None if vision_lora else model.get_image_embeds(inputs["pixel_values"], inputs["image_grid_thw"])

    def grads(fn):
        for p in params:
            p.clear_gradient()
        lp = fn(model, inputs, seqs, mask, 3, embeds)
        (lp * weights).sum().backward()
        return lp.numpy(), [p.grad.numpy().copy() for p in params]

    lp_new, g_new = grads(completion_logprobs)
    lp_old, g_old = grads(_full_forward_logprobs)
    np.testing.assert_allclose(lp_new, lp_old, atol=1e-5)
    n_vision = 0
    for name, a, b in zip(names, g_new, g_old):
        assert np.abs(b).sum() > 0, name
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name
        n_vision += name.startswith("visual.")
    assert (n_vision > 0) == vision_lora  # the vision tower's adapters get (equal) gradients too
    with paddle.no_grad(), adapters_disabled(model):
        ref = completion_logprobs(model, inputs, seqs, mask, 3)
        base = _full_forward_logprobs(model, inputs, seqs, mask, 3)
    np.testing.assert_allclose(ref.numpy(), base.numpy(), atol=1e-5)
    assert np.abs(ref.numpy() - lp_new).max() > 1e-3  # disabling the adapters changed the policy


# ---- answer scores ----------------------------------------------------------------------------------------
def _scripted(monkeypatch, script):
    """Make generate emit `script` (one list of ids per row) instead of choosing tokens."""
    state = {"step": 0}
    real = gen._pick

    def pick(logits, *a, **k):
        real(logits, *a, **k)
        step = state["step"]
        state["step"] += 1
        return paddle.to_tensor([row[min(step, len(row) - 1)] for row in script], dtype="int64")

    monkeypatch.setattr(gen, "_pick", pick)


def _expected_score(model, inputs, row, body, pair_ids):
    """P(a) / (P(a) + P(b)) after prompt `row` + `body` by a plain full forward."""
    ids = inputs["input_ids"][row:row + 1]
    mask = inputs["attention_mask"][row:row + 1]
    keep = mask.numpy()[0] == 1
    seq = paddle.to_tensor([list(ids.numpy()[0][keep]) + body], dtype="int64")
    full_mask = paddle.ones_like(seq)
    grid = inputs["image_grid_thw"][row:row + 1]
    n_patches = int(np.prod(inputs["image_grid_thw"].numpy(), axis=1)[:row].sum())
    pixels = inputs["pixel_values"][n_patches:n_patches + int(np.prod(grid.numpy()))]
    pos, _ = model.get_rope_index(seq, grid, full_mask)
    with paddle.no_grad():
        logits = model(input_ids=seq, attention_mask=full_mask, pixel_values=pixels, image_grid_thw=grid,
                       position_ids=pos).logits[0, -1].numpy()
    la, lb = logits[pair_ids[0]], logits[pair_ids[1]]
    return 1.0 / (1.0 + math.exp(lb - la))


def test_answer_score_at_merged_and_split_positions(tiny, monkeypatch):
    model, proc = tiny
    tok = proc.tokenizer
    inputs = _inputs(proc)
    end = tok.token_to_id("<|im_end|>")
    merged = tok.encode("<think>ok</think> <answer>A</answer>")  # "<answer" then ">A" (merged)
    assert tok.token_to_id(">A") in merged
    opener = merged[:merged.index(tok.token_to_id(">A"))]
    split = opener + [tok.token_to_id(">"), tok.token_to_id("B"), tok.token_to_id("</")]
    _scripted(monkeypatch, [merged + [end], split + [end]])
    res = generate(model, inputs, max_new_tokens=30, eos_token_ids=proc.eos_token_ids, tokenizer=tok)
    assert res.texts[0] == "<think>ok</think> <answer>A</answer>"
    assert res.forced_score == [False, False]
    got = res.answer_scores.numpy()
    want0 = _expected_score(model, inputs, 0, opener, (tok.token_to_id(">A"), tok.token_to_id(">B")))
    want1 = _expected_score(model, inputs, 1, opener + [tok.token_to_id(">")], (tok.token_to_id("A"),
                                                                                 tok.token_to_id("B")))
    np.testing.assert_allclose(got, [want0, want1], atol=1e-5)


def test_answer_score_forced_or_nan_without_answer(tiny, monkeypatch):
    model, proc = tiny
    tok = proc.tokenizer
    inputs = _inputs(proc)
    body = tok.encode("<think>the pill looks")  # truncated reasoning, no answer
    _scripted(monkeypatch, [body, body])
    res = generate(model, inputs, max_new_tokens=len(body), eos_token_ids=proc.eos_token_ids, tokenizer=tok)
    assert res.forced_score == [True, True]
    answer = AnswerTokens.from_tokenizer(tok)
    want = [_expected_score(model, inputs, r, body + answer.open_ids, answer.merged_ids) for r in range(2)]
    np.testing.assert_allclose(res.answer_scores.numpy(), want, atol=1e-5)
    _scripted(monkeypatch, [body, body])
    res = generate(model, inputs, max_new_tokens=len(body), eos_token_ids=proc.eos_token_ids, tokenizer=tok,
                   force_answer_score=False)
    assert np.isnan(res.answer_scores.numpy()).all()


def test_decision_position_with_the_real_qwen2_tokenizer():
    from ppiad.models.tokenizer import QwenTokenizer

    tok = QwenTokenizer.from_pretrained(require_shared(QWEN2_TOKENIZER_DIR))
    answer = AnswerTokens.from_tokenizer(tok)
    assert answer.merged_ids == (tok.token_to_id(">A"), tok.token_to_id(">B"))
    ids = tok.encode("<think>a scratch</think> <answer>A</answer>")
    step, pair = answer.find_decision(ids)
    assert answer.pairs[pair] == answer.merged_ids and ids[step] == tok.token_to_id(">A")
    # the same text emitted with ">" and "B" as separate tokens: decision at "B", split pair
    split = ids[:step] + [tok.token_to_id(">"), tok.token_to_id("B")]
    assert answer.find_decision(split) == (step + 1, answer.letter_pairs[tok.token_to_id("A")])
    # two answer blocks: the last one counts; none: None
    two = ids + tok.encode(" <answer>B</answer>")
    assert answer.find_decision(two)[0] > step
    assert answer.find_decision(tok.encode("<think>no verdict yet")) is None


def test_bad_arguments_are_rejected(tiny):
    model, proc = tiny
    inputs = _inputs(proc, 1)
    with pytest.raises(ValueError, match="eos_token_ids"):
        generate(model, inputs, eos_token_ids=[])
    with pytest.raises(ValueError, match="temperature"):
        generate(model, inputs, do_sample=True, temperature=0.0, eos_token_ids=proc.eos_token_ids)
    res = generate(model, inputs, max_new_tokens=2, eos_token_ids=proc.eos_token_ids)
    with pytest.raises(ValueError, match="3 samples"):
        completion_logprobs(model, inputs, res.sequences, res.completion_mask, 3)


def test_keep_freed_memory_is_idempotent():
    import sys

    first = gen.keep_freed_memory()
    assert gen.keep_freed_memory() == first
    if sys.platform.startswith("linux"):
        assert first is True  # glibc's mallopt accepted both settings
