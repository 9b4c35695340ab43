"""Sharding stages 2 and 3 under CPU emulation (PPIAD_EMULATE_SHARDING_ON_CPU=1: Paddle's own
GroupShardedStage3 / GroupShardedOptimizerStage2 + GroupShardedStage2 on gloo, their device checks bypassed).
This proves ppiad's sharding logic (stage 3: every weight gathered through its layer's call, tied head, synced
decoding, memory released; stage 2: gradients reduced to their owner, then averaged and clipped globally by
ppiad), not GPU behaviour.

Two processes train the tiny stand-in (tied and untied LM head) for 3 optimizer steps with gradient
accumulation and beta > 0, with data parallel, stage 1, stage 2 and stage 3 (a segment size small enough that
the frozen base is really split); sampled rollouts stop at different steps on each process. All runs must end
with the same adapters and log the same metrics. Running this file as a script is the launched worker."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SEGMENT = 2048   # elements: splits the embedding, MLPs, patch conv; the LoRA tensors (<= 256) stay whole
STEPS = 3


def test_wrap_refuses_split_adapters_and_optimizer_clips(monkeypatch):
    import paddle

    from ppiad.utils import distributed

    monkeypatch.setenv(distributed.EMULATE_ENV, "1")
    layer = paddle.nn.Linear(64, 64)       # 4,160 trainable elements in two tensors
    env = distributed.DistEnv(0, 2, "stage3")
    with pytest.raises(ValueError, match="stage3_segment_size=1000 is smaller than trainable parameter"):
        distributed.wrap(layer, paddle.optimizer.SGD(parameters=layer.parameters()), env, segment_size=1000)
    clipped = paddle.optimizer.SGD(parameters=layer.parameters(), grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    with pytest.raises(ValueError, match="without grad_clip"):
        distributed.wrap(layer, clipped, env)


def _launch(tmp_path, name, sharding, assets, timeout=240):
    out = tmp_path / name
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, PPIAD_EMULATE_SHARDING_ON_CPU="1")
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(out / "log"), os.path.abspath(__file__), "--worker", str(out), sharding, json.dumps(assets)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{sharding}: the 2-process run did not finish within {timeout} s (a hang)")
    logs = ""
    if (out / "log").is_dir():
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((out / "log").iterdir()))
    assert proc.returncode == 0, f"launch failed:\n{proc.stderr[-2000:]}\n{logs}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.test_trainer import build_assets
    return build_assets(tmp_path_factory.mktemp("stage3_assets"))


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stage3_runs")
    return {s: _launch(tmp, s, s, assets) for s in ("none", "stage1", "stage2", "stage3")}


def _same_metrics(reference, other):
    assert len(other) == len(reference) == STEPS
    for m_ref, m in zip(reference, other):
        assert m_ref.keys() == m.keys()
        for key in m_ref:
            if key.startswith("seconds") or key in ("time", "step"):
                continue
            assert m[key] == pytest.approx(m_ref[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_stage3_matches_data_parallel(runs, head):
    dp, s3 = runs["none"], runs["stage3"]
    for rank in range(2):
        a, b = dp[rank][head], s3[rank][head]
        assert a["split"] == 0 and b["split"] > 0          # stage 3 really split the base
        # the processes decoded different numbers of steps in some rollout: the synced loop was needed
        assert b["decode_steps"] == a["decode_steps"]
        for name in a["adapters"]:
            np.testing.assert_allclose(b["adapters"][name], a["adapters"][name], rtol=0, atol=1e-5, err_msg=name)
        assert a["adapters"] != a["start"]                 # training moved the adapters
    steps0, steps1 = s3[0][head]["decode_steps"], s3[1][head]["decode_steps"]
    assert steps0 != steps1, "the rollouts should stop at different steps on the two processes"
    _same_metrics(dp[0][head]["metrics"], s3[0][head]["metrics"])   # loss, rewards, kl, grad_norm, ...
    assert all(m["grad_norm"] > 0.05 for m in s3[0][head]["metrics"])  # the clip (max norm 0.05) acted
    assert s3[0][head]["metrics"][0]["loss"] != 0.0 and s3[0][head]["metrics"][0]["grad_norm"] > 0


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_stage3_evaluation_with_uneven_decoding_and_forced_scores(runs, head):
    dp, s3 = runs["none"], runs["stage3"]
    for rank in range(2):
        a, b = dp[rank][head]["evaluation"], s3[rank][head]["evaluation"]
        assert b["sequences"] == a["sequences"] and b["forced"] == a["forced"]
        np.testing.assert_allclose(b["scores"], a["scores"], rtol=1e-4, atol=1e-6)
    r0, r1 = s3[0][head]["evaluation"], s3[1][head]["evaluation"]
    assert len(r0["sequences"][0]) < len(r1["sequences"][0]) == 8     # rank 0 stopped early
    assert not any(r0["forced"]) and all(r1["forced"])                  # only rank 1 needed the extra forward


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_resume_under_stage3_is_exact(runs, head):
    for mode in ("none", "stage3"):
        for rank in range(2):
            r = runs[mode][rank][head]
            assert r["resumed_sha256"] == r["sha256"], (mode, rank)


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_stage1_matches_data_parallel(runs, head):
    """The logged grad_norm (and everything else) is the same under data parallel and sharding stage 1: the
    norm is taken after the gradients are combined over the processes."""
    for rank in range(2):
        a, b = runs["none"][rank][head], runs["stage1"][rank][head]
        for name in a["adapters"]:
            np.testing.assert_allclose(b["adapters"][name], a["adapters"][name], rtol=0, atol=1e-5, err_msg=name)
    _same_metrics(runs["none"][0][head]["metrics"], runs["stage1"][0][head]["metrics"])


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_stage2_matches_data_parallel(runs, head):
    """Sharding stage 2 (Paddle's GroupShardedOptimizerStage2 + GroupShardedStage2, emulated on CPU): each
    adapter's gradient is summed on its owner process only; ppiad's mean, global clip (max norm 0.05 acts) and
    logged grad_norm must still equal data parallel's, and so must the adapters after 3 steps and the resume."""
    for rank in range(2):
        a, b = runs["none"][rank][head], runs["stage2"][rank][head]
        assert b["owned"] and b["owned"] != runs["stage2"][1 - rank][head]["owned"]   # the adapters were shared
        assert 0 < len(b["owned"]) < len(b["adapters"])
        for name in a["adapters"]:
            np.testing.assert_allclose(b["adapters"][name], a["adapters"][name], rtol=0, atol=1e-5, err_msg=name)
        assert b["resumed_sha256"] == b["sha256"]
    # the gradient AdamW applies is the clipped mean, as under data parallel (AdamW alone would hide a constant
    # factor such as Paddle's own 1/N applied a second time): stage 2's shares add up to data parallel's whole
    dp_sq, s2_sq = runs["none"][0][head]["applied_sq"], [runs["stage2"][r][head]["applied_sq"] for r in range(2)]
    assert len(dp_sq) == STEPS and all(len(s) == STEPS for s in s2_sq)
    np.testing.assert_allclose(np.add(*s2_sq), dp_sq, rtol=1e-4)
    np.testing.assert_allclose(dp_sq, 0.05 ** 2, rtol=1e-4)       # the clip to 0.05 acted
    _same_metrics(runs["none"][0][head]["metrics"], runs["stage2"][0][head]["metrics"])
    assert all(m["grad_norm"] > 0.05 for m in runs["stage2"][0][head]["metrics"])


@pytest.mark.parametrize("mode", ["none", "stage2"])
def test_held_bytes_as_estimated(runs, mode):
    """Between steps: stage 2 keeps each process's share of the AdamW state and one gradient buffer; the larger
    process holds exactly what ppiad.utils.memory.estimate predicts (parameters, gradients, optimizer state)."""
    per_rank = [runs[mode][r]["tied"] for r in range(2)]
    for key in ("params", "grads", "optimizer"):
        assert max(r["held_bytes"][key] for r in per_rank) == per_rank[0]["predicted"][key], key
    if mode == "stage2":   # the state is split: each process holds less than data parallel's whole
        whole = runs["none"][0]["tied"]["held_bytes"]["optimizer"]
        assert all(0 < r["held_bytes"]["optimizer"] < whole for r in per_rank)
        assert sum(r["held_bytes"]["optimizer"] for r in per_rank) == whole


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_stage3_holds_one_nth_of_the_frozen_base_between_steps(runs, head):
    for rank in range(2):
        r = runs["stage3"][rank][head]
        assert r["resident_after_step"] == 0, "split frozen weights gathered by backward stayed resident"
        assert r["resident_without_release"] > 0       # the fault release_gathered fixes is real
        # the split parameters' bytes held by this process: ~1/2 of their full size (plus alignment padding)
        assert r["held_split_elements"] <= 0.5 * r["full_split_elements"] + 2 * 1024 * r["split"]


# ------------------------------------------------------------------------------------------------- worker
def _untied(model):
    import copy

    import paddle

    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    cfg = copy.deepcopy(model.config)
    cfg.tie_word_embeddings = False
    paddle.seed(3)
    other = Qwen2VLForConditionalGeneration(cfg)
    other.set_state_dict(model.state_dict())
    w = model.model.embed_tokens.weight
    other.lm_head.weight.set_value(w + 0.01 * paddle.randn(w.shape))
    other.eval()
    return other


def _train(out_dir, sharding, assets, head):
    import paddle

    import ppiad.models.generation as generation
    from ppiad.config import load_config
    from ppiad.data.registry import build_dataset
    from ppiad.models.lora import lora_state_dict
    from ppiad.models.processor import Qwen2VLProcessor
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.rl import rewards
    from ppiad.rl import trainer as trainer_mod
    from ppiad.utils import distributed
    from tests.test_trainer import tiny_overrides

    def config(run_name, *extra):
        return load_config(None, tiny_overrides(assets, out_dir, run_name, f"train.max_steps={STEPS}",
                                                "grpo.beta=0.04", "train.grad_accum_steps=2", "train.save_every=2",
                                                "grpo.max_new_tokens=10", "train.max_grad_norm=0.05",
                                                f"distributed.sharding={sharding}",
                                                f"distributed.stage3_segment_size={SEGMENT}", *extra))

    def fresh_model():
        m = Qwen2VLForConditionalGeneration.from_pretrained(assets["model"])
        return _untied(m) if head == "untied" else m

    cfg = config(f"{sharding}_{head}")
    model = fresh_model()
    processor = Qwen2VLProcessor.from_config(cfg)
    # Many stop tokens (half the vocabulary): sampled rollouts end after a few steps, unevenly.
    vocab = model.config.vocab_size
    processor.eos_token_ids = list(processor.eos_token_ids) + list(range(7, vocab - 20, 2))
    samples = build_dataset(cfg.data.train, cfg.data.object_names)

    def fake_rewards(rewards_cfg, completions, batch, group_size, token_p=None, class_factors=None):
        total = np.array([float(len(t) % 7) for t in completions])
        zeros = np.zeros(len(completions))
        return rewards.RewardScores(total, {"format": zeros, "accuracy": zeros, "focal": zeros},
                                    np.ones(len(completions)), zeros)

    rewards.compute_rewards = fake_rewards
    decode_steps, real_generate = [], generation.generate

    def counting_generate(*args, **kwargs):
        res = real_generate(*args, **kwargs)
        decode_steps.append(int(res.sequences.shape[1]))
        return res

    generation.generate = counting_generate
    release = distributed.release_gathered
    probe = {}

    def probing_release(wrapped):   # how many split weights backward left gathered, before the release
        probe.setdefault("before", len(distributed.resident_split_parameters(wrapped)))
        return release(wrapped)

    distributed.release_gathered = probing_release
    tr = trainer_mod.GRPOTrainer(cfg, model=model, processor=processor, samples=samples)
    tr.setup = _setup_once(tr)
    applied, adamw_step = [], paddle.optimizer.AdamW.step

    def recording_step(self):   # the gradients AdamW applies on this process (stage 2: its share only)
        held = [p.grad for p in tr.trainable if p.grad is not None and p.grad._is_initialized()]
        applied.append(sum(float((g ** 2).sum()) for g in held))
        return adamw_step(self)

    paddle.optimizer.AdamW.step = recording_step
    try:
        start = None
        tr.setup()
        start = {k: v.numpy().tolist() for k, v in lora_state_dict(tr.core).items()}
        summary = tr.train()
    finally:
        generation.generate, distributed.release_gathered = real_generate, release
        paddle.optimizer.AdamW.step = adamw_step
    evaluation = _evaluate(tr, processor, samples)
    # exact resume: a new process state from the step-2 checkpoint computes the same step 3
    resumed = trainer_mod.GRPOTrainer(
        config(f"{sharding}_{head}_resumed", f"train.resume={summary['run_dir']}/checkpoints/step_000002"),
        model=fresh_model(), processor=processor, samples=samples).train()
    split = distributed.split_parameters(tr.core)
    from ppiad.utils import memory
    held_bytes = memory.measure(tr.core, tr.wrapped, tr.optimizer)
    predicted = {k: memory.estimate(tr.cfg, 2)[k] for k in held_bytes}
    owned = []
    if sharding == "stage2":
        names = {id(p): n for n, p in tr.core.named_parameters()}
        owned = sorted(names[id(p)] for p in distributed._stage2_owned(tr.wrapped, tr.trainable))
    held = sum(int(p.fw_storage._numel()) for p in split if p.status == "part")
    full = sum(int(np.prod(p.shape)) for p in split)
    metrics = []
    path = os.path.join(summary["run_dir"], "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            metrics = [json.loads(line) for line in f]
    return {"adapters": {k: v.numpy().tolist() for k, v in lora_state_dict(tr.core).items()}, "start": start,
            "split": len(split), "resident_after_step": len(distributed.resident_split_parameters(tr.core)),
            "resident_without_release": probe.get("before", 0) if sharding == "stage3" else 0,
            "held_split_elements": held, "full_split_elements": full, "decode_steps": decode_steps,
            "metrics": metrics, "owned": owned, "held_bytes": held_bytes, "predicted": predicted,
            "applied_sq": applied, "world": paddle.distributed.get_world_size(), "evaluation": evaluation,
            "sha256": summary["adapter_sha256"], "resumed_sha256": resumed["adapter_sha256"]}


def _evaluate(tr, processor, samples):
    """Greedy decoding with forced answer scores, as evaluation runs it, on different images per process:
    rank 0 stops at its first stop token of many and finds an answer in every row (find_decision patched), so
    only rank 1 needs the extra scoring forward; rank 1 decodes to max_new_tokens."""
    import paddle

    from ppiad.data.images import load_image
    from ppiad.models import generation

    rank = paddle.distributed.get_rank()
    batch = samples[rank * 2:rank * 2 + 2]
    inputs = processor.build_inputs([load_image(s.path) for s in batch], [s.object_name for s in batch])
    eos = processor.eos_token_ids if rank == 0 else processor.eos_token_ids[:1]
    real = generation.AnswerTokens.find_decision
    if rank == 0:
        generation.AnswerTokens.find_decision = lambda self, tokens: (0, 0)
    try:
        res = generation.generate(tr.core, inputs, max_new_tokens=8, do_sample=False, eos_token_ids=eos,
                                  tokenizer=processor.tokenizer, force_answer_score=True)
    finally:
        generation.AnswerTokens.find_decision = real
    return {"sequences": res.sequences.numpy().tolist(), "scores": res.answer_scores.numpy().tolist(),
            "forced": res.forced_score}


def _setup_once(tr):
    """train() calls setup(); the worker calls it first to read the start adapters."""
    real, done = tr.setup, []

    def setup():
        if not done:
            real()
            done.append(True)
    return setup


def _worker(out_dir, sharding, assets_json):
    import paddle

    assets = json.loads(assets_json)
    result = {head: _train(out_dir, sharding, assets, head) for head in ("tied", "untied")}
    with open(os.path.join(out_dir, f"rank{paddle.distributed.get_rank()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], sys.argv[3], sys.argv[4])
